"""Durable state: sessions and banks survive SIGTERM (bit-identical continuation),
SIGKILL (back to the last snapshot) and a corrupt snapshot file."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.client import LossClient, UnavailableError
from lossd.losses import DINOLoss, NTXentLoss, TiCoLoss, registry
from tests.conftest import start_server
from tests.processes import ServerProcess


def make_sessions(client: LossClient) -> dict[str, Any]:
    """The remote sessions of the test, by id, with the args of step k."""
    client.create_bank("shared", 32, 6, seed=3)
    return {
        "ntxent": client.loss(
            "NTXentLoss", session_id="ntxent", memory_bank_size=(32, 6), seed=1, temperature=0.2
        ),
        "dino": client.loss(
            "DINOLoss", session_id="dino", output_dim=6, warmup_teacher_temp_epochs=2
        ),
        "tico": client.loss("TiCoLoss", session_id="tico"),
        "on-bank": client.loss("NTXentLoss", session_id="on-bank", shared_bank="shared"),
    }


def step_args(name: str, k: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 * k + len(name))
    r = lambda: torch.randn(8, 6, generator=g)  # noqa: E731
    if name == "dino":
        return {"teacher_out": [r(), r()], "student_out": [r(), r(), r()], "epoch": k}
    if name == "tico":
        return {"z_a": r(), "z_b": r()}
    return {"out0": r().requires_grad_(True), "out1": r()}


def local_twins(client: LossClient) -> dict[str, torch.nn.Module]:
    """In-process losses starting from the sessions' current state (the uninterrupted run)."""
    twins = {
        "ntxent": NTXentLoss(temperature=0.2, memory_bank_size=(32, 6)),
        "dino": DINOLoss(output_dim=6, warmup_teacher_temp_epochs=2),
        "tico": TiCoLoss(),
        "on-bank": NTXentLoss(memory_bank_size=(32, 6)),
    }
    for name, twin in twins.items():
        twin.load_state_dict(client.get_state(name))
    return twins


def run_steps(remote: dict[str, Any], local: dict[str, torch.nn.Module], ks: range) -> None:
    """Steps on both sides; the bank shared by `on-bank` moves with it on both sides."""
    for k in ks:
        for name in remote:
            got = remote[name](**step_args(name, k))
            want = local[name](**step_args(name, k))
            assert torch.equal(got.detach(), want.detach()), (name, k)


def assert_state(client: LossClient, local: dict[str, torch.nn.Module]) -> None:
    for name, twin in local.items():
        remote_state = client.get_state(name)
        assert remote_state.keys() == twin.state_dict().keys(), name
        for key, value in twin.state_dict().items():
            assert torch.equal(remote_state[key], value), (name, key)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_sigterm_and_restart_continue_bit_identically(state_dir: Path) -> None:
    server = ServerProcess("--state-dir", str(state_dir), "--snapshot-interval", "0")
    with LossClient(server.target, retries=0) as client:
        remote = make_sessions(client)
        local = local_twins(client)
        run_steps(remote, local, range(3))
    assert server.terminate() == 0, server.output()
    assert "wrote 4 session(s) and 1 bank(s) on shutdown" in server.output()

    server = ServerProcess("--state-dir", str(state_dir))
    try:
        with LossClient(server.target, retries=0) as client:
            assert_state(client, local)
            again = make_sessions(client)  # the trainer attaches by id, as after a restart
            assert all(client.get_session(name).steps == 3 for name in again)
            run_steps(again, local, range(3, 5))
            assert_state(client, local)
            assert client.get_bank("shared").rows_written == 5 * 8
    finally:
        server.terminate()


