"""A bounded load test on loopback: 8 clients step mixed losses for LOSSD_LOAD_SECONDS
(default 20) against one server and ONE shared memory bank.

Each client (a thread with its own LossClient) cycles through NTXent with and without the
shared bank, DINO (one session shared by all clients), SwaV, VICReg, Barlow Twins and
MemoryBankModule on the shared bank. Every row enqueued into the bank identifies its
client, step and row: MemoryBankModule enqueues marker rows (client, step, row, MARK) as
they are; NTXent enqueues its normalized out1, whose rows are built so that normalizing
keeps the identity recoverable. The clients reserve rows from a shared budget below the
bank's size, so the bank never wraps and every enqueued block must be found in it.

Asserts: no call failed; the bank's rows_written (and pointer) equal the rows the clients
enqueued; every block appears exactly once, whole, and each client's blocks in its step
order (no lost, duplicated or torn rows); the shared DINO session counted every step.
Prints steps, p50 and p99 latency per loss and overall.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from lossd.client import LossClient
from lossd.server import LossdServer
from tests.conftest import start_server

CLIENTS = 8
SECONDS = float(os.environ.get("LOSSD_LOAD_SECONDS", "20"))
BATCH = 8  # rows per step, and per block in the bank
DIM = 4  # the shared bank's row width
# About 5x the rows this 2-core box enqueues (~370/s); a faster machine runs into the
# budget, which keeps the rows enqueued below the bank's size, so it never wraps.
BANK_ROWS = 2 ** math.ceil(math.log2(max(2**14, SECONDS * 2000)))
MARK = -7.0  # last column of marker rows; normalized NTXent rows have it in (0, 1]
WIDTH = 16  # embedding width of the losses without the bank

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def load_server() -> Iterator[LossdServer]:
    """A server of its own, with a worker per client and some to spare."""
    server = start_server(workers=2 * CLIENTS)
    yield server
    server.stop(grace=1.0)


class RowBudget:
    """Rows the clients may still enqueue into the bank, shared by all of them."""

    def __init__(self, rows: int) -> None:
        self.left = rows
        self.refused = 0
        self._lock = threading.Lock()

    def take(self, rows: int) -> bool:
        """Reserve `rows`; False (and counted) when the budget is spent."""
        with self._lock:
            if rows > self.left:
                self.refused += 1
                return False
            self.left -= rows
            return True


@dataclass
class Worker:
    """What one client did: latencies per loss, the blocks it enqueued, its errors."""

    index: int
    latencies: dict[str, list[float]] = field(default_factory=dict)
    blocks: list[tuple[str, int, int]] = field(default_factory=list)  # (kind, client, step)
    errors: list[str] = field(default_factory=list)


def marker_rows(client: int, step: int) -> torch.Tensor:
    """A block of rows (client, step, row, MARK)."""
    return torch.tensor([[client, step, row, MARK] for row in range(BATCH)])


def ntxent_rows(client: int, step: int) -> torch.Tensor:
    """out1 rows (client + 1, step + 1, row + 1, 1): after normalization, dividing a row by
    its last entry gives them back."""
    return torch.tensor([[client + 1.0, step + 1.0, row + 1.0, 1.0] for row in range(BATCH)])


def decode_block(block: torch.Tensor) -> tuple[str, int, int]:
    """(kind, client, step) of a block of BATCH bank rows; AssertionError if it is torn."""
    if bool((block[:, 3] == MARK).all()):
        kind, ids = "marker", block[:, :3]
    elif bool((block[:, 3] > 0).all()):
        kind, ids = "ntxent", block[:, :3] / block[:, 3:4] - 1
        assert torch.allclose(ids, ids.round(), atol=1e-2), f"not an NTXent block: {block}"
        ids = ids.round()
    else:
        raise AssertionError(f"a block mixes marker and NTXent rows: {block}")
    assert torch.equal(ids[:, 2], torch.arange(BATCH, dtype=ids.dtype)), f"torn block: {block}"
    assert bool((ids[:, :2] == ids[:1, :2]).all()), f"a block mixes two steps: {block}"
    return kind, int(ids[0, 0]), int(ids[0, 1])


Step = Callable[[int], None]  # one step of a loss, given the client's step number


def make_steps(
    client: LossClient, index: int, bank: str, dino_id: str, worker: Worker
) -> dict[str, Step]:
    """The losses a client cycles through, each as one step (forward and backward)."""
    g = torch.Generator().manual_seed(index)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_()

    ntxent = client.loss("NTXentLoss", temperature=0.5)
    moco = client.loss("NTXentLoss", shared_bank=bank, temperature=0.5)
    dino = client.loss("DINOLoss", session_id=dino_id, output_dim=WIDTH)
    swav = client.loss("SwaVLoss")
    vicreg = client.loss("VICRegLoss")
    barlow = client.loss("BarlowTwinsLoss")
    queue = client.loss("MemoryBankModule", shared_bank=bank, feature_dim_first=False)

    def moco_step(step: int) -> None:
        moco(leaf(BATCH, DIM), ntxent_rows(index, step)).backward()  # out0 needs grad to enqueue
        worker.blocks.append(("ntxent", index, step))

    def queue_step(step: int) -> None:
        rows = marker_rows(index, step)
        output, before = queue(rows, update=True)
        assert output is rows and before.shape == (BANK_ROWS, DIM)
        worker.blocks.append(("marker", index, step))

    return {
        "NTXentLoss": lambda step: ntxent(leaf(BATCH, WIDTH), leaf(BATCH, WIDTH)).backward(),
        "NTXentLoss (shared bank)": moco_step,
        "DINOLoss (shared session)": lambda step: dino(
            [leaf(BATCH, WIDTH) for _ in range(2)],
            [leaf(BATCH, WIDTH) for _ in range(3)],
            epoch=step,
        ).backward(),
        "SwaVLoss": lambda step: (
            swav([leaf(BATCH, WIDTH) for _ in range(2)], [leaf(BATCH, WIDTH) for _ in range(2)])
            .sum()
            .backward()
        ),
        "VICRegLoss": lambda step: vicreg(leaf(BATCH, WIDTH), leaf(BATCH, WIDTH)).backward(),
        "BarlowTwinsLoss": lambda step: barlow(leaf(BATCH, WIDTH), leaf(BATCH, WIDTH)).backward(),
        "MemoryBankModule (shared bank)": queue_step,
    }


ENQUEUES = {"NTXentLoss (shared bank)", "MemoryBankModule (shared bank)"}


def run_client(
    target: str,
    index: int,
    bank: str,
    dino_id: str,
    budget: RowBudget,
    start: threading.Barrier,
    stop_at: list[float],
    worker: Worker,
) -> None:
    """Step until the deadline, cycling through the losses from a per-client offset."""
    try:
        with LossClient(target, timeout=60) as client:
            steps = make_steps(client, index, bank, dino_id, worker)
            names = list(steps)
            start.wait()
            step = 0
            while time.monotonic() < stop_at[0]:
                name = names[(index + step) % len(names)]
                if name in ENQUEUES and not budget.take(BATCH):
                    name = "VICRegLoss"  # the bank's budget is spent: no more enqueues
                began = time.perf_counter()
                steps[name](step)
                worker.latencies.setdefault(name, []).append(time.perf_counter() - began)
                step += 1
    except Exception:  # noqa: BLE001 - every failure is reported by the test
        worker.errors.append(traceback.format_exc())
        if start.n_waiting:
            start.abort()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, in milliseconds (NaN for none)."""
    if not values:
        return math.nan
    return float(torch.tensor(values, dtype=torch.float64).quantile(q)) * 1000


