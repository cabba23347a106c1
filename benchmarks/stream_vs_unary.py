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

import torch

from lossd.client import LossClient
from lossd.client.bench import local_server, time_steps
from lossd.losses import NegativeCosineSimilarity


def pair(total_bytes: int) -> dict[str, torch.Tensor]:
    """Two float32 (rows, 1024) inputs of `total_bytes` together, both wanting gradients."""
    rows = total_bytes // 2 // 4 // 1024
    return {
        "x0": torch.randn(rows, 1024, requires_grad=True),
        "x1": torch.randn(rows, 1024, requires_grad=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with local_server("cpu") as target:
        print(
            f"{'step':>8} {'transport':>9} {'local ms':>9} {'remote ms':>10} "
            f"{'overhead ms':>12} {'MB/s':>7}"
        )
        for label, total in (("256 KB", 256 * 1024), ("64 MB", 64 * 1024 * 1024)):
            inputs = pair(total)
            local = time_steps(NegativeCosineSimilarity(), inputs, args.repeats)
            for stream in (False, True):
                with LossClient(target, stream=stream) as client:
                    loss = client.loss("NegativeCosineSimilarity")
                    remote = time_steps(loss, inputs, args.repeats)
                moved = 2 * total / 1e6  # inputs out, gradients back
                overhead = remote - local
                print(
                    f"{label:>8} {'stream' if stream else 'unary':>9} {local * 1e3:9.1f} "
                    f"{remote * 1e3:10.1f} {overhead * 1e3:12.1f} "
                    f"{moved / max(overhead, 1e-9):7.0f}"
                )


if __name__ == "__main__":
    main()
