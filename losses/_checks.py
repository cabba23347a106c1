"""Argument checks shared by every loss.

Every message follows one formula, "Expected `argument` to be X, but got Y.", and every
check raises `ValueError`. The checks look only at Python values, shapes and dtypes: none
of them reads tensor data, so none forces a device synchronization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class StateMismatchError(ValueError):
    """An input that is valid on its own but does not fit the loss's existing state
    (e.g. a feature dim other than the memory bank's). The server answers it with
    FAILED_PRECONDITION rather than INVALID_ARGUMENT."""


def fail(name: str, expected: str, got: str) -> ValueError:
    """The error every check raises: names the argument, what was expected and what came."""
    return ValueError(f"Expected `{name}` to be {expected}, but got {got}.")


def state_mismatch(name: str, expected: str, got: str) -> StateMismatchError:
    """Like `fail`, for inputs that contradict the state."""
    return StateMismatchError(f"Expected `{name}` to be {expected}, but got {got}.")


def describe(value: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"a {value.dim()}-D {dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"{value!r} ({type(value).__name__})"


# -- constructor values ------------------------------------------------------------------


def number(name: str, value: Any) -> float:
    """A finite real number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, "a number", describe(value))
    if not math.isfinite(value):
        raise fail(name, "a finite number", describe(value))
    return float(value)


def positive(name: str, value: Any) -> float:
    """A finite number > 0 (temperatures, momenta denominators, ...)."""
    if number(name, value) <= 0:
        raise fail(name, "a number > 0", describe(value))
    return float(value)


def non_negative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    if number(name, value) < 0:
        raise fail(name, "a number >= 0", describe(value))
    return float(value)


def in_unit_interval(name: str, value: Any) -> float:
    """A number in [0, 1] (momenta, mixing weights)."""
    if not 0 <= number(name, value) <= 1:
        raise fail(name, "a number in [0, 1]", describe(value))
    return float(value)


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """An int (bools excluded), optionally >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(name, "an integer", describe(value))
    if minimum is not None and value < minimum:
        raise fail(name, f"an integer >= {minimum}", describe(value))
    return value


def flag(name: str, value: Any) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise fail(name, "True or False", describe(value))
    return value


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """One string out of a fixed set."""
    if not isinstance(value, str) or value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise fail(name, f"one of {listed}", describe(value))
    return value


# -- forward values ----------------------------------------------------------------------


def tensor(
    name: str,
    value: Any,
    *,
    ndim: int | tuple[int, ...] | None = None,
    min_ndim: int | None = None,
    shape_hint: str = "",
    floating: bool = True,
) -> Tensor:
    """A tensor with the given number of dims and a floating-point dtype.

    `shape_hint` is the shape in words, e.g. "(batch_size, dim)", used in the message.
    """
    if not isinstance(value, Tensor):
        raise fail(name, f"a tensor{_of_shape(shape_hint)}", describe(value))
    if floating and value.dtype not in _FLOATING:
        raise fail(name, "a floating-point tensor", describe(value))
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and value.dim() not in dims:
        wanted = " or ".join(f"{d}-D" for d in dims)
        raise fail(name, f"a {wanted} tensor{_of_shape(shape_hint)}", describe(value))
    if min_ndim is not None and value.dim() < min_ndim:
        raise fail(
            name, f"a tensor of at least {min_ndim} dims{_of_shape(shape_hint)}", describe(value)
        )
    return value


def bool_tensor(name: str, value: Any, *, ndim: int, shape_hint: str = "") -> Tensor:
    """A bool tensor with `ndim` dims (masks)."""
    if not isinstance(value, Tensor) or value.dtype != torch.bool or value.dim() != ndim:
        raise fail(name, f"a {ndim}-D bool tensor{_of_shape(shape_hint)}", describe(value))
    return value


def tensor_list(
    name: str, value: Any, *, min_len: int = 1, ndim: int = 2, shape_hint: str = ""
) -> list[Tensor]:
    """A non-empty list (or tuple) of floating tensors with `ndim` dims each."""
    if not isinstance(value, (list, tuple)) or len(value) < min_len:
        raise fail(name, f"a list of at least {min_len} tensor(s)", describe(value))
    return [
        tensor(f"{name}[{i}]", t, ndim=ndim, shape_hint=shape_hint) for i, t in enumerate(value)
    ]


def pair(name: str, value: Any) -> tuple[Any, Any]:
    """A 2-tuple (or 2-list)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise fail(name, "a pair of two tensors", describe(value))
    return value[0], value[1]


def same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Two tensors of identical shape."""
    if a.shape != b.shape:
        raise fail(
            name_b, f"of the same shape as `{name_a}` {tuple(a.shape)}", f"shape {tuple(b.shape)}"
        )


def same_dtype(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Two tensors of identical dtype."""
    if a.dtype != b.dtype:
        raise fail(name_b, f"of the same dtype as `{name_a}` ({a.dtype})", f"{b.dtype}")


def size_at(name: str, x: Tensor, dim: int, expected: int, what: str) -> None:
    """`x.shape[dim] == expected`, where `what` names the expected size in words."""
    if x.shape[dim] != expected:
        raise fail(name, f"of size {expected} along dim {dim} ({what})", f"shape {tuple(x.shape)}")


def min_batch(name: str, x: Tensor, minimum: int = 2) -> None:
    """At least `minimum` rows along dim 0 (the batch statistics need them)."""
    if x.shape[0] < minimum:
        raise fail(
            name, f"a batch of at least {minimum} samples along dim 0", f"shape {tuple(x.shape)}"
        )


def two_views(
    name_a: str, a: Any, name_b: str, b: Any, *, min_rows: int, one_dtype: bool = False
) -> None:
    """Two (batch_size, dim) embeddings of one batch: 2-D floating tensors of one shape
    (and one dtype, where the math mixes them) with at least `min_rows` rows."""
    hint = "(batch_size, dim)"
    tensor(name_a, a, ndim=2, shape_hint=hint)
    tensor(name_b, b, ndim=2, shape_hint=hint)
    same_shape(name_a, a, name_b, b)
    if one_dtype:
        same_dtype(name_a, a, name_b, b)
    min_batch(name_a, a, minimum=min_rows)


def optional_number(name: str, value: Any) -> float | None:
    """None or a finite number."""
    return None if value is None else number(name, value)


def _of_shape(hint: str) -> str:
    return f" of shape {hint}" if hint else ""
