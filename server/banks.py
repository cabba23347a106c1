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


@dataclass
class SharedBank:
    """One named bank: a MemoryBankModule holding the rows (num_features, dim) and pointer.

    Sessions attached to it share its tensors and cursor. `lock` makes a step atomic for
    the bank: take it after the session's lock, for the whole step (read, compute, enqueue).
    """

    tenant: str
    name: str
    module: MemoryBankModule
    device: torch.device
    created_at: float = field(default_factory=time.time)
    sessions: set[str] = field(default_factory=set)
    version: int = 0  # counts state changes (for snapshots)
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
    """All shared banks of a server, by (tenant, name). Thread-safe."""

    def __init__(self) -> None:
        self._banks: dict[tuple[str, str], SharedBank] = {}
        self._lock = threading.Lock()

    def create(
        self,
        tenant: str,
        name: str,
        num_features: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int | None = None,
    ) -> tuple[SharedBank, bool]:
        """Create a bank, or return the existing one of the same shape and dtype.

        Returns (bank, created); AlreadyExists when the name has another shape or dtype.
        Call `bank_bytes` and check the limits first.
        """
        existing = self.find(tenant, name)
        if existing is None:
            module = new_bank_module(num_features, dim, dtype, device, seed)
            candidate = SharedBank(tenant, name, module, device)
            with self._lock:
                existing = self._banks.setdefault((tenant, name), candidate)
            if existing is candidate:
                return candidate, True
        if existing.shape != (num_features, dim) or existing.dtype != dtype:
            raise AlreadyExists(
                f"bank {name!r} exists with shape {existing.shape} and {existing.dtype}; "
                f"asked for {(num_features, dim)} and {dtype}"
            )
        return existing, False

    def find(self, tenant: str, name: str) -> SharedBank | None:
        with self._lock:
            return self._banks.get((tenant, name))

    def get(self, tenant: str, name: str) -> SharedBank:
        """The tenant's bank called `name`; NotFound otherwise."""
        bank = self.find(tenant, name)
        if bank is None:
            raise NotFound(f"bank {name!r} not found on this server")
        return bank

    def all(self, tenant: str | None = None) -> list[SharedBank]:
        """The tenant's banks (every tenant's for None), oldest first."""
        with self._lock:
            banks = [b for (t, _), b in self._banks.items() if tenant in (None, t)]
        return sorted(banks, key=lambda b: b.created_at)

    def delete(self, tenant: str, name: str) -> SharedBank:
        """Remove a bank no session is attached to; returns it."""
        with self._lock:
            bank = self._banks.get((tenant, name))
            if bank is None:
                raise NotFound(f"bank {name!r} not found on this server")
            if bank.sessions:
                raise FailedPrecondition(
                    f"bank {name!r} is used by session(s) {', '.join(sorted(bank.sessions))}; "
                    "delete them first"
                )
            del self._banks[(tenant, name)]
        return bank

    def restore(self, bank: SharedBank) -> None:
        """Put a bank back (from a snapshot); replaces one of the same name."""
        with self._lock:
            self._banks[(bank.tenant, bank.name)] = bank

    def total_bytes(self) -> int:
        """Bytes held by all banks."""
        return sum(b.nbytes() for b in self.all())


def bank_bytes(num_features: int, dim: int, dtype: torch.dtype) -> int:
    """The bytes a bank of this shape and dtype takes (checks the arguments)."""
    check_bank_args(num_features, dim, dtype)
    return num_features * dim * torch.empty((), dtype=dtype).element_size()


def check_bank_args(num_features: int, dim: int, dtype: torch.dtype) -> None:
    """InvalidArgument unless a bank of this shape and dtype makes sense."""
    if num_features < 1 or dim < 1:
        raise InvalidArgument(
            f"Expected `num_features` and `dim` to be >= 1, but got {num_features} and {dim}."
        )
    if dtype not in BANK_DTYPES:
        raise InvalidArgument(f"Expected `dtype` to be a floating dtype, but got {dtype}.")


def new_bank_module(
    num_features: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int | None = None
) -> MemoryBankModule:
    """A MemoryBankModule of random unit rows (lightly's init), seeded."""
    seed = secrets.randbits(63) if seed is None else seed
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MemoryBankModule(size=(num_features, dim), feature_dim_first=False)
    return module.to(device=device, dtype=dtype)
