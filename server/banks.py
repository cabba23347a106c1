"""Shared memory banks: named queues of embeddings that outlive and outnumber sessions."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import torch

from lossd.losses import MemoryBankModule

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

_RNG_LOCK = threading.Lock()
BANK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_NAME_LENGTH = 128


@dataclass
class SharedBank:
    """One named bank: a MemoryBankModule holding the rows (num_features, dim) and pointer.

    Sessions attached to it share its tensors and cursor. `lock` makes a step atomic for
    the bank: take it after the session's lock, for the whole step (read, compute, enqueue).
    """

    name: str
    module: MemoryBankModule
    device: torch.device
    created_at: float = field(default_factory=time.time)
    sessions: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """(num_features, dim)."""
        assert self.module.bank is not None
        return int(self.module.bank.shape[0]), int(self.module.bank.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        assert self.module.bank is not None
        return self.module.bank.dtype

    @property
    def pointer(self) -> int:
        """The row the next enqueue goes to."""
        return self.module.cursor.ptr

    @property
    def rows_written(self) -> int:
        """Rows stored since creation."""
        return self.module.cursor.rows_written

    def nbytes(self) -> int:
        assert self.module.bank is not None
        return self.module.bank.numel() * self.module.bank.element_size()


class BankStore:
    """All shared banks of a server, by name. Thread-safe."""

    def __init__(self) -> None:
        self._banks: dict[str, SharedBank] = {}
        self._lock = threading.Lock()

    def create(self, name: str, num_features: int, dim: int, dtype: torch.dtype,
               device: torch.device, seed: int | None = None) -> tuple[SharedBank, bool]:
        """Create a bank, or return the existing one of the same shape and dtype.

        Returns (bank, created); AlreadyExists when the name has another shape or dtype.
        """
        _check_bank_args(name, num_features, dim, dtype)
        existing = self.find(name)
        if existing is None:
            candidate = SharedBank(name, _new_bank(num_features, dim, dtype, device, seed), device)
            with self._lock:
                existing = self._banks.setdefault(name, candidate)
            if existing is candidate:
                return candidate, True
        if existing.shape != (num_features, dim) or existing.dtype != dtype:
            raise AlreadyExists(
                f"bank {name!r} exists with shape {existing.shape} and {existing.dtype}; "
                f"asked for {(num_features, dim)} and {dtype}")
        return existing, False

    def find(self, name: str) -> SharedBank | None:
        with self._lock:
            return self._banks.get(name)

    def get(self, name: str) -> SharedBank:
        """The bank called `name`; NotFound otherwise."""
        bank = self.find(name)
        if bank is None:
            raise NotFound(f"bank {name!r} not found on this server")
        return bank

    def list(self) -> list[SharedBank]:
        with self._lock:
            return sorted(self._banks.values(), key=lambda b: b.created_at)

    def delete(self, name: str) -> None:
        """Remove a bank no session is attached to."""
        with self._lock:
            bank = self._banks.get(name)
            if bank is None:
                raise NotFound(f"bank {name!r} not found on this server")
            if bank.sessions:
                raise FailedPrecondition(
                    f"bank {name!r} is used by session(s) {', '.join(sorted(bank.sessions))}; "
                    "delete them first")
            del self._banks[name]

    def restore(self, bank: SharedBank) -> None:
        """Put a bank back (from a snapshot); replaces one of the same name."""
        with self._lock:
            self._banks[bank.name] = bank


def _check_bank_args(name: str, num_features: int, dim: int, dtype: torch.dtype) -> None:
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidArgument(f"Expected `name` to be 1 to {MAX_NAME_LENGTH} printable "
                              f"characters, but got {name[:MAX_NAME_LENGTH]!r}.")
    if num_features < 1 or dim < 1:
        raise InvalidArgument(f"Expected `num_features` and `dim` to be >= 1, but got "
                              f"{num_features} and {dim}.")
    if dtype not in BANK_DTYPES:
        raise InvalidArgument(f"Expected `dtype` to be a floating dtype, but got {dtype}.")


def _new_bank(num_features: int, dim: int, dtype: torch.dtype, device: torch.device,
              seed: int | None) -> MemoryBankModule:
    """A MemoryBankModule of random unit rows (lightly's init), seeded."""
    seed = secrets.randbits(63) if seed is None else seed
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MemoryBankModule(size=(num_features, dim), feature_dim_first=False)
    return module.to(device=device, dtype=dtype)
