"""Exactly-once steps: a retried request id answers the first result, state moves once."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from lossd.client import LossClient
from lossd.server import LossdServer
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import lossd_pb2_grpc as pb_grpc
from tests.conftest import start_server


class LoseFirstReply(grpc.ServerInterceptor):
    """Lets the server apply each Compute, then loses the reply of its first attempt."""

    def __init__(self) -> None:
        self.lost: list[str] = []

    def intercept_service(
        self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.endswith("/Compute"):
            return handler
        inner = handler.unary_unary

        def compute(request: pb.ComputeRequest, context: grpc.ServicerContext) -> Any:
            reply = inner(request, context)  # the step is applied here
            if request.request_id not in self.lost:
                self.lost.append(request.request_id)
                context.abort(grpc.StatusCode.UNAVAILABLE, "reply lost on the way (test)")
            return reply

        return grpc.unary_unary_rpc_method_handler(
            compute,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.fixture
def lossy() -> Iterator[tuple[LossdServer, LoseFirstReply]]:
    interceptor = LoseFirstReply()
    server = start_server(interceptors=[interceptor])
    yield server, interceptor
    server.stop(grace=0)


def test_a_lost_reply_is_retried_and_the_bank_moves_once(
    lossy: tuple[LossdServer, LoseFirstReply],
) -> None:
    server, interceptor = lossy
    with LossClient(f"127.0.0.1:{server.port}") as client:
        loss = client.loss("NTXentLoss", memory_bank_size=(32, 6), seed=0)
        out0 = torch.randn(8, 6, requires_grad=True)
        value = loss(out0, torch.randn(8, 6))
        value.backward()
        assert len(interceptor.lost) == 1, "the first reply was lost and the call retried"
        assert int(loss.state_dict()["memory_bank.bank_ptr"]) == 8  # enqueued once
        assert client.get_session(loss.session_id).steps == 1
        assert out0.grad is not None


def test_the_same_request_id_answers_the_first_result(client: LossClient, target: str) -> None:
    session = client.create_session("MemoryBankModule", size=[16, 2], seed=0)
    request = pb.ComputeRequest(session_id=session.session_id, request_id=uuid.uuid4().hex)
    codec.encode_values({"output": torch.ones(3, 2), "update": True}, request.args)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.LossServiceStub(channel)
        first, again = stub.Compute(request), stub.Compute(request)
    assert first == again and first.steps == 1
    assert client.get_session(session.session_id).steps == 1
    assert int(client.get_state(session.session_id)["bank_ptr"]) == 3


class BreakFirstStream(grpc.ServerInterceptor):
    """Applies the first step of the first ComputeStream, then resets that stream instead
    of answering (as a proxy resetting an idle stream would)."""

    def __init__(self) -> None:
        self.broken = 0

    def intercept_service(
        self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.endswith("/ComputeStream"):
            return handler
        inner = handler.stream_stream

        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for reply in inner(requests, context):
                if self.broken == 0:
                    self.broken += 1
                    context.abort(grpc.StatusCode.INTERNAL, "Stream removed (test)")
                yield reply

        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def test_a_broken_stream_is_reopened_and_the_step_applied_once() -> None:
    interceptor = BreakFirstStream()
    server = start_server(interceptors=[interceptor])
    try:
        with LossClient(f"127.0.0.1:{server.port}", stream=True) as client:
            loss = client.loss("NTXentLoss", memory_bank_size=(32, 6), seed=0)
            loss(torch.randn(8, 6, requires_grad=True), torch.randn(8, 6)).backward()
            assert interceptor.broken == 1
            assert int(loss.state_dict()["memory_bank.bank_ptr"]) == 8
            assert client.get_session(loss.session_id).steps == 1
    finally:
        server.stop(grace=0)
