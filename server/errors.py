"""The errors the server answers with, and the one place they become gRPC statuses."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from lossd.losses._checks import StateMismatchError

log = logging.getLogger("lossd.server")


class ServiceError(Exception):
    """An expected failure with a status code; its message goes to the client."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message of an exception.

    Loss code raises ValueError for bad input (StateMismatchError when the input does not
    fit existing state); anything else is unexpected and its details stay in the log.
    """
    if isinstance(error, ServiceError):
        return error.code, str(error)
    if isinstance(error, StateMismatchError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error)
    if isinstance(error, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the server log)"


Handler = TypeVar("Handler", bound=Callable[..., Any])


def rpc_method(method: Handler) -> Handler:
    """Wrap a servicer method: every exception leaves as one status, through one exit."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - this is the one exit for all errors
            code, message = status_of(error)
            log_failure(method.__name__, request, code, message)
        context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def rpc_stream(method: Handler) -> Handler:
    """rpc_method for stream handlers (generators): a failure ends the stream with a status."""

    @functools.wraps(method)
    def wrapper(self: Any, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request_iterator, context)
            return
        except grpc.RpcError:  # the client cancelled or went away: nothing to answer
            log.debug("stream %s ended by the client", method.__name__)
            return
        except Exception as error:  # noqa: BLE001 - the one exit, as in rpc_method
            code, message = status_of(error)
            log_failure(method.__name__, None, code, message)
        context.abort(code, message)

    return wrapper  # type: ignore[return-value]


def log_failure(method: str, request: Any, code: grpc.StatusCode, message: str) -> None:
    """One structured line per failed call."""
    log.warning(
        "rpc failed method=%s session=%s request=%s status=%s message=%r",
        method,
        getattr(request, "session_id", "") or "-",
        getattr(request, "request_id", "") or "-",
        code.name,
        message,
    )
