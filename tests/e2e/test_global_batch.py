"""Global-batch steps: W ranks (threads or processes) of one job send their shards; the
server computes the global batch once. Each rank's loss, its gradients / W and the state
equal one process computing the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lossd.client import AbortedError, InvalidArgumentError, LossClient
from lossd.losses import registry
from lossd.losses.registry import Batch
from lossd.server import LossdServer
from tests.conftest import start_server
from tests.golden import tree_map

ROOT = Path(__file__).resolve().parents[2]
BATCH = 8


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# loss -> (config, global arguments)
CASES: dict[str, tuple[dict[str, Any], Callable[[torch.Generator], dict[str, Any]]]] = {
    "ntxent": (
        {"loss": "NTXentLoss", "temperature": 0.2},
        lambda g: {"out0": _randn(BATCH, 6, g=g), "out1": _randn(BATCH, 6, g=g)},
    ),
    "ntxent-bank": (
        {"loss": "NTXentLoss", "temperature": 0.2, "memory_bank_size": [32, 6]},
        lambda g: {"out0": _randn(BATCH, 6, g=g), "out1": _randn(BATCH, 6, g=g)},
    ),
    "dino": (
        {"loss": "DINOLoss", "output_dim": 10, "warmup_teacher_temp_epochs": 3},
        lambda g: {
            "teacher_out": [_randn(BATCH, 10, g=g) for _ in range(2)],
            "student_out": [_randn(BATCH, 10, g=g) for _ in range(4)],
            "epoch": 1,
        },
    ),
    "swav": (
        {"loss": "SwaVLoss"},
        lambda g: {
            "high_resolution_outputs": [_randn(BATCH, 5, g=g) for _ in range(2)],
            "low_resolution_outputs": [_randn(BATCH, 5, g=g) for _ in range(2)],
        },
    ),
    "vicreg": (
        {"loss": "VICRegLoss"},
        lambda g: {"z_a": _randn(BATCH, 6, g=g), "z_b": _randn(BATCH, 6, g=g)},
    ),
    "barlow": (
        {"loss": "BarlowTwinsLoss"},
        lambda g: {"z_a": _randn(BATCH, 6, g=g), "z_b": _randn(BATCH, 6, g=g)},
    ),
    "msn": (
        {"loss": "MSNLoss"},
        lambda g: {
            "anchors": _randn(2 * BATCH, 6, g=g),
            "targets": _randn(BATCH, 6, g=g),
            "prototypes": _randn(5, 6, g=g),
        },
    ),
}


def shard(spec: registry.LossSpec, args: dict[str, Any], world: int, rank: int) -> dict[str, Any]:
    """Rank's part of the global arguments (the inverse of the server's concatenation)."""
    b = BATCH // world
    out: dict[str, Any] = {}
    for arg in spec.args:
        if arg.name not in args:
            continue
        value = args[arg.name]
        if arg.batch is Batch.ROWS:
            out[arg.name] = tree_map(lambda t: t[rank * b : (rank + 1) * b], value)
        elif arg.batch is Batch.VIEW_ROWS:
            views = value.shape[0] // BATCH
            out[arg.name] = torch.cat(
                [value[v * BATCH + rank * b : v * BATCH + (rank + 1) * b] for v in range(views)]
            )
        else:
            out[arg.name] = value
    return out


def leafy(args: dict[str, Any]) -> dict[str, Any]:
    return tree_map(lambda t: t.detach().clone().requires_grad_(True), args)


def grads_of(args: dict[str, Any]) -> dict[str, Any]:
    return tree_map(lambda t: t.grad, args)


def global_reference(
    case: str, args: dict[str, Any], initial_state: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
    config = dict(CASES[case][0])
    spec = registry.get(config.pop("loss"))
    module = spec.cls(**config)
    module.load_state_dict(initial_state)
    leaves = leafy(args)
    loss = module(**leaves)
    loss.sum().backward()
    return loss.detach(), grads_of(leaves), module.state_dict()


def run_ranks(
    target: str, case: str, world: int, session_id: str, args: dict[str, Any]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Every rank in its own thread and client; returns (loss, grads) per rank."""
    config = {k: v for k, v in CASES[case][0].items() if k != "loss"}
    spec = registry.get(CASES[case][0]["loss"])
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            with LossClient(target, timeout=60) as client:
                loss_fn = client.loss(
                    spec.name, session_id=session_id, world_size=world, rank=rank, seed=0, **config
                )
                mine = leafy(shard(spec, args, world, rank))
                value = loss_fn(**mine)
                value.sum().backward()
                results[rank] = (value.detach(), grads_of(mine))
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ranks_equal_one_process_with_the_global_batch(target: str, case: str, world: int) -> None:
    spec = registry.get(CASES[case][0]["loss"])
    session_id = f"job-{case}-{world}-{uuid.uuid4().hex[:6]}"
    g = torch.Generator().manual_seed(world)
    with LossClient(target) as client:
        config = {k: v for k, v in CASES[case][0].items() if k != "loss"}
        client.create_session(spec.name, session_id=session_id, seed=0, **config)
        initial = client.get_state(session_id)
        for _ in range(2):  # two steps: the state carries over
            args = CASES[case][1](g)
            loss, grads, state = global_reference(case, args, initial)
            for rank, (value, rank_grads) in enumerate(
                run_ranks(target, case, world, session_id, args)
            ):
                torch.testing.assert_close(value, loss, rtol=1e-6, atol=1e-7)
                expected = shard(spec, grads, world, rank)
                for name, got in rank_grads.items():
                    scale = world if spec.arg(name).batch is not Batch.NONE else 1
                    torch.testing.assert_close(
                        tree_map(lambda t, s=scale: t / s, got),
                        expected[name],
                        rtol=1e-5,
                        atol=1e-6,
                        msg=lambda m, n=name: f"{case} {n}: {m}",
                    )
            remote_state = client.get_state(session_id)
            assert remote_state.keys() == state.keys()
            for key in state:
                torch.testing.assert_close(remote_state[key], state[key], rtol=1e-6, atol=1e-7)
            initial = remote_state
        assert client.get_session(session_id).steps == 2


