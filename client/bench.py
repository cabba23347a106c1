"""`lossd bench`: in-process vs remote step times, side by side in one run.

For each case (a loss at a batch x dim) it times forward+backward in process and through
the server over each transport (unary, stream, shared memory), and reports the overhead
(remote - in process) and the transfer rate (bytes sent and received / overhead). It also
measures the throughput of four clients against one, and the accuracy cost of sending
float32 tensors as float16/bfloat16. Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lossd.losses import registry
from lossd.v1 import codec

from .connection import LossClient

Args = dict[str, Any]
TRANSPORTS = ("unary", "stream", "shm")


@dataclass
class Case:
    """One benchmark case: a loss, its config and a recipe for its forward arguments."""

    name: str
    loss: str
    config: dict[str, Any]
    make: Callable[[torch.Generator], Args]

    def args(self, seed: int = 0, device: str = "cpu") -> Args:
        """The forward arguments, on `device` (leaves, so that they collect gradients)."""
        args = self.make(torch.Generator().manual_seed(seed))
        if device == "cpu":
            return args
        return codec.map_tensors(
            lambda t: t.detach().to(device).requires_grad_(t.requires_grad), args
        )


@dataclass
class Row:
    """The measurements of one case."""

    case: str
    payload_mb: float  # bytes sent and received per step
    local_ms: float
    remote_ms: dict[str, float] = field(default_factory=dict)

    def overhead_ms(self, transport: str) -> float:
        return self.remote_ms[transport] - self.local_ms

    def rate_mb_s(self, transport: str) -> float | None:
        """MB/s over the overhead; None when the remote step was not slower than local."""
        overhead = self.overhead_ms(transport)
        return self.payload_mb / (overhead / 1e3) if overhead > 0 else None


def _views(g: torch.Generator, n: int, batch: int, dim: int, grad: bool) -> list[Tensor]:
    return [torch.randn(batch, dim, generator=g, requires_grad=grad) for _ in range(n)]


def _pair(batch: int, dim: int) -> Callable[[torch.Generator], Args]:
    def make(g: torch.Generator) -> Args:
        return {
            "out0": torch.randn(batch, dim, generator=g, requires_grad=True),
            "out1": torch.randn(batch, dim, generator=g, requires_grad=True),
        }

    return make


def _dino(batch: int, dim: int) -> Callable[[torch.Generator], Args]:
    def make(g: torch.Generator) -> Args:  # teacher outputs come without gradients
        return {
            "teacher_out": _views(g, 2, batch, dim, False),
            "student_out": _views(g, 2, batch, dim, True),
        }

    return make


def _swav(batch: int, dim: int) -> Callable[[torch.Generator], Args]:
    def make(g: torch.Generator) -> Args:
        return {
            "high_resolution_outputs": _views(g, 2, batch, dim, True),
            "low_resolution_outputs": _views(g, 2, batch, dim, True),
        }

    return make


def _vicreg(batch: int, dim: int) -> Callable[[torch.Generator], Args]:
    def make(g: torch.Generator) -> Args:
        z_a, z_b = _views(g, 2, batch, dim, True)
        return {"z_a": z_a, "z_b": z_b}

    return make


def cases(quick: bool) -> list[Case]:
    """The benchmark's cases; `quick` keeps small ones only."""
    sizes = [(64, 32)] if quick else [(256, 128), (1024, 256)]
    found: list[Case] = []
    for batch, dim in sizes:
        tag = f"{batch}x{dim}"
        found += [
            Case(f"NTXent {tag}", "NTXentLoss", {}, _pair(batch, dim)),
            Case(
                f"NTXent+bank {tag}",
                "NTXentLoss",
                {"memory_bank_size": [4096, dim]},
                _pair(batch, dim),
            ),
            Case(f"DINO {tag}", "DINOLoss", {"output_dim": dim}, _dino(batch, dim)),
            Case(f"SwaV {tag}", "SwaVLoss", {}, _swav(batch, dim)),
            Case(f"VICReg {tag}", "VICRegLoss", {}, _vicreg(batch, dim)),
        ]
    batch, dim = (32, 2048) if quick else (256, 16384)
    megabytes = 4 * batch * dim * 4 / 2**20
    found.append(
        Case(
            f"DINO {batch}x{dim} ({megabytes:.0f} MB)",
            "DINOLoss",
            {"output_dim": dim},
            _dino(batch, dim),
        )
    )
    return found


