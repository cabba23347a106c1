"""Every status-code path, through the real server with the raw stub; after each failure
the session's state and step count are unchanged and the server still answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lossd.losses import registry
from lossd.server import LossdServer
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from lossd.v1 import tensor_pb2 as tpb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def stub(target: str) -> Iterator[pb_grpc.LossServiceStub]:
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.LossServiceStub(channel)


def create(stub: pb_grpc.LossServiceStub, loss: str, **config: Any) -> str:
    request = pb.CreateSessionRequest(loss=loss, seed=0)
    codec.encode_values(config, request.config)
    return stub.CreateSession(request).session_id


def compute_request(session_id: str, **args: Any) -> pb.ComputeRequest:
    request = pb.ComputeRequest(session_id=session_id, request_id=uuid.uuid4().hex)
    codec.encode_values(args, request.args, wants_grad=lambda t: t.is_floating_point())
    return request


def expect(code: grpc.StatusCode, call: Any, request: Any, *words: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == code, info.value.details()
    details = info.value.details()
    for word in words:
        assert word in details, details
    assert "Traceback" not in details
    return details


def snapshot(stub: pb_grpc.LossServiceStub, session_id: str) -> tuple[int, dict[str, torch.Tensor]]:
    state = stub.GetState(pb.GetStateRequest(session_id=session_id))
    return state.steps, {k: t.clone() for k, t in codec.decode_tensors(state.tensors).items()}


def assert_unchanged(
    before: tuple[int, dict[str, torch.Tensor]], after: tuple[int, dict[str, torch.Tensor]]
) -> None:
    assert before[0] == after[0]
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k]), k


@pytest.fixture
def bank_session(stub: pb_grpc.LossServiceStub) -> str:
    """An NTXent session with a (16, 4) bank that has seen one step."""
    session_id = create(stub, "NTXentLoss", memory_bank_size=[16, 4])
    stub.Compute(compute_request(session_id, out0=torch.randn(4, 4), out1=torch.randn(4, 4)))
    return session_id


def _raw_tensor(shape: list[int], data: bytes, dtype: int = tpb.FLOAT32) -> tpb.Value:
    return tpb.Value(tensor=tpb.Tensor(dtype=dtype, shape=shape, data=data, requires_grad=True))


BAD_ARGS = {
    "byte length": ({"out0": _raw_tensor([4, 4], b"\0" * 60)}, ["out0", "64 bytes"]),
    "negative dim": ({"out0": _raw_tensor([-1, 4], b"")}, ["out0", "non-negative"]),
    "absurd dims": ({"out0": _raw_tensor([1] * 40, b"\0\0\0\0")}, ["out0"]),
    "unknown dtype": ({"out0": _raw_tensor([1], b"\0\0\0\0", dtype=99)}, ["out0", "dtype"]),
    "no value": ({"out0": tpb.Value()}, ["out0"]),
    "unknown argument": ({"out2": codec.encode_value(torch.ones(4, 4))}, ["out2", "out0"]),
    "wrong kind": ({"out0": codec.encode_value([torch.ones(4, 4)])}, ["out0", "a tensor"]),
    "int tensor": (
        {"out0": codec.encode_value(torch.ones(4, 4, dtype=torch.int64))},
        ["out0", "floating"],
    ),
    "nan": ({"out0": codec.encode_value(torch.full((4, 4), float("nan")))}, ["out0", "finite"]),
    "inf": ({"out1": codec.encode_value(torch.full((4, 4), float("inf")))}, ["out1", "finite"]),
    "shape mismatch": ({"out1": codec.encode_value(torch.ones(5, 4))}, ["out1", "(4, 4)"]),
    "3-d": ({"out0": codec.encode_value(torch.ones(4, 4, 1))}, ["out0", "2-D"]),
    "deep nesting": (
        {"out0": codec.encode_value([[[[[[[[[[torch.ones(1)]]]]]]]]]])},
        ["out0", "nested"],
    ),
}


@pytest.mark.parametrize("bad", list(BAD_ARGS), ids=list(BAD_ARGS))
def test_bad_arguments_are_invalid_and_change_nothing(
    stub: pb_grpc.LossServiceStub, bank_session: str, bad: str
) -> None:
    overrides, words = BAD_ARGS[bad]
    request = compute_request(bank_session, out0=torch.randn(4, 4), out1=torch.randn(4, 4))
    for name, value in overrides.items():
        request.args[name].CopyFrom(value)
    before = snapshot(stub, bank_session)
    expect(INVALID, stub.Compute, request, *words)
    assert_unchanged(before, snapshot(stub, bank_session))


def test_missing_argument(stub: pb_grpc.LossServiceStub, bank_session: str) -> None:
    before = snapshot(stub, bank_session)
    expect(INVALID, stub.Compute, compute_request(bank_session, out0=torch.randn(4, 4)), "out1")
    assert_unchanged(before, snapshot(stub, bank_session))


def test_input_against_state_is_failed_precondition(
    stub: pb_grpc.LossServiceStub, bank_session: str
) -> None:
    before = snapshot(stub, bank_session)
    request = compute_request(bank_session, out0=torch.randn(4, 5), out1=torch.randn(4, 5))
    expect(grpc.StatusCode.FAILED_PRECONDITION, stub.Compute, request, "out1", "memory bank")
    assert_unchanged(before, snapshot(stub, bank_session))


@pytest.mark.parametrize(
    "config, words",
    [
        ({"temperature": 0.0}, ["temperature"]),
        ({"temperature": "warm"}, ["temperature", "number"]),
        ({"memory_bank_size": [-1, 4]}, ["memory_bank_size"]),
        ({"tempreature": 0.5}, ["tempreature"]),
    ],
)
def test_bad_config_is_invalid(
    stub: pb_grpc.LossServiceStub, config: dict[str, Any], words: list[str]
) -> None:
    request = pb.CreateSessionRequest(loss="NTXentLoss")
    codec.encode_values(config, request.config)
    expect(INVALID, stub.CreateSession, request, *words)


def test_unknown_loss_is_invalid(stub: pb_grpc.LossServiceStub) -> None:
    expect(
        INVALID,
        stub.CreateSession,
        pb.CreateSessionRequest(loss="NoSuchLoss"),
        "NoSuchLoss",
        "NTXentLoss",
    )


def test_unknown_device_is_invalid(stub: pb_grpc.LossServiceStub) -> None:
    request = pb.CreateSessionRequest(loss="NTXentLoss", device="cuda:7")
    expect(INVALID, stub.CreateSession, request, "device")


@pytest.mark.parametrize(
    "method, request_type",
    [
        ("GetSession", pb.GetSessionRequest),
        ("DeleteSession", pb.DeleteSessionRequest),
        ("GetState", pb.GetStateRequest),
        ("SetState", pb.SetStateRequest),
        ("Compute", pb.ComputeRequest),
    ],
)
def test_unknown_session_is_not_found(
    stub: pb_grpc.LossServiceStub, method: str, request_type: Any
) -> None:
    expect(
        grpc.StatusCode.NOT_FOUND,
        getattr(stub, method),
        request_type(session_id="no-such-session"),
        "no-such-session",
    )


def test_same_id_other_config_already_exists(stub: pb_grpc.LossServiceStub) -> None:
    first = pb.CreateSessionRequest(loss="NTXentLoss", session_id="taken")
    codec.encode_values({"temperature": 0.3}, first.config)
    assert stub.CreateSession(first).created
    other = pb.CreateSessionRequest(loss="NTXentLoss", session_id="taken")
    codec.encode_values({"temperature": 0.4}, other.config)
    expect(grpc.StatusCode.ALREADY_EXISTS, stub.CreateSession, other, "taken", "0.3", "0.4")
    expect(
        grpc.StatusCode.ALREADY_EXISTS,
        stub.CreateSession,
        pb.CreateSessionRequest(loss="DCLLoss", session_id="taken"),
        "DCLLoss",
    )
    assert not stub.CreateSession(first).created  # same config: attaches


@pytest.mark.parametrize(
    "tensors, code, words",
    [
        (
            {"memory_bank.bank": torch.randn(8, 4), "memory_bank.bank_ptr": torch.zeros(1).long()},
            grpc.StatusCode.FAILED_PRECONDITION,
            ["memory_bank.bank"],
        ),
        ({"memory_bank.bank": torch.randn(16, 4)}, INVALID, ["memory_bank.bank_ptr", "missing"]),
        (
            {
                "memory_bank.bank": torch.randn(16, 4),
                "memory_bank.bank_ptr": torch.zeros(1).long(),
                "center": torch.zeros(3),
            },
            INVALID,
            ["center"],
        ),
        (
            {
                "memory_bank.bank": torch.full((16, 4), float("nan")),
                "memory_bank.bank_ptr": torch.zeros(1).long(),
            },
            INVALID,
            ["finite"],
        ),
        (
            {"memory_bank.bank": torch.randn(16, 4), "memory_bank.bank_ptr": torch.tensor([99])},
            grpc.StatusCode.FAILED_PRECONDITION,
            ["bank_ptr"],
        ),
    ],
)
def test_bad_state_changes_nothing(
    stub: pb_grpc.LossServiceStub,
    bank_session: str,
    tensors: dict[str, torch.Tensor],
    code: grpc.StatusCode,
    words: list[str],
) -> None:
    before = snapshot(stub, bank_session)
    request = pb.SetStateRequest(session_id=bank_session)
    codec.encode_tensors(tensors, request.tensors)
    expect(code, stub.SetState, request, *words)
    assert_unchanged(before, snapshot(stub, bank_session))


class _Broken(torch.nn.Module):
    """A loss that fails the way a bug would: not with a ValueError."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("secret internal detail")


def test_unexpected_errors_are_internal_without_details(
    stub: pb_grpc.LossServiceStub,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = registry.LossSpec(_Broken, (registry.Arg("x", registry.Kind.TENSOR),))
    monkeypatch.setitem(registry.LOSSES, "_Broken", spec)
    session_id = stub.CreateSession(pb.CreateSessionRequest(loss="_Broken")).session_id
    details = expect(
        grpc.StatusCode.INTERNAL,
        stub.Compute,
        compute_request(session_id, x=torch.ones(2)),
        "incident",
    )
    assert "secret" not in details
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)
    assert stub.GetSession(pb.GetSessionRequest(session_id=session_id)).steps == 0


def test_server_keeps_serving(server: LossdServer, target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lossd.v1.LossService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
