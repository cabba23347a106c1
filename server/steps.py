"""One Compute step: decode and check the arguments, run forward and backward of the
session's loss in one state transaction, encode the loss and the gradients."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lossd.losses import state_transaction
from lossd.losses.registry import Arg, DType, Kind, LossSpec
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import tensor_pb2 as tpb

from .errors import InvalidArgument, ResourceExhausted
from .limits import Admission

if TYPE_CHECKING:
    from .sessions import Session


@dataclass
class StepInputs:
    """The decoded forward arguments of a step, on the session's device.

    `wanted` holds the tensors whose gradient the caller asked for (requires_grad set);
    `wire_dtypes` the dtype each tensor came in, where it was cast to compute in another.
    """

    args: dict[str, Any]
    wanted: list[Tensor] = field(default_factory=list)
    wire_dtypes: dict[int, torch.dtype] = field(default_factory=dict)


def decode_inputs(
    spec: LossSpec,
    messages: Mapping[str, tpb.Value],
    device: torch.device,
    source: codec.TensorSource | None = None,
    compute_dtype: torch.dtype | None = None,
) -> StepInputs:
    """Decode and check every argument against the registry before any state is touched.

    Checks: argument names, kinds and dtypes, byte lengths (in the codec) and that floats
    are finite. `source` holds the bytes of chunked or shared tensors. Floating tensors are
    cast to `compute_dtype` if given. Raises InvalidArgument naming the argument.
    """
    names = [a.name for a in spec.args]
    unknown = sorted(set(messages) - set(names))
    if unknown:
        raise InvalidArgument(
            f"{spec.name} has no argument {', '.join(map(repr, unknown))}; "
            f"its arguments are {', '.join(names)}"
        )
    inputs = StepInputs(args={})
    for arg in sorted(spec.args, key=lambda a: a.name):  # the order chunks were sent in
        if arg.name not in messages:
            if spec.arg_default(arg.name) is inspect.Parameter.empty:
                raise InvalidArgument(
                    f"Expected `{arg.name}` ({arg.kind.value}), but it is missing."
                )
            continue
        hook = _TensorHook(arg, device, compute_dtype, inputs)
        value = codec.decode_value(messages[arg.name], arg.name, tensor_hook=hook, source=source)
        _check_kind(arg, value, spec.arg_default(arg.name))
        inputs.args[arg.name] = value
    return inputs


@dataclass
class _TensorHook:
    """Checks each decoded tensor of one argument and moves it to the device (and to the
    compute dtype)."""

    arg: Arg
    device: torch.device
    compute_dtype: torch.dtype | None
    inputs: StepInputs

    def __call__(self, t: Tensor, msg: tpb.Tensor, path: str) -> Tensor:
        if self.arg.dtype is DType.FLOAT and not t.is_floating_point():
            raise InvalidArgument(
                f"Expected `{path}` to be a floating-point tensor, but got {t.dtype}."
            )
        if self.arg.dtype is DType.BOOL and t.dtype != torch.bool:
            raise InvalidArgument(f"Expected `{path}` to be a bool tensor, but got {t.dtype}.")
        if t.is_floating_point() and not all_finite(t):
            raise InvalidArgument(
                f"Expected `{path}` to hold finite values, but it holds NaN or Inf."
            )
        if msg.requires_grad and not t.is_floating_point():
            raise InvalidArgument(f"`{path}` asks for a gradient but is {t.dtype}.")
        cast = self.compute_dtype if t.is_floating_point() else None
        t = to_device(t, self.device, cast)
        if cast is not None and cast != _wire(msg):
            self.inputs.wire_dtypes[id(t)] = _wire(msg)
        if msg.requires_grad:
            t.requires_grad_(True)
            self.inputs.wanted.append(t)
        return t


def all_finite(t: Tensor) -> bool:
    """True if t holds no NaN or Inf. The sum is one fast pass and carries any NaN or Inf;
    only when it is not finite (which huge finite values can also cause) is every element
    checked."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """t on `device` (in `dtype`). To a GPU, the bytes go through a pinned host buffer, so
    the upload is asynchronous: nothing waits for it until the loss needs the data."""
    if device.type != "cuda":
        return t.to(dtype=dtype) if dtype is not None else t
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged.to(device, dtype=dtype, non_blocking=True)


def to_host(reply: StepReply) -> StepReply:
    """The reply with its GPU tensors copied to pinned host memory: every copy is queued,
    then one synchronization waits for all of them (the only one a step needs to answer)."""
    copies: list[Tensor] = []

    def download(t: Tensor) -> Tensor:
        if not t.is_cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        copies.append(host)
        return host

    moved = StepReply(
        codec.map_tensors(download, reply.result),
        codec.map_tensors(download, reply.grads),
        reply.steps,
    )
    if copies:
        torch.cuda.current_stream().synchronize()
    return moved


def _wire(msg: tpb.Tensor) -> torch.dtype:
    return codec.torch_dtype(msg.dtype)


def _check_kind(arg: Arg, value: Any, default: Any) -> None:
    """The argument's Python shape is what the registry says (None only where it is the
    default)."""
    if value is None and default is None:
        return
    if not _KIND_CHECKS[arg.kind](value):
        raise InvalidArgument(
            f"Expected `{arg.name}` to be {_KIND_WORDS[arg.kind]}, but got {_describe(value)}."
        )


def _is_pair(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(t, Tensor) for t in v)


_KIND_CHECKS = {
    Kind.TENSOR: lambda v: isinstance(v, Tensor),
    Kind.TENSOR_LIST: lambda v: (
        isinstance(v, (list, tuple)) and all(isinstance(t, Tensor) for t in v)
    ),
    Kind.TENSOR_PAIR: _is_pair,
    Kind.PAIR_LIST: lambda v: isinstance(v, (list, tuple)) and all(_is_pair(p) for p in v),
    Kind.NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    Kind.INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
    Kind.FLAG: lambda v: isinstance(v, bool),
}
_KIND_WORDS = {
    Kind.TENSOR: "a tensor",
    Kind.TENSOR_LIST: "a list of tensors",
    Kind.TENSOR_PAIR: "a pair of tensors",
    Kind.PAIR_LIST: "a list of pairs of tensors",
    Kind.NUMBER: "a number",
    Kind.INTEGER: "an integer",
    Kind.FLAG: "a bool",
}


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return f"{value!r}"


def run_step(
    session: Session, inputs: StepInputs, admission: Admission
) -> tuple[Any, dict[int, Tensor | None]]:
    """Forward and backward in one state transaction, on a compute thread once admitted,
    under the session's lock (and its shared bank's): the state changes only if both
    succeed.

    Returns the forward result and the gradient of each tensor in `inputs.wanted`, by
    `id(tensor)` (None where the loss does not depend on it).
    """
    result, grads = admission.run(lambda: _locked_step(session, inputs))
    session.touch()
    return result, {id(t): g for t, g in zip(inputs.wanted, grads)}


def _locked_step(session: Session, inputs: StepInputs) -> tuple[Any, list[Tensor | None]]:
    with session.lock, session.bank_lock():
        try:
            with state_transaction(session.module, require_finite=True):
                result = session.module(**inputs.args)
                _check_finite(result)
                grads = _gradients(result, inputs.wanted)
        except torch.OutOfMemoryError:
            raise ResourceExhausted("out of memory computing this step; nothing changed") from None
        session.steps += 1
        session.changed()
    return result, grads


def _check_finite(result: Any) -> None:
    """Refuse a step whose loss is NaN or Inf (its state changes are dropped with it)."""
    if isinstance(result, Tensor) and result.numel() == 1 and not bool(torch.isfinite(result)):
        raise InvalidArgument(
            "the loss of this step is not finite (NaN or Inf): inputs out of "
            "the range the loss can handle? Nothing changed."
        )


def _gradients(result: Any, wanted: list[Tensor]) -> list[Tensor | None]:
    if not wanted or not isinstance(result, Tensor) or not result.requires_grad:
        return [None] * len(wanted)
    return list(torch.autograd.grad(result.sum(), wanted, allow_unused=True))


@dataclass
class StepReply:
    """What a step answers, independent of the transport: the result (forward arguments
    returned as they are become InputRefs) and, per argument that asked for gradients,
    its gradients shaped like it."""

    result: Any
    grads: dict[str, Any]
    steps: int

    def encode(self, sink: codec.TensorSink | None = None) -> pb.ComputeResponse:
        """The ComputeResponse; a sink may take large tensors out of it (chunks, shared
        memory)."""
        response = pb.ComputeResponse(steps=self.steps)
        codec.encode_value(self.result, sink=sink, out=response.result)
        codec.encode_values(self.grads, response.grads, sink=sink)
        return response


def build_reply(
    inputs: StepInputs, result: Any, grads: Mapping[int, Tensor | None], steps: int
) -> StepReply:
    """The StepReply of a step, on the host. `grads` maps id(tensor) of the arguments'
    tensors to their gradients."""
    return to_host(StepReply(result_tree(inputs, result), grad_trees(inputs, grads), steps))


def result_tree(inputs: StepInputs, result: Any) -> Any:
    """The result, detached, with forward arguments returned as they are as InputRefs."""
    refs = {id(v): codec.InputRef(name) for name, v in inputs.args.items() if isinstance(v, Tensor)}
    return codec.map_tensors(lambda t: refs.get(id(t), t.detach()), result)


def grad_trees(inputs: StepInputs, grads: Mapping[int, Tensor | None]) -> dict[str, Any]:
    """Per argument that asked for any gradient: its gradients, shaped like it (and in
    the dtype its tensors came in)."""
    if inputs.wire_dtypes:
        grads = {
            tid: g if g is None or tid not in inputs.wire_dtypes else g.to(inputs.wire_dtypes[tid])
            for tid, g in grads.items()
        }
    trees = {}
    for name, value in inputs.args.items():
        tree = _grad_tree(value, grads)
        if tree is not _NO_GRAD_ASKED:
            trees[name] = tree
    return trees


_NO_GRAD_ASKED = object()


def _grad_tree(value: Any, grads: Mapping[int, Tensor | None]) -> Any:
    """value with each tensor replaced by its gradient; _NO_GRAD_ASKED if none was asked."""
    if isinstance(value, Tensor):
        return grads.get(id(value), _NO_GRAD_ASKED)
    if isinstance(value, (list, tuple)):
        items = [_grad_tree(v, grads) for v in value]
        if all(i is _NO_GRAD_ASKED for i in items):
            return _NO_GRAD_ASKED
        items = [None if i is _NO_GRAD_ASKED else i for i in items]
        return items if isinstance(value, list) else tuple(items)
    return _NO_GRAD_ASKED
