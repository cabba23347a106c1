"""Tensor and Value messages <-> torch tensors and Python values; used by server and client.

The dtype table lives here and only here. Decoding validates everything a peer could get
wrong (dtype, shape, byte length, nesting) and raises `ValueError` naming the argument;
it never reads bytes it was not given and never unpickles anything.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lossd.v1 import lossd_pb2 as lpb
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
MAX_ELEMENTS = 2**48  # beyond any message; keeps torch's stride arithmetic from overflowing
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
    return flat_bytes(t).numpy().tobytes() if t.numel() else b""


class TensorSink(Protocol):
    """Where encoding may put a tensor's bytes instead of the message (chunks, shared
    memory). `take` stores them and marks the message, or returns False to inline them."""

    def take(self, t: Tensor, msg: pb.Tensor) -> bool: ...


class TensorSource(Protocol):
    """Where decoding finds the bytes of tensors marked `chunked` or `shared`."""

    def bytes_of(self, msg: pb.Tensor, nbytes: int, name: str) -> bytes | bytearray | Tensor: ...


class Sinks:
    """A TensorSink trying several in turn (e.g. shared memory, then chunks)."""

    def __init__(self, *sinks: TensorSink | None) -> None:
        self.sinks = [sink for sink in sinks if sink is not None]

    def take(self, t: Tensor, msg: pb.Tensor) -> bool:
        return any(sink.take(t, msg) for sink in self.sinks)


class Chunker:
    """A TensorSink for ComputeStream: tensors larger than a chunk are kept, and `chunks()`
    then yields their bytes as Chunk messages, read straight from each tensor without an
    intermediate copy of the whole tensor."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.tensors: list[Tensor] = []

    def take(self, t: Tensor, msg: pb.Tensor) -> bool:
        if t.numel() * t.element_size() <= self.chunk_bytes:
            return False
        self.tensors.append(flat_bytes(t))
        msg.chunked = True
        return True

    def chunks(self) -> Iterator[lpb.Chunk]:
        """Chunk messages for every kept tensor, in order."""
        for index, flat in enumerate(self.tensors):
            for offset in range(0, flat.numel(), self.chunk_bytes):
                piece = flat[offset : offset + self.chunk_bytes].numpy().tobytes()
                yield lpb.Chunk(tensor=index, offset=offset, data=piece)


@dataclass
class Payloads:
    """A TensorSource: assembled chunks (in order) and/or shared-memory regions by name."""

    chunks: Iterator[Tensor] | None = None
    regions: Mapping[str, Any] | None = None

    def bytes_of(self, msg: pb.Tensor, nbytes: int, name: str) -> Tensor:
        if msg.HasField("shared"):
            region = (self.regions or {}).get(msg.shared.region)
            if region is None:
                raise ValueError(
                    f"`{name}`: in shared-memory region {msg.shared.region!r}, "
                    "which this session has not attached"
                )
            return region.bytes_of(msg, nbytes, name)
        payload = next(self.chunks, None) if self.chunks is not None else None
        if payload is None:
            raise ValueError(f"`{name}`: marked chunked, but no chunks came with it")
        return payload


def flat_bytes(t: Tensor) -> Tensor:
    """t's bytes as a flat uint8 CPU tensor (a view when t is contiguous on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8)


def encode_tensor(
    t: Tensor,
    *,
    requires_grad: bool = False,
    out: pb.Tensor | None = None,
    sink: TensorSink | None = None,
) -> pb.Tensor:
    """A Tensor message holding t's dtype, shape and bytes (or pointing to them)."""
    msg = pb.Tensor() if out is None else out
    msg.dtype = wire_dtype(t.dtype)  # type: ignore[assignment]
    msg.shape[:] = t.shape
    msg.requires_grad = requires_grad
    if sink is None or not sink.take(t, msg):
        msg.data = tensor_bytes(t)
    return msg


