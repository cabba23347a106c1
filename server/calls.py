"""The one exit of every RPC: errors become statuses, failures are logged once, and each
call is counted in the metrics."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from .errors import InvalidArgument, status_of

log = logging.getLogger("lossd.server")
Handler = TypeVar("Handler", bound=Callable[..., Any])
_current = threading.local()


def note(loss: str = "", tenant: str | None = None) -> None:
    """Tell the running call which loss (and tenant) it is about, for metrics and logs."""
    if loss:
        _current.loss = loss
    if tenant is not None:
        _current.tenant = tenant


def rpc_method(method: Handler) -> Handler:
    """Wrap a unary servicer method: every exception leaves as one status, through one
    exit; the call is timed and counted."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        _current.loss, _current.tenant = "", ""
        start = time.perf_counter()
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(f"malformed request: {request.error}")
            response = method(self, request, context)
        except Exception as error:  # noqa: BLE001 - this is the one exit for all errors
            code, message = status_of(error)
            log_failure(method.__name__, request, code, message)
            _observe(self, method.__name__, code, start, request, None)
            context.abort(code, message)
        _observe(self, method.__name__, grpc.StatusCode.OK, start, request, response)
        return response

    return wrapper  # type: ignore[return-value]


def rpc_stream(method: Handler) -> Handler:
    """rpc_method for stream handlers (generators): a failure ends the stream with a
    status; a client that goes away ends it quietly."""

    @functools.wraps(method)
    def wrapper(
        self: Any, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        _current.loss, _current.tenant = "", ""
        try:
            yield from method(self, _checked(request_iterator), context)
            return
        except grpc.RpcError:
            log.debug("stream %s ended by the client", method.__name__)
            return
        except Exception as error:  # noqa: BLE001 - the one exit, as in rpc_method
            code, message = status_of(error)
            log_failure(method.__name__, None, code, message)
        context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Malformed):
            raise InvalidArgument(f"malformed message: {request.error}")
        yield request


def observe_step(
    servicer: Any, code: grpc.StatusCode, seconds: float, bytes_in: int, bytes_out: int
) -> None:
    """Count one step of a stream like a call."""
    metrics = getattr(servicer, "metrics", None)
    if metrics is not None:
        metrics.observe(
            "ComputeStream", getattr(_current, "loss", ""), code.name, seconds, bytes_in, bytes_out
        )


def log_failure(method: str, request: Any, code: grpc.StatusCode, message: str) -> None:
    """One structured line per failed call."""
    level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.WARNING
    log.log(
        level,
        "rpc failed method=%s tenant=%s session=%s request=%s status=%s message=%r",
        method,
        getattr(_current, "tenant", "") or "-",
        getattr(request, "session_id", "") or getattr(request, "name", "") or "-",
        getattr(request, "request_id", "") or "-",
        code.name,
        message,
    )


def _observe(
    servicer: Any, method: str, code: grpc.StatusCode, start: float, request: Any, response: Any
) -> None:
    metrics = getattr(servicer, "metrics", None)
    if metrics is None:
        return
    bytes_out = response.ByteSize() if response is not None else 0
    metrics.observe(
        method,
        getattr(_current, "loss", ""),
        code.name,
        time.perf_counter() - start,
        request.ByteSize(),
        bytes_out,
    )


class Malformed:
    """What a request that could not be parsed becomes (instead of an INTERNAL error in
    gRPC's own deserialization); `rpc_method` answers it with INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def ByteSize(self) -> int:  # mimics a message, for the metrics
        return 0


class SafeRequests(grpc.ServerInterceptor):
    """Parses requests without letting a malformed one (say, nested past protobuf's
    recursion limit) escape as INTERNAL: it reaches the servicer as a Malformed."""

    def intercept_service(
        self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _safe(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                handler.unary_unary,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                handler.stream_stream,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        return handler


def _safe(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def safe_parse(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the client's
            return Malformed(error)

    return safe_parse
