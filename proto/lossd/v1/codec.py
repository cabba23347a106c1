"""Tensor and Value messages <-> torch tensors and Python values; used by server and client.

The dtype table lives here and only here. Decoding validates everything a peer could get
wrong (dtype, shape, byte length, nesting) and raises `ValueError` naming the argument;
it never reads bytes it was not given and never unpickles anything.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lossd.v1 import tensor_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little endian
    raise ImportError("lossd's tensor codec needs a little-endian host")

_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.FLOAT32,
    torch.float64: pb.FLOAT64,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
    torch.bool: pb.BOOL,
    torch.uint8: pb.UINT8,
}
_FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}

#: The one default for the largest message either side sends or accepts (DINO steps of
#: several hundred MB fit); `lossd serve --max-message-mb` and LossClient override it.
DEFAULT_MAX_MESSAGE_MB = 512

MAX_DIMS = 16
MAX_DEPTH = 8  # lists of pairs of tensors need 3; deeper trees are refused


def wire_dtype(dtype: torch.dtype) -> int:
    """The DType enum value of a torch dtype; ValueError for dtypes the wire lacks."""
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _TO_WIRE)
        raise ValueError(f"dtype {dtype} cannot travel; supported: {supported}") from None


def torch_dtype(value: int) -> torch.dtype:
    """The torch dtype of a DType enum value (ValueError if unknown)."""
    try:
        return _FROM_WIRE[value]
    except KeyError:
        raise ValueError(f"unknown dtype {value}") from None


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of t (C order), copied to the host once."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def encode_tensor(t: Tensor, *, requires_grad: bool = False, out: pb.Tensor | None = None
                  ) -> pb.Tensor:
    """A Tensor message holding t's dtype, shape and bytes."""
    msg = pb.Tensor() if out is None else out
    msg.dtype = wire_dtype(t.dtype)  # type: ignore[assignment]
    msg.shape[:] = t.shape
    msg.data = tensor_bytes(t)
    msg.requires_grad = requires_grad
    return msg


def decode_tensor(msg: pb.Tensor, name: str) -> Tensor:
    """A CPU tensor over the message's bytes (no copy where the bytes allow it).

    The result is read-only in spirit: nothing in lossd writes into decoded inputs.
    Raises ValueError naming `name` when dtype, shape or byte length are wrong.
    """
    try:
        dtype = torch_dtype(msg.dtype)
    except ValueError:
        raise ValueError(f"`{name}`: unknown dtype {msg.dtype}") from None
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise ValueError(f"`{name}`: expected at most {MAX_DIMS} non-negative dims, "
                         f"got shape {shape}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    data = msg.data
    if len(data) != expected:
        raise ValueError(f"`{name}`: shape {shape} of {dtype} needs {expected} bytes, "
                         f"got {len(data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns that bytes are immutable; lossd never writes into inputs.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


def encode_value(value: Any, *, wants_grad: Callable[[Tensor], bool] | None = None,
                 refs: Mapping[int, str] | None = None, out: pb.Value | None = None) -> pb.Value:
    """A Value message for a Python value (tensor, list, tuple, number, flag, str, None).

    `wants_grad(t)` sets each tensor's requires_grad flag (default: False). `refs` maps
    `id(tensor)` of forward arguments to their names: such tensors travel as `input_ref`.
    """
    msg = pb.Value() if out is None else out
    if isinstance(value, Tensor) and refs and id(value) in refs:
        msg.input_ref = refs[id(value)]
    elif isinstance(value, Tensor):
        encode_tensor(value, requires_grad=bool(wants_grad and wants_grad(value)), out=msg.tensor)
    elif isinstance(value, (list, tuple)):
        items = msg.list if isinstance(value, list) else msg.tuple
        items.SetInParent()  # an empty list is still a list
        for item in value:
            encode_value(item, wants_grad=wants_grad, refs=refs, out=items.items.add())
    elif isinstance(value, bool):
        msg.flag = value
    elif isinstance(value, int):
        msg.integer = value
    elif isinstance(value, float):
        msg.number = value
    elif isinstance(value, str):
        msg.text = value
    elif value is None:
        msg.none = True
    else:
        raise ValueError(f"a {type(value).__name__} cannot travel; expected a tensor, list, "
                         "tuple, number, bool, str or None")
    return msg


TensorHook = Callable[[Tensor, pb.Tensor, str], Tensor]


def decode_value(msg: pb.Value, name: str, *, inputs: Mapping[str, Any] | None = None,
                 tensor_hook: TensorHook | None = None, _depth: int = 0) -> Any:
    """The Python value of a Value message; `name` is its path, for error messages.

    `inputs` resolves `input_ref` values (results that are forward arguments);
    `tensor_hook(tensor, message, path)` may check or transform each decoded tensor.
    """
    if _depth > MAX_DEPTH:
        raise ValueError(f"`{name}`: nested deeper than {MAX_DEPTH} levels")
    kind = msg.WhichOneof("kind")
    if kind == "tensor":
        t = decode_tensor(msg.tensor, name)
        return t if tensor_hook is None else tensor_hook(t, msg.tensor, name)
    if kind in ("list", "tuple"):
        items = [decode_value(item, f"{name}[{i}]", inputs=inputs, tensor_hook=tensor_hook,
                              _depth=_depth + 1)
                 for i, item in enumerate(getattr(msg, kind).items)]
        return items if kind == "list" else tuple(items)
    if kind in ("number", "integer", "flag", "text"):
        return getattr(msg, kind)
    if kind == "none":
        return None
    if kind == "input_ref" and inputs is not None and msg.input_ref in inputs:
        return inputs[msg.input_ref]
    raise ValueError(f"`{name}`: expected a value, got {kind or 'nothing'}")


def encode_values(values: Mapping[str, Any], out: Any, **kwargs: Any) -> None:
    """Fill a `map<string, Value>` field from a dict; errors name the key."""
    for key, value in values.items():
        try:
            encode_value(value, out=out[key], **kwargs)
        except ValueError as error:
            raise ValueError(f"`{key}`: {error}") from None


def decode_values(values: Mapping[str, pb.Value], **kwargs: Any) -> dict[str, Any]:
    """A dict from a `map<string, Value>` field."""
    return {key: decode_value(value, key, **kwargs) for key, value in values.items()}


def decode_tensors(tensors: Mapping[str, pb.Tensor]) -> dict[str, Tensor]:
    """A dict from a `map<string, Tensor>` field."""
    return {key: decode_tensor(msg, key) for key, msg in tensors.items()}


def encode_tensors(tensors: Mapping[str, Tensor], out: Any) -> None:
    """Fill a `map<string, Tensor>` field from a dict."""
    for key, t in tensors.items():
        encode_tensor(t, out=out[key])