def payload_mb(args: Args) -> float:
    """MB sent (every input) and received (the gradient of each input requiring one)."""
    tensors = codec.tensors_in(args)
    sent = sum(t.numel() * t.element_size() for t in tensors)
    received = sum(t.numel() * t.element_size() for t in tensors if t.requires_grad)
    return (sent + received) / 1e6


def time_steps(loss: torch.nn.Module, args: Args, repeats: int) -> float:
    """Median seconds of forward+backward over `repeats` runs (after two warm-up runs)."""
    cuda = any(t.is_cuda for t in codec.tensors_in(args))
    times = []
    for i in range(repeats + 2):
        for t in codec.tensors_in(args):
            t.grad = None
        start = time.perf_counter()
        value = loss(**args)
        value.sum().backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def client_for(target: str, transport: str, **options: Any) -> LossClient:
    return LossClient(
        target, stream=transport == "stream", shared_memory=transport == "shm", **options
    )


def measure(
    target: str, case: Case, transports: tuple[str, ...], repeats: int, device: str = "cpu"
) -> Row:
    """One case: in process (on `device`), then over each transport, in one run."""
    args = case.args(device=device)
    local = registry.get(case.loss).cls(**case.config).to(device)
    row = Row(case.name, payload_mb(args), time_steps(local, args, repeats) * 1e3)
    for transport in transports:
        with client_for(target, transport) as client:
            remote = client.loss(case.loss, **case.config)
            row.remote_ms[transport] = time_steps(remote, args, repeats) * 1e3
            remote.close(delete_session=True)
    return row


# -- throughput with several clients -----------------------------------------------------


def _client_worker(target: str, seconds: float, start_at: float, results: Any) -> None:
    torch.set_num_threads(1)
    with LossClient(target) as client:
        loss = client.loss("NTXentLoss")
        args = _pair(256, 128)(torch.Generator().manual_seed(os.getpid()))
        time_steps(loss, args, 1)
        while time.time() < start_at:
            time.sleep(0.01)
        steps = 0
        while time.time() < start_at + seconds:
            loss(**args).backward()
            steps += 1
        results.put(steps)


def throughput(target: str, clients: int, seconds: float) -> float:
    """Steps per second of `clients` processes, each on its own NTXent 256x128 session."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    start_at = time.time() + 8  # time for the processes to import torch and warm up
    procs = [
        ctx.Process(target=_client_worker, args=(target, seconds, start_at, results))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    total = sum(results.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


# -- accuracy of half precision on the wire ----------------------------------------------


def wire_accuracy(target: str, case: Case) -> dict[str, dict[str, float]]:
    """Relative error of the loss and of the gradients with float16/bfloat16 on the wire
    (against float32 on the wire), and the step time of each."""
    out: dict[str, dict[str, float]] = {}
    reference: tuple[Tensor, list[Any]] | None = None
    for name, dtype in (
        ("float32", None),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ):
        args = case.args()
        with LossClient(target, wire_dtype=dtype) as client:
            remote = client.loss(case.loss, **case.config)
            value = remote(**args)
            value.sum().backward()
            grads = [t.grad for t in codec.tensors_in(args) if t.requires_grad]
            ms = time_steps(remote, case.args(), 3) * 1e3
            remote.close(delete_session=True)
        if reference is None:
            reference = (value.detach(), grads)
        first, first_grads = reference
        loss_err = ((value.detach() - first).abs() / first.abs()).max().item()
        grad_err = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, first_grads))
        out[name] = {"loss_rel_err": loss_err, "grad_rel_err": grad_err, "step_ms": ms}
    return out


# -- output ------------------------------------------------------------------------------


def table(rows: list[Row], transports: tuple[str, ...]) -> str:
    header = f"{'case':<26} {'MB/step':>8} {'local ms':>9}"
    for t in transports:
        header += f" {t + ' ms':>10} {'x':>5} {t + ' MB/s':>11}"
    lines = [header, "-" * len(header)]
    for row in rows:
        line = f"{row.case:<26} {row.payload_mb:8.2f} {row.local_ms:9.2f}"
        for t in transports:
            ratio = row.remote_ms[t] / row.local_ms
            rate = row.rate_mb_s(t)
            shown = f"{rate:11.0f}" if rate is not None else f"{'(faster)':>11}"
            line += f" {row.remote_ms[t]:10.2f} {ratio:5.2f} {shown}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[Row], transports: tuple[str, ...], path: Path) -> bool:
    """Step time vs payload size, one series per transport and in process (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r.payload_mb for r in rows]
    ax.scatter(sizes, [r.local_ms for r in rows], label="in process", marker="o")
    for t, marker in zip(transports, "s^D"):
        ax.scatter(sizes, [r.remote_ms[t] for r in rows], label=t, marker=marker)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="MB sent + received per step",
        ylabel="forward+backward ms (median)",
        title="lossd step time vs payload",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@contextmanager
