"""The same-host fast path: tensors through a shared-memory region per session, released
on close, on delete and when the client dies; and float16/bfloat16 on the wire."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch

from lossd.client import LossClient
from lossd.losses import DINOLoss, NTXentLoss
from lossd.server import LossdServer
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from tests.conftest import start_server

ROOT = Path(__file__).resolve().parents[2]


def dino_step(loss: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(32, 2048, generator=g) for _ in range(2)]
    student = [torch.randn(32, 2048, generator=g, requires_grad=True) for _ in range(2)]
    value = loss(teacher, student, epoch=0)
    value.backward()
    return value.detach(), [s.grad for s in student]


def regions_of(server: LossdServer, session_id: str) -> dict[str, object]:
    return server.store.get("", session_id).regions


def test_shared_memory_equals_the_wire_and_releases_on_close(
    server: LossdServer, target: str
) -> None:
    client = LossClient(target, shared_memory=True)
    remote = client.loss("DINOLoss", output_dim=2048)
    value, grads = dino_step(remote)
    expected, expected_grads = dino_step(DINOLoss(output_dim=2048))
    assert torch.equal(value, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert len(regions_of(server, remote.session_id)) == 1
    assert not list(Path("/dev/shm").glob(f"lossd-{os.getpid()}-*")), "names are unlinked"
    value, _ = dino_step(remote)  # the region is reused
    client.close()
    deadline = time.time() + 5
    while regions_of(server, remote.session_id) and time.time() < deadline:
        time.sleep(0.05)
    assert not regions_of(server, remote.session_id)


def test_a_larger_step_grows_the_region(server: LossdServer, target: str) -> None:
    with LossClient(target, shared_memory=True) as client:
        remote = client.loss("NTXentLoss")
        for batch in (8, 4096):
            x, y = torch.randn(batch, 64, requires_grad=True), torch.randn(batch, 64)
            local_x = x.detach().clone().requires_grad_(True)
            remote(x, y).backward()
            NTXentLoss()(local_x, y).backward()
            torch.testing.assert_close(x.grad, local_x.grad)
        (region,) = regions_of(server, remote.session_id).values()
        assert region.size >= 4096 * 64 * 4 * 2


def test_deleting_the_session_releases_its_region(server: LossdServer, target: str) -> None:
    with LossClient(target, shared_memory=True) as client:
        remote = client.loss("VICRegLoss")
        remote(torch.randn(8, 4), torch.randn(8, 4))
        session = server.store.get("", remote.session_id)
        assert session.regions
        client.delete_session(remote.session_id)
        assert not session.regions


CRASH = """
    import os, sys, time, torch
    from lossd.client import LossClient
    client = LossClient(sys.argv[1], shared_memory=True)
    loss = client.loss("VICRegLoss", session_id=sys.argv[2])
    loss(torch.randn(8, 4), torch.randn(8, 4))
    print("ready", flush=True)
    time.sleep(60)
"""


def test_a_crashed_client_leaves_nothing_behind(server: LossdServer, target: str) -> None:
    session_id = f"crash-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CRASH), target, session_id],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    assert regions_of(server, session_id)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while regions_of(server, session_id) and time.time() < deadline:
        time.sleep(0.05)
    assert not regions_of(server, session_id)
    assert not list(Path("/dev/shm").glob(f"lossd-{proc.pid}-*"))


def test_a_server_without_shared_memory_falls_back_to_the_wire() -> None:
    plain = start_server()
    try:
        with LossClient(f"127.0.0.1:{plain.port}", shared_memory=True) as client:
            remote = client.loss("DINOLoss", output_dim=2048)
            value, _ = dino_step(remote)
            assert torch.equal(value, dino_step(DINOLoss(output_dim=2048))[0])
    finally:
        plain.stop(grace=0)


def test_regions_are_private_to_their_session(server: LossdServer, target: str) -> None:
    with LossClient(target, shared_memory=True) as client:
        owner = client.loss("VICRegLoss")
        owner(torch.randn(8, 4), torch.randn(8, 4))
        (name,) = regions_of(server, owner.session_id)
        other = client.create_session("VICRegLoss").session_id
    request = pb.ComputeRequest(session_id=other, request_id=uuid.uuid4().hex)
    codec.encode_values({"z_a": torch.randn(8, 4), "z_b": torch.randn(8, 4)}, request.args)
    request.args["z_a"].tensor.ClearField("data")
    request.args["z_a"].tensor.shared.region = name
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.LossServiceStub(channel).Compute(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has not attached" in info.value.details()


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_wire(target: str, wire: torch.dtype) -> None:
    with LossClient(target, wire_dtype=wire) as client:
        remote = client.loss("NTXentLoss", temperature=0.2)
        x = torch.randn(64, 32, requires_grad=True)
        y = torch.randn(64, 32)
        value = remote(x, y)
        value.backward()
    local_x = x.detach().clone().requires_grad_(True)
    expected = NTXentLoss(temperature=0.2)(local_x, y)
    expected.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == torch.float32
    rtol = 1e-2 if wire == torch.bfloat16 else 2e-3
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=rtol, atol=0)
    torch.testing.assert_close(x.grad, local_x.grad, rtol=rtol * 5, atol=rtol * 1e-2)
    assert not torch.equal(x.grad, local_x.grad)  # it did travel in half precision
