"""State that changes in `forward`, and how a caller decides when the change lands.

A stateful loss computes its value with the state as it is, then hands each change it
would make (enqueue into a bank, move a center, replace a covariance) to `_change_state`.
By default the change applies at once, as lightly does. Inside `state_transaction(loss)`
the changes wait until the block ends without an exception; if anything in the block
raises, they are dropped. The server wraps forward *and* backward in one transaction, so
a step that fails anywhere changes no state, and a bank read by the step need not be
copied to stay valid for backward.

Some state is shaped by the first batch (a bank whose feature dim comes from the data,
TiCo's covariance). Such buffers are `None` until then; `load_state_dict` shapes them
from the loaded tensors, so state can be restored before the first batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Change = Callable[[], object]  # its return value is ignored


class NonFiniteStateError(ValueError):
    """A step would have left NaN or Inf in the state (e.g. finite but huge inputs that
    overflow a center); raised by `state_transaction(..., require_finite=True)`."""


@dataclass
class _Pending:
    change: Change
    name: str = ""
    value: Tensor | None = None  # what the change writes ...
    into: Tensor | None = None  # ... into this tensor (for its dtype)


class StatefulLoss(nn.Module):
    """Base of the losses (and modules) whose state changes in `forward`.

    Subclasses list buffers that stay `None` until the first batch in `_lazy_buffers`
    and may override `_check_loaded` to validate a loaded tensor before it lands.
    """

    _lazy_buffers: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[_Pending] | None = None

    @property
    def _in_transaction(self) -> bool:
        """True while changes wait for the end of a `state_transaction`."""
        return self._pending is not None

    def _change_state(
        self,
        change: Change,
        name: str = "",
        value: Tensor | None = None,
        into: Tensor | None = None,
    ) -> None:
        """Apply `change` now, or when the surrounding transaction commits.

        `value` is what the change writes into `into` (the state tensor `name`), so that a
        transaction can refuse a change that would leave NaN or Inf behind.
        """
        if self._pending is None:
            change()
        else:
            self._pending.append(_Pending(change, name, value, into))

    def _check_loaded(self, name: str, value: Tensor) -> str | None:
        """An error message if `value` cannot become buffer `name`, else None."""
        return None

    def _load_from_state_dict(  # type: ignore[override]
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in list(self._buffers):
            key = prefix + name
            loaded = state_dict.get(key)
            if not isinstance(loaded, Tensor):
                continue
            problem = self._check_loaded(name, loaded)
            if problem is not None:
                error_msgs.append(f"{key}: {problem}")
            elif self._buffers[name] is None and name in self._lazy_buffers:
                # Shape the lazy buffer like the loaded tensor; the copy below fills it.
                dtype = self._lazy_dtype(loaded)
                device = self._state_device()
                self._buffers[name] = loaded.new_empty(loaded.shape, dtype=dtype, device=device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._after_load()

    def _lazy_dtype(self, loaded: Tensor) -> Any:
        """The dtype a lazy buffer takes when shaped by a loaded tensor."""
        return loaded.dtype

    def _state_device(self) -> Any:
        """Where lazily shaped state lives: with the other buffers, else on the CPU."""
        for buf in self._buffers.values():
            if buf is not None:
                return buf.device
        return "cpu"

    def _after_load(self) -> None:
        """Refresh anything derived from the buffers (e.g. a host copy of a pointer)."""


@contextmanager
def state_transaction(module: nn.Module, require_finite: bool = False) -> Iterator[None]:
    """Defer every state change made by `module` (and its submodules) inside the block.

    The changes apply, in the order they were made, when the block exits normally and are
    dropped if it raises. Run one forward per transaction: a second forward in the same
    block would read the state as it was before the first. With `require_finite`, changes
    that would write NaN or Inf are refused with NonFiniteStateError (one device sync).

    Example::

        with state_transaction(loss):
            value = loss(out0, out1)
            value.backward()
        # the memory bank has now moved; had backward raised, it would not have
    """
    stateful = [m for m in module.modules() if isinstance(m, StatefulLoss)]
    if any(m._in_transaction for m in stateful):
        raise RuntimeError("state_transaction blocks on the same loss cannot be nested")
    pending: list[_Pending] = []
    for m in stateful:
        m._pending = pending
    try:
        yield
        for m in stateful:
            m._pending = None
        if require_finite:
            _check_finite(pending)
        for p in pending:
            p.change()
    finally:
        for m in stateful:
            m._pending = None


def _check_finite(pending: list[_Pending]) -> None:
    checked = [p for p in pending if p.value is not None and p.value.is_floating_point()]
    if not checked:
        return
    finite = torch.stack(
        [
            torch.isfinite(p.value.to(p.into.dtype if p.into is not None else p.value.dtype)).all()
            for p in checked
            if p.value is not None
        ]
    )
    if not bool(finite.all()):
        names = sorted({p.name for p, ok in zip(checked, finite.tolist()) if not ok})
        raise NonFiniteStateError(
            f"the step would leave NaN or Inf in the state ({', '.join(names)}): inputs too "
            "large for the state's dtype? Nothing changed."
        )
