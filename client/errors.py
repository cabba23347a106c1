"""lossd's exceptions. Each also subclasses what in-process code raises for the same
mistake, so `except ValueError` works the same with a local or a remote loss."""

from __future__ import annotations

import grpc


class LossdError(Exception):
    """Base of every error the client raises. `code` is the gRPC status code name."""

    code = "UNKNOWN"

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class InvalidArgumentError(LossdError, ValueError):
    """A bad constructor config, forward argument, shape, dtype or a non-finite value."""

    code = "INVALID_ARGUMENT"


class NotFoundError(LossdError, LookupError):
    """An unknown loss, session or bank."""

    code = "NOT_FOUND"


class SessionNotFoundError(NotFoundError, KeyError):
    """No session with this id on the server (or on this replica behind a balancer)."""


class BankNotFoundError(NotFoundError, KeyError):
    """No shared bank with this name on the server (or on this replica)."""


class AlreadyExistsError(LossdError, ValueError):
    """The session id is taken by another loss or config."""

    code = "ALREADY_EXISTS"


class FailedPreconditionError(LossdError, ValueError):
    """The input or state does not fit the session's state (e.g. another feature dim)."""

    code = "FAILED_PRECONDITION"


class ResourceExhaustedError(LossdError, RuntimeError):
    """A server limit was hit: sessions, state bytes, message size or queue."""

    code = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(LossdError, PermissionError):
    """Missing or unknown token."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(LossdError, PermissionError):
    code = "PERMISSION_DENIED"


class AbortedError(LossdError, RuntimeError):
    """The step was abandoned (e.g. a rank of a global batch did not arrive)."""

    code = "ABORTED"


class UnavailableError(LossdError, ConnectionError):
    """The server cannot be reached or is shutting down."""

    code = "UNAVAILABLE"


class DeadlineExceededError(LossdError, TimeoutError):
    """The call took longer than its timeout."""

    code = "DEADLINE_EXCEEDED"


class InternalError(LossdError, RuntimeError):
    """The server failed unexpectedly; the details are in its log."""

    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[LossdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_rpc_error(error: grpc.RpcError, target: str) -> LossdError:
    """The lossd exception for a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(code)
    return from_status(code, details, target)


def from_status(code: grpc.StatusCode, details: str, target: str) -> LossdError:
    """The lossd exception for a status code and message."""
    cls = _BY_CODE.get(code, InternalError)
    if cls is NotFoundError and details.startswith(("session ", "bank ")):
        kind = SessionNotFoundError if details.startswith("session ") else BankNotFoundError
        return kind(
            f"{details} ({target}); behind a load balancer, it is not on the replica that answered"
        )
    if cls is UnavailableError:
        details = f"lossd server at {target} is unavailable: {details}"
    return cls(details)