def local_server(device: str) -> Iterator[str]:
    """`lossd serve` in a child process on a free port, with shared memory on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lossd.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-dir",
            "",
            "--shared-memory",
            "--device",
            device,
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    try:
        with LossClient(target, retries=30) as client:
            client.list_losses()
        yield target
    finally:
        proc.terminate()
        proc.wait()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        help="host:port of a running server (default: start one here, with shared memory on)",
    )
    parser.add_argument("--device", default="auto", help="device of the started server")
    parser.add_argument(
        "--local-device",
        default="cpu",
        help="where the trainer's tensors (and the in-process baseline) live, "
        "e.g. cuda (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="small cases, a few seconds")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per measurement (default: 15, 3 with --quick)",
    )
    parser.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help="comma-separated subset of unary,stream,shm",
    )
    parser.add_argument(
        "--out",
        default="bench-results",
        metavar="DIR",
        help="where bench.json and bench.png go (default: %(default)s)",
    )
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the throughput and wire-precision measurements",
    )


def run(args: argparse.Namespace) -> int:
    transports = tuple(t for t in args.transports.split(",") if t)
    repeats = args.repeats or (3 if args.quick else 15)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = cases(args.quick)
    with _target(args) as target:
        rows = []
        for i, case in enumerate(chosen, start=1):
            print(f"[{i}/{len(chosen)}] {case.name} ...", file=sys.stderr, flush=True)
            rows.append(measure(target, case, transports, repeats, args.local_device))
        extras: dict[str, Any] = {}
        if not args.no_extras:
            print("throughput: 1 and 4 clients ...", file=sys.stderr, flush=True)
            seconds = 2.0 if args.quick else 8.0
            one, four = throughput(target, 1, seconds), throughput(target, 4, seconds)
            extras["throughput"] = {
                "1 client steps/s": one,
                "4 clients steps/s": four,
                "ratio": four / one,
            }
            print("wire precision ...", file=sys.stderr, flush=True)
            extras["wire_precision"] = {
                c.name: wire_accuracy(target, c) for c in (chosen[0], chosen[-1])
            }
    print(table(rows, transports))
    for name, value in extras.items():
        print(f"\n{name}: {json.dumps(value, indent=2)}")
    report = {
        "machine": machine(),
        "local_device": args.local_device,
        "transports": transports,
        "repeats": repeats,
        "rows": [asdict(r) for r in rows],
        **extras,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    drew = plot(rows, transports, out / "bench.png")
    print(
        f"\nwrote {out / 'bench.json'}"
        + (f" and {out / 'bench.png'}" if drew else " (no plot: matplotlib is not installed)")
    )
    return 0


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[str]:
    if args.server:
        yield args.server
    else:
        with local_server(args.device) as target:
            yield target