def table(workers: list[Worker], seconds: float, budget: RowBudget) -> str:
    """Steps, p50 and p99 latency per loss and overall."""
    by_loss: dict[str, list[float]] = {}
    for worker in workers:
        for name, values in worker.latencies.items():
            by_loss.setdefault(name, []).extend(values)
    every = [v for values in by_loss.values() for v in values]
    rate = len(every) / max(seconds, 1e-9)
    lines = [
        f"\nlossd load: {CLIENTS} clients, {seconds:.1f} s, {rate:.0f} steps/s; bank "
        f"{BANK_ROWS} x {DIM}, {budget.refused} enqueues refused by the budget",
        f"{'loss':<32} {'steps':>7} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for name, values in sorted(by_loss.items()):
        lines.append(
            f"{name:<32} {len(values):>7} {percentile(values, 0.5):>8.1f} "
            f"{percentile(values, 0.99):>8.1f}"
        )
    lines.append(
        f"{'all':<32} {len(every):>7} {percentile(every, 0.5):>8.1f} "
        f"{percentile(every, 0.99):>8.1f}"
    )
    return "\n".join(lines)


def test_mixed_load_on_one_shared_bank(
    load_server: LossdServer, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{load_server.port}"
    tag = uuid.uuid4().hex[:8]
    bank, dino_id = f"load-bank-{tag}", f"load-dino-{tag}"
    with LossClient(target, timeout=60) as admin:
        admin.create_bank(bank, BANK_ROWS, DIM, seed=0)
        budget = RowBudget(BANK_ROWS - 1)  # a bank that fills up to its end wraps to 0
        workers = [Worker(i) for i in range(CLIENTS)]
        start = threading.Barrier(CLIENTS + 1)
        stop_at = [float("inf")]
        threads = [
            threading.Thread(
                target=run_client,
                name=f"load-{w.index}",
                args=(target, w.index, bank, dino_id, budget, start, stop_at, w),
            )
            for w in workers
        ]
        for thread in threads:
            thread.start()
        with contextlib.suppress(threading.BrokenBarrierError):  # a client failed to set
            start.wait(timeout=120)  # up: its error is asserted below
        began = time.monotonic()
        stop_at[0] = began + SECONDS
        for thread in threads:
            thread.join(timeout=SECONDS + 120)
        elapsed = time.monotonic() - began
        with capsys.disabled():
            print(table(workers, elapsed, budget))
        assert not any(t.is_alive() for t in threads), "a client hangs"
        errors = [e for w in workers for e in w.errors]
        assert not errors, f"{len(errors)} client(s) failed; the first:\n{errors[0]}"

        enqueued = [block for w in workers for block in w.blocks]
        info = admin.get_bank(bank)
        assert info.rows_written == len(enqueued) * BATCH
        assert info.pointer == info.rows_written, "the bank wrapped"
        rows = admin.get_bank_state(bank)["bank"][: info.rows_written]
        found = [decode_block(block) for block in rows.reshape(-1, BATCH, DIM)]
        assert Counter(found) == Counter(enqueued), "blocks lost or duplicated"
        for index in range(CLIENTS):
            mine = [step for _, client, step in found if client == index]
            assert mine == sorted(mine), f"client {index}'s blocks are out of order"
        dino_steps = sum(len(w.latencies.get("DINOLoss (shared session)", [])) for w in workers)
        assert admin.get_session(dino_id).steps == dino_steps
