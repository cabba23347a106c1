"""MemoryBankModule: a fixed-size queue of past embeddings (MoCo negatives)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from ._state import StatefulLoss

BankSize = int | Sequence[int]


def parse_bank_size(name: str, size: Any) -> tuple[int, ...]:
    """Normalize a bank size to `(num_features, *feature_shape)`; `(0,)` means disabled.

    Accepts `0`, a bare int `n` (feature shape from the first batch), `(n,)` likewise, and
    `(n, dim)` (or longer, for multi-dim features). Lists work like tuples.
    """
    if isinstance(size, bool) or not isinstance(size, (int, list, tuple)):
        raise check.fail(name, "an int or a (num_features, dim) tuple", check.describe(size))
    entries = (size,) if isinstance(size, int) else tuple(size)
    if not entries or any(isinstance(e, bool) or not isinstance(e, int) for e in entries):
        raise check.fail(name, "an int or a (num_features, dim) tuple of ints", repr(size))
    if any(e < 0 for e in entries):
        raise check.fail(name, "a size with non-negative entries", repr(size))
    if entries[0] == 0:
        return (0,)
    if any(e == 0 for e in entries[1:]):
        raise check.fail(name, "a (num_features, dim) tuple with dim >= 1", repr(size))
    return entries


def bank_size_2d(name: str, size: Any) -> tuple[int, ...]:
    """`parse_bank_size` for losses on (batch, dim) embeddings: at most one feature dim."""
    parsed = parse_bank_size(name, size)
    if len(parsed) > 2:
        raise check.fail(name, "0, num_features or a (num_features, dim) tuple", repr(size))
    return parsed


def enqueue(bank: Tensor, ptr: int, batch: Tensor) -> tuple[int, int]:
    """Write `batch` (B, *feature_shape) into `bank` at `ptr`.

    lightly's rule, which is not a ring buffer: rows that do not fit before the end of the
    bank are dropped and the pointer returns to 0.

    Returns:
        (the new pointer, the number of rows stored).
    """
    n = bank.shape[0]
    fit = min(batch.shape[0], n - ptr)
    bank[ptr : ptr + fit] = batch[:fit]
    new_ptr = ptr + fit
    return (0 if new_ptr >= n else new_ptr), fit


@dataclass
class BankCursor:
    """Host-side bookkeeping of a bank, so that enqueueing never syncs a device.

    `ptr` mirrors the `bank_ptr` buffer; `rows_written` counts every row ever stored.
    Modules sharing a bank share its cursor.
    """

    ptr: int = 0
    rows_written: int = 0


class MemoryBankModule(StatefulLoss):
    """A queue of embeddings, as in MoCo ("Momentum Contrast", He et al., 2019).

    Args:
        size: `(num_features, dim)`; `0` disables the bank. A bare int `num_features`
            (or `(num_features,)`) takes the feature shape from the first batch.
        gather_distributed: accepted for compatibility; a server-side global batch
            enqueues every rank's rows already.
        feature_dim_first: return the bank as `(dim, num_features)` instead of
            `(num_features, dim)`.

    State (in `state_dict()`, unlike lightly): `bank` (num_features, dim) float32 and
    `bank_ptr` (1,) int64, the row the next batch goes to. A new bank holds random unit
    rows drawn from the global RNG at construction (at the first batch when its feature
    shape comes from the data).
    """

    _lazy_buffers = ("bank",)

    def __init__(
        self,
        size: BankSize = 65536,
        gather_distributed: bool = False,
        feature_dim_first: bool = True,
    ) -> None:
        super().__init__()
        self.size = parse_bank_size("size", size)
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)
        self.feature_dim_first = check.flag("feature_dim_first", feature_dim_first)
        self.cursor = BankCursor()
        self.bank: Tensor | None
        self.bank_ptr: Tensor
        if not self.enabled:
            return
        initial = _random_rows(self.size) if len(self.size) > 1 else None
        self.register_buffer("bank", initial)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def enabled(self) -> bool:
        """False for a bank of size 0."""
        return self.size[0] > 0

    def forward(
        self, output: Tensor, labels: Tensor | None = None, update: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Return `output` unchanged and a copy of the bank as it was before this batch.

        Args:
            output: (batch_size, dim) embeddings; enqueued (as float32) if `update`.
            labels: ignored (lightly's signature).
            update: enqueue `output` after reading the bank.

        Returns:
            `(output, bank)`: bank is (dim, num_features) if `feature_dim_first`, else
            (num_features, dim); None when the bank is disabled.
        """
        check.flag("update", update)
        if not self.enabled:
            check.tensor("output", output, min_ndim=1)
            return output, None
        bank = self.read("output", output, copy=True)
        if update:
            self.push(output)
        return output, bank.transpose(0, -1) if self.feature_dim_first else bank

    def read(
        self, name: str, like: Tensor, dtype: torch.dtype | None = None, copy: bool | None = None
    ) -> Tensor:
        """The bank (num_features, dim) before this step, on `like`'s device, in `dtype`.

        Checks that `like` (batch, *feature_shape) fits the bank. The result is a copy when
        `copy` is set, by default outside a transaction, so later enqueues cannot disturb
        autograd; inside one it is the live buffer when no conversion is needed.
        """
        if copy is None:
            copy = not self._in_transaction
        check.tensor(name, like, min_ndim=2, shape_hint="(batch_size, dim)")
        bank = self.bank
        if bank is None:
            bank = _random_rows((self.size[0], *like.shape[1:])).to(like.device)
            self._change_state(lambda: self._set_bank(bank))
        elif tuple(bank.shape[1:]) != tuple(like.shape[1:]):
            raise check.state_mismatch(
                name,
                f"rows of shape {tuple(bank.shape[1:])} like the memory bank",
                f"shape {tuple(like.shape)}",
            )
        converted = bank.to(device=like.device, dtype=dtype or bank.dtype)
        if copy and converted is bank:
            converted = bank.clone()
        return converted

    def push(self, batch: Tensor) -> None:
        """Enqueue `batch` (B, *feature_shape), detached and cast to the bank's dtype."""
        rows = batch.detach()
        self._change_state(lambda: self._enqueue(rows), "bank", rows, self.bank)

    def share_storage_of(self, other: MemoryBankModule) -> None:
        """Read from and enqueue into `other`'s bank (rows, pointer and cursor) from now on.

        Used for memory banks shared between sessions; both modules then show the same
        `bank` and `bank_ptr` in their state.
        """
        if other.bank is None:
            raise check.state_mismatch("other", "a memory bank with rows", "an unshaped bank")
        shape = tuple(other.bank.shape)
        if shape[0] != self.size[0] or (len(self.size) > 1 and shape != self.size):
            raise check.state_mismatch("size", f"the shared bank's shape {shape}", f"{self.size}")
        self._buffers["bank"] = other.bank
        self._buffers["bank_ptr"] = other.bank_ptr
        self.cursor = other.cursor

    def _enqueue(self, rows: Tensor) -> None:
        assert self.bank is not None  # read() shaped it
        self.cursor.ptr, stored = enqueue(self.bank, self.cursor.ptr, rows.to(self.bank.device))
        self.cursor.rows_written += stored
        self.bank_ptr.fill_(self.cursor.ptr)

    def _set_bank(self, bank: Tensor) -> None:
        if self.bank is None:
            self.bank = bank.to(self.bank_ptr.device)

    def _check_loaded(self, name: str, value: Tensor) -> str | None:
        if name == "bank":
            if value.dim() < 2 or value.shape[0] != self.size[0]:
                return f"expected a ({self.size[0]}, dim) bank, got shape {tuple(value.shape)}"
            if len(self.size) > 1 and tuple(value.shape) != self.size:
                return f"expected a bank of shape {self.size}, got {tuple(value.shape)}"
        if name == "bank_ptr" and (value.numel() != 1 or not 0 <= int(value) < self.size[0]):
            return f"expected a pointer in [0, {self.size[0]}), got {value.tolist()}"
        return None

    def _lazy_dtype(self, loaded: Tensor) -> torch.dtype:
        return torch.float32

    def _after_load(self) -> None:
        if self.enabled:
            self.cursor.ptr = int(self.bank_ptr)


def _random_rows(shape: tuple[int, ...]) -> Tensor:
    """Random unit rows (float32) from the global RNG, as lightly initializes a bank."""
    return F.normalize(torch.randn(shape), dim=-1)