RANK = """
    import sys, torch
    from lossd.client import LossClient
    world, rank, session = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    g = torch.Generator().manual_seed(0)
    out0, out1 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    b = 8 // world
    mine = out0[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    with LossClient() as client:
        loss = client.loss("NTXentLoss", session_id=session, world_size=world, rank=rank,
                           temperature=0.2, memory_bank_size=(32, 6), seed=0)
        value = loss(mine, out1[rank * b:(rank + 1) * b])
        value.backward()
    torch.save({"loss": value.detach(), "grad": mine.grad}, sys.argv[4])
"""


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_as_processes(target: str, world: int, tmp_path: Path) -> None:
    session_id = f"procs-{world}-{uuid.uuid4().hex[:6]}"
    with LossClient(target) as client:
        client.create_session(
            "NTXentLoss", session_id=session_id, temperature=0.2, memory_bank_size=[32, 6], seed=0
        )
        initial = client.get_state(session_id)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(RANK),
                str(world),
                str(rank),
                session_id,
                str(tmp_path / f"{rank}.pt"),
            ],
            env={**os.environ, "LOSSD_SERVER": target, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    g = torch.Generator().manual_seed(0)
    args = {"out0": torch.randn(8, 6, generator=g), "out1": torch.randn(8, 6, generator=g)}
    loss, grads, state = global_reference("ntxent-bank", args, initial)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    for rank, result in enumerate(got):
        torch.testing.assert_close(result["loss"], loss)
        b = 8 // world
        torch.testing.assert_close(result["grad"] / world, grads["out0"][rank * b : (rank + 1) * b])
    with LossClient(target) as client:
        assert torch.equal(
            client.get_state(session_id)["memory_bank.bank"], state["memory_bank.bank"]
        )


@pytest.fixture
def impatient_server() -> LossdServer:
    server = start_server(global_batch_timeout_s=0.5)
    yield server
    server.stop(grace=0)


def test_a_missing_rank_aborts_the_step_on_all_ranks(impatient_server: LossdServer) -> None:
    target = f"127.0.0.1:{impatient_server.port}"
    with LossClient(target, retries=0) as client:
        ranks = [
            client.loss(
                "NTXentLoss", session_id="short", world_size=3, rank=r, memory_bank_size=(16, 4)
            )
            for r in range(3)
        ]
        before = client.get_state("short")
        errors: list[BaseException] = []

        def send(rank: int) -> None:
            try:
                ranks[rank](torch.randn(2, 4, requires_grad=True), torch.randn(2, 4))
            except AbortedError as error:
                errors.append(error)

        threads = [threading.Thread(target=send, args=(r,)) for r in (0, 2)]  # rank 1 is late
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 2
        assert all("rank(s) 1 of 3" in str(e) for e in errors)
        after = client.get_state("short")
        assert torch.equal(before["memory_bank.bank"], after["memory_bank.bank"])
        assert client.get_session("short").steps == 0


def test_ranks_that_disagree_on_a_shared_argument_fail_together(target: str) -> None:
    with LossClient(target) as client:
        session_id = f"disagree-{uuid.uuid4().hex[:6]}"
        ranks = [
            client.loss("MSNLoss", session_id=session_id, world_size=2, rank=r) for r in range(2)
        ]
        errors: list[BaseException] = []

        def send(rank: int) -> None:
            try:
                ranks[rank](torch.randn(8, 4), torch.randn(4, 4), torch.full((3, 4), rank + 1.0))
            except InvalidArgumentError as error:
                errors.append(error)

        threads = [threading.Thread(target=send, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 2 and all("`prototypes`" in str(e) for e in errors)