def tensor_nbytes(msg: pb.Tensor) -> int:
    """The byte length a Tensor message's shape and dtype call for (ValueError if invalid)."""
    dtype = torch_dtype(msg.dtype)
    shape = tuple(msg.shape)
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
        raise ValueError(f"expected at most {MAX_DIMS} non-negative dims, got shape {shape}")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # even an empty tensor must be sane
        raise ValueError(f"expected at most {MAX_ELEMENTS} elements, got shape {shape}")
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def decode_tensor(msg: pb.Tensor, name: str, source: TensorSource | None = None) -> Tensor:
    """A CPU tensor over the message's bytes (no copy where the bytes allow it).

    Tensors marked `chunked` or `shared` take their bytes from `source`. The result is
    read-only in spirit: nothing in lossd writes into decoded inputs. Raises ValueError
    naming `name` when dtype, shape or byte length are wrong.
    """
    try:
        expected = tensor_nbytes(msg)
    except ValueError as error:
        raise ValueError(f"`{name}`: {error}") from None
    dtype, shape = _FROM_WIRE[msg.dtype], tuple(msg.shape)
    data: bytes | bytearray | Tensor = msg.data
    if msg.chunked or msg.HasField("shared"):
        if source is None:
            raise ValueError(f"`{name}`: its bytes are elsewhere, but nothing came with it")
        data = source.bytes_of(msg, expected, name)
    if len(data) != expected:
        raise ValueError(
            f"`{name}`: shape {shape} of {dtype} needs {expected} bytes, got {len(data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if isinstance(data, Tensor):  # uint8 bytes (assembled chunks, a shared region), aligned
        return data.view(dtype).reshape(shape)
    with warnings.catch_warnings():
        # frombuffer warns that bytes are immutable; lossd never writes into inputs.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


def map_tensors(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """tree (nested dicts, lists and tuples) with fn applied to every tensor in it; other
    leaves stay as they are, and so do the container types."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return tree


def tensors_in(tree: Any) -> list[Tensor]:
    """The tensors of a tree, depth first (see map_tensors)."""
    found: list[Tensor] = []
    map_tensors(found.append, tree)
    return found


@dataclass(frozen=True)
class InputRef:
    """Stands for the forward argument `name` in a result (it travels as `input_ref`)."""

    name: str


def encode_value(
    value: Any,
    *,
    wants_grad: Callable[[Tensor], bool] | None = None,
    sink: TensorSink | None = None,
    out: pb.Value | None = None,
) -> pb.Value:
    """A Value message for a Python value (tensor, list, tuple, number, flag, str, None,
    InputRef).

    `wants_grad(t)` sets each tensor's requires_grad flag (default: False). A `sink`
    (a Chunker, a shared-memory region) may take tensors' bytes out of the message.
    """
    msg = pb.Value() if out is None else out
    if isinstance(value, Tensor):
        encode_tensor(
            value, requires_grad=bool(wants_grad and wants_grad(value)), out=msg.tensor, sink=sink
        )
    elif isinstance(value, InputRef):
        msg.input_ref = value.name
    elif isinstance(value, (list, tuple)):
        items = msg.list if isinstance(value, list) else msg.tuple
        items.SetInParent()  # an empty list is still a list
        for item in value:
            encode_value(item, wants_grad=wants_grad, sink=sink, out=items.items.add())
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
        raise ValueError(
            f"a {type(value).__name__} cannot travel; expected a tensor, list, "
            "tuple, number, bool, str or None"
        )
    return msg


TensorHook = Callable[[Tensor, pb.Tensor, str], Tensor]


def decode_value(
    msg: pb.Value,
    name: str,
    *,
    inputs: Mapping[str, Any] | None = None,
    tensor_hook: TensorHook | None = None,
    source: TensorSource | None = None,
    _depth: int = 0,
) -> Any:
    """The Python value of a Value message; `name` is its path, for error messages.

    `inputs` resolves `input_ref` values (results that are forward arguments);
    `tensor_hook(tensor, message, path)` may check or transform each decoded tensor;
    `source` supplies the bytes of tensors marked `chunked` or `shared`.
    """
    if _depth > MAX_DEPTH:
        raise ValueError(f"`{name}`: nested deeper than {MAX_DEPTH} levels")
    kind = msg.WhichOneof("kind")
    if kind == "tensor":
        t = decode_tensor(msg.tensor, name, source)
        return t if tensor_hook is None else tensor_hook(t, msg.tensor, name)
    if kind in ("list", "tuple"):
        items = [
            decode_value(
                item,
                f"{name}[{i}]",
                inputs=inputs,
                tensor_hook=tensor_hook,
                source=source,
                _depth=_depth + 1,
            )
            for i, item in enumerate(getattr(msg, kind).items)
        ]
        return items if kind == "list" else tuple(items)
    if kind in ("number", "integer", "flag", "text"):
        return getattr(msg, kind)
    if kind == "none":
        return None
    if kind == "input_ref" and inputs is not None and msg.input_ref in inputs:
        return inputs[msg.input_ref]
    raise ValueError(f"`{name}`: expected a value, got {kind or 'nothing'}")


def encode_values(values: Mapping[str, Any], out: Any, **kwargs: Any) -> None:
    """Fill a `map<string, Value>` field from a dict; errors name the key.

    Keys go in sorted order, the order `decode_values` reads chunked tensors in.
    """
    for key, value in sorted(values.items()):
        try:
            encode_value(value, out=out[key], **kwargs)
        except ValueError as error:
            raise ValueError(f"`{key}`: {error}") from None


def decode_values(values: Mapping[str, pb.Value], **kwargs: Any) -> dict[str, Any]:
    """A dict from a `map<string, Value>` field (keys in sorted order, see encode_values)."""
    return {key: decode_value(value, key, **kwargs) for key, value in sorted(values.items())}


def chunked_sizes(msg: Any) -> list[int]:
    """Byte sizes of the `chunked` tensors of a ComputeRequest or ComputeResponse, in the
    order encode/decode visit them (result first, then map entries by sorted key)."""
    sizes: list[int] = []

    def visit(value: pb.Value, depth: int = 0) -> None:
        kind = value.WhichOneof("kind")
        if kind == "tensor" and value.tensor.chunked:
            sizes.append(tensor_nbytes(value.tensor))
        elif kind in ("list", "tuple") and depth < MAX_DEPTH:
            for item in getattr(value, kind).items:
                visit(item, depth + 1)

    if isinstance(msg, lpb.ComputeResponse):
        visit(msg.result)
    for field in ("args", "grads"):
        for _, value in sorted(getattr(msg, field, {}).items()):
            visit(value)
    return sizes


def decode_tensors(tensors: Mapping[str, pb.Tensor]) -> dict[str, Tensor]:
    """A dict from a `map<string, Tensor>` field."""
    return {key: decode_tensor(msg, key) for key, msg in tensors.items()}


def encode_tensors(tensors: Mapping[str, Tensor], out: Any) -> None:
    """Fill a `map<string, Tensor>` field from a dict."""
    for key, t in tensors.items():
        encode_tensor(t, out=out[key])
