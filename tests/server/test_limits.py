"""Limits: state bytes at creation (never an out-of-memory crash), sessions per tenant,
message size, and the bounded queue of steps."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from lossd.client import LossClient, ResourceExhaustedError
from lossd.losses import registry
from lossd.server import LossdServer
from lossd.server.limits import MIB, Limits
from tests.conftest import start_server


@pytest.fixture
def small() -> Iterator[LossdServer]:
    limits = Limits(
        max_sessions_per_tenant=3,
        max_session_state_bytes=4 * MIB,
        max_state_bytes=6 * MIB,
        max_concurrent_steps=1,
        max_queued_steps=1,
    )
    server = start_server(limits=limits, max_message_mb=1)
    yield server
    server.stop(grace=0)


def connect(server: LossdServer) -> LossClient:
    return LossClient(f"127.0.0.1:{server.port}", retries=0)


def test_a_billion_row_bank_is_refused_before_allocation(client: LossClient) -> None:
    with pytest.raises(ResourceExhaustedError, match="MiB"):
        client.create_bank("huge", 10**9, 128)
    with pytest.raises(ResourceExhaustedError):
        client.loss("NTXentLoss", memory_bank_size=(10**9, 128))
    with pytest.raises(ResourceExhaustedError):
        client.loss("NTXentLoss", memory_bank_size=10**12)  # dim from the first batch
    assert client.list_sessions() is not None  # the server is fine


def test_state_limits_per_session_and_server(small: LossdServer) -> None:
    with connect(small) as client:
        with pytest.raises(ResourceExhaustedError, match="per session"):
            client.loss("NTXentLoss", memory_bank_size=(8192, 256))  # 8 MiB
        client.loss("NTXentLoss", memory_bank_size=(4000, 256))  # 3.9 MiB
        with pytest.raises(ResourceExhaustedError, match="in use"):
            client.create_bank("more", 4096, 256)


def test_sessions_per_tenant(small: LossdServer) -> None:
    with connect(small) as client:
        for _ in range(3):
            client.loss("DCLLoss")
        with pytest.raises(ResourceExhaustedError, match="3 sessions"):
            client.loss("DCLLoss")


def test_messages_larger_than_the_limit(small: LossdServer) -> None:
    with connect(small) as client:
        loss = client.loss("VICRegLoss")
        with pytest.raises(ResourceExhaustedError):
            loss(torch.randn(1024, 512), torch.randn(1024, 512))  # 4 MiB > 1 MiB


class _Slow(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.5)
        return x.sum()


def test_a_full_queue_refuses_steps(small: LossdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.LossSpec(_Slow, (registry.Arg("x", registry.Kind.TENSOR),))
    monkeypatch.setitem(registry.LOSSES, "_Slow", spec)
    with connect(small) as client:
        losses = [client.loss("_Slow") for _ in range(3)]
        outcomes: list[str] = []

        def step(loss: torch.nn.Module) -> None:
            try:
                loss(torch.ones(2))
                outcomes.append("ok")
            except ResourceExhaustedError as error:
                outcomes.append(str(error))

        threads = [threading.Thread(target=step, args=(loss,)) for loss in losses]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    # one computes, one waits, the third finds the queue full
    assert sorted(outcomes)[:2] == ["ok", "ok"]
    assert "busy" in sorted(outcomes)[2]