def test_sigkill_restarts_from_the_last_snapshot(state_dir: Path) -> None:
    server = ServerProcess("--state-dir", str(state_dir), "--snapshot-interval", "0")
    with LossClient(server.target, retries=0) as client:
        remote = make_sessions(client)
        local = local_twins(client)
        run_steps(remote, local, range(2))
        assert client.snapshot() == (4, 1)
        assert client.snapshot() == (0, 0)  # nothing changed since
        snapshot_state = {name: client.get_state(name) for name in remote}
        run_steps(remote, local, range(2, 4))  # lost with the kill
    server.kill()
    server = ServerProcess("--state-dir", str(state_dir))
    try:
        with LossClient(server.target, retries=0) as client:
            for name, state in snapshot_state.items():
                restored = client.get_state(name)
                assert all(torch.equal(restored[k], v) for k, v in state.items()), name
                assert client.get_session(name).steps == 2
    finally:
        server.terminate()


def test_a_corrupt_snapshot_is_skipped(state_dir: Path) -> None:
    server = ServerProcess("--state-dir", str(state_dir), "--snapshot-interval", "0")
    with LossClient(server.target, retries=0) as client:
        make_sessions(client)
        expected = {name: client.get_state(name) for name in ("dino", "tico", "on-bank")}
    assert server.terminate() == 0
    files = sorted((state_dir / "sessions").glob("*.pt"))
    assert len(files) == 4
    victim = next(
        f for f in files if b"ntxent" in f.read_bytes() and b"on-bank" not in f.read_bytes()
    )
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    (state_dir / "sessions" / "garbage.pt").write_bytes(b"not a snapshot at all")
    server = ServerProcess("--state-dir", str(state_dir))
    try:
        assert "skipping unreadable snapshot" in server.output()
        with LossClient(server.target, retries=0) as client:
            names = {s.session_id for s in client.list_sessions()}
            assert names == {"dino", "tico", "on-bank"}
            for name, state in expected.items():
                assert all(torch.equal(client.get_state(name)[k], v) for k, v in state.items())
    finally:
        server.terminate()


def test_periodic_snapshots_write_what_changed(tmp_path: Path) -> None:
    server = start_server(state_dir=str(tmp_path), snapshot_interval_s=0.2)
    try:
        with LossClient(f"127.0.0.1:{server.port}") as client:
            loss = client.loss("DINOLoss", session_id="periodic", output_dim=4)
            loss([torch.randn(2, 4), torch.randn(2, 4)], [torch.randn(2, 4)] * 2)
            deadline = time.time() + 10
            while not list((tmp_path / "sessions").glob("*.pt")) and time.time() < deadline:
                time.sleep(0.05)
            assert list((tmp_path / "sessions").glob("*.pt"))
            client.delete_session("periodic")
            assert not list((tmp_path / "sessions").glob("*.pt"))  # deleted with the session
    finally:
        server.stop(grace=0)


class _Slow(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(1.0)
        return (x * x).sum()


@pytest.fixture
def slow_loss(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    spec = registry.LossSpec(_Slow, (registry.Arg("x", registry.Kind.TENSOR, grad=True),))
    monkeypatch.setitem(registry.LOSSES, "_Slow", spec)
    yield "_Slow"


def test_graceful_shutdown_finishes_running_steps_and_refuses_new_calls(
    slow_loss: str, tmp_path: Path
) -> None:
    server = start_server(state_dir=str(tmp_path))
    target = f"127.0.0.1:{server.port}"
    client = LossClient(target, retries=0)
    loss = client.loss(slow_loss, session_id="slow")
    x = torch.ones(3, requires_grad=True)
    results: list[Any] = []
    running = threading.Thread(target=lambda: results.append(loss(x)))
    running.start()
    time.sleep(0.3)  # the step is running
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 10.0})
    stopping.start()
    time.sleep(0.2)
    with grpc.insecure_channel(target) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=2)
                .status
            )
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as error:  # or the port already refuses
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    with LossClient(target, retries=0, timeout=5) as late, pytest.raises(UnavailableError):
        late.list_sessions()
    running.join()
    stopping.join()
    assert len(results) == 1 and results[0].item() == 3.0  # the running step finished
    assert list((tmp_path / "sessions").glob("*.pt"))  # and its session was written
    client.close()
