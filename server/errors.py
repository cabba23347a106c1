"""The errors the server answers with, and the one place they become gRPC statuses."""

from __future__ import annotations

import logging
import uuid

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

    Loss code and the codec raise ValueError for bad input (StateMismatchError when the
    input does not fit existing state): that is INVALID_ARGUMENT everywhere, so callers
    need not convert it. Anything else is unexpected and its details stay in the log.
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
