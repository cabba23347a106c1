"""The lossd client: LossClient, remote loss modules and lossd's exceptions.

Every loss of the catalog is importable from here as a drop-in class with the
in-process constructor and forward::

    from lossd.client import NTXentLoss
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 128), server="gpu:50051")
"""

from .connection import BankInfo, LossClient, LossInfo, SessionInfo
from .dropin import DROPIN_CLASSES
from .errors import (
    AbortedError,
    AlreadyExistsError,
    BankNotFoundError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LossdError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SessionNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from .remote import RemoteLoss

globals().update(DROPIN_CLASSES)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "BankInfo",
    "BankNotFoundError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LossClient",
    "LossInfo",
    "LossdError",
    "NotFoundError",
    "PermissionDeniedError",
    "RemoteLoss",
    "ResourceExhaustedError",
    "SessionInfo",
    "SessionNotFoundError",
    "UnauthenticatedError",
    "UnavailableError",
    *DROPIN_CLASSES,
]
