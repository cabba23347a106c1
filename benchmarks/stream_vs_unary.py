"""Unary Compute vs ComputeStream for a 256 KB and a 64 MB step (loopback).

Starts `lossd serve` in a separate process (so client and server do not share a GIL),
then times NegativeCosineSimilarity steps whose two inputs together are 256 KB or 64 MB;
their gradients travel back, so each step moves twice its input size. The same step in
process is timed too: the transfer rate is bytes moved / (remote - in-process). Prints a
table of medians.

    python benchmarks/stream_vs_unary.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import torch

from lossd.client import LossClient
from lossd.losses import NegativeCosineSimilarity


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lossd.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
    )
    with LossClient(f"127.0.0.1:{port}", retries=20) as client:
        client.list_losses()  # waits until it answers
    return server


def time_steps(loss: torch.nn.Module, numel: int, repeats: int) -> float:
    """Median seconds of one forward+backward with two float32 (numel/1024, 1024) inputs."""
    x0 = torch.randn(numel // 1024, 1024, requires_grad=True)
    x1 = torch.randn(numel // 1024, 1024, requires_grad=True)
    loss(x0, x1).backward()  # warm up the channel and the session
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss(x0, x1).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    port = free_port()
    server = start_server(port)
    try:
        print(
            f"{'step':>8} {'transport':>9} {'local ms':>9} {'remote ms':>10} "
            f"{'overhead ms':>12} {'MB/s':>7}"
        )
        for label, total in (("256 KB", 256 * 1024), ("64 MB", 64 * 1024 * 1024)):
            numel = total // 2 // 4
            local = time_steps(NegativeCosineSimilarity(), numel, args.repeats)
            for stream in (False, True):
                with LossClient(f"127.0.0.1:{port}", stream=stream) as client:
                    loss = client.loss("NegativeCosineSimilarity")
                    remote = time_steps(loss, numel, args.repeats)
                moved = 2 * total / 1e6  # inputs out, gradients back
                overhead = remote - local
                print(
                    f"{label:>8} {'stream' if stream else 'unary':>9} {local * 1e3:9.1f} "
                    f"{remote * 1e3:10.1f} {overhead * 1e3:12.1f} "
                    f"{moved / max(overhead, 1e-9):7.0f}"
                )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
