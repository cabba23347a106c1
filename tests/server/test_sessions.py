"""Session lifecycle: create, attach, get, list, delete, idle expiry, per-session locks."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lossd.client import AlreadyExistsError, LossClient, SessionNotFoundError
from tests.conftest import start_server


def test_create_attach_get_list_delete(client: LossClient) -> None:
    first = client.create_session("NTXentLoss", session_id="lifecycle", temperature=0.3)
    assert first.created and first.loss == "NTXentLoss"
    assert first.config["temperature"] == 0.3 and first.config["memory_bank_size"] == 0
    again = client.create_session("NTXentLoss", session_id="lifecycle", temperature=0.3)
    assert not again.created and again.session_id == "lifecycle"
    # Defaults spelled out attach to the same session as defaults left out.
    explicit = client.create_session(
        "NTXentLoss",
        session_id="lifecycle",
        temperature=0.3,
        memory_bank_size=0,
        gather_distributed=False,
    )
    assert not explicit.created
    with pytest.raises(AlreadyExistsError):
        client.create_session("NTXentLoss", session_id="lifecycle", temperature=0.5)
    assert client.get_session("lifecycle").steps == 0
    assert "lifecycle" in {s.session_id for s in client.list_sessions()}
    client.delete_session("lifecycle")
    with pytest.raises(SessionNotFoundError):
        client.get_session("lifecycle")
    with pytest.raises(KeyError):
        client.delete_session("lifecycle")


def test_server_chooses_unique_ids(client: LossClient) -> None:
    ids = {client.create_session("VICRegLoss").session_id for _ in range(5)}
    assert len(ids) == 5


def test_session_info_reports_state_bytes_and_steps(client: LossClient) -> None:
    loss = client.loss("NTXentLoss", memory_bank_size=(32, 8))
    info = client.get_session(loss.session_id)
    assert info.state_bytes == 32 * 8 * 4 + 8
    loss(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8))
    assert client.get_session(loss.session_id).steps == 1


def test_seed_makes_the_initial_bank_reproducible(client: LossClient) -> None:
    a = client.loss("NTXentLoss", memory_bank_size=(8, 4), seed=7).state_dict()
    b = client.loss("NTXentLoss", memory_bank_size=(8, 4), seed=7).state_dict()
    c = client.loss("NTXentLoss", memory_bank_size=(8, 4), seed=8).state_dict()
    assert torch.equal(a["memory_bank.bank"], b["memory_bank.bank"])
    assert not torch.equal(a["memory_bank.bank"], c["memory_bank.bank"])
    torch.manual_seed(7)
    expected = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    assert torch.equal(a["memory_bank.bank"], expected)  # lightly's init, from the seed


def test_idle_sessions_expire() -> None:
    server = start_server(session_ttl_s=0.5)
    try:
        with LossClient(f"127.0.0.1:{server.port}") as client:
            idle = client.create_session("DCLLoss").session_id
            busy = client.loss("DCLLoss")
            deadline = time.time() + 10
            while time.time() < deadline:
                busy(torch.randn(4, 3), torch.randn(4, 3))  # keeps `busy` fresh
                if idle not in {s.session_id for s in client.list_sessions()}:
                    break
                time.sleep(0.1)
            sessions = {s.session_id for s in client.list_sessions()}
            assert idle not in sessions and busy.session_id in sessions
    finally:
        server.stop(grace=0)


def test_steps_of_one_session_are_serialized(client: LossClient) -> None:
    """Concurrent steps on one bank session: every enqueue lands, none is torn."""
    loss = client.loss("MemoryBankModule", size=(64, 2), feature_dim_first=False)
    rows = [torch.full((1, 2), float(i)) for i in range(64)]
    threads = [threading.Thread(target=lambda r=r: loss(r, update=True)) for r in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = loss.state_dict()
    assert int(state["bank_ptr"]) == 0  # exactly 64 rows went in
    assert sorted(state["bank"][:, 0].tolist()) == [float(i) for i in range(64)]
    assert client.get_session(loss.session_id).steps == 64


def test_reflection_lists_the_service(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]))))
        names = {s.name for s in reply.list_services_response.service}
    assert {"lossd.v1.LossService", "grpc.health.v1.Health"} <= names


def test_attach_only_never_creates(client: LossClient) -> None:
    with pytest.raises(SessionNotFoundError):
        client.loss("NTXentLoss", session_id="resume-me", attach_only=True)
    client.loss("NTXentLoss", session_id="resume-me")
    resumed = client.loss("NTXentLoss", session_id="resume-me", attach_only=True)
    assert not resumed.session.created
