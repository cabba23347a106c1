"""RemoteLoss: an nn.Module whose forward runs on a lossd server, wired into autograd."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lossd.losses import registry
from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb

from .connection import LossClient, SessionInfo
from .errors import InvalidArgumentError


class RemoteLoss(nn.Module):
    """A lossd session seen as the loss module it holds.

    `forward` takes exactly the arguments of the in-process class and returns the loss
    as a tensor in the caller's autograd graph: `loss.backward()` (scaled, or added to
    other terms) delivers the server's gradients to the inputs. `state_dict()` and
    `load_state_dict()` read and replace the remote state, also when the loss is a
    submodule of a model.

    Args:
        client: the connection.
        name: the loss class name, e.g. "NTXentLoss".
        session_id: attach to (or create) this session; None creates a fresh one.
        seed: seed of the session's initial memory bank.
        device: the server-side device of the session.
        config: constructor arguments, as for the in-process class.
    """

    def __init__(self, client: LossClient, name: str, *, session_id: str | None = None,
                 seed: int | None = None, device: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__()
        try:
            self.spec = registry.get(name)
        except ValueError as error:
            raise InvalidArgumentError(str(error)) from None
        self.client = client
        self.session: SessionInfo = client.create_session(
            name, session_id=session_id, seed=seed, device=device, **(config or {}))
        self._signature = _without_self(self.spec.forward)

    @property
    def session_id(self) -> str:
        """The id of the server-side session."""
        return self.session.session_id

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run one step on the server; see the in-process class for the arguments."""
        given = self._signature.bind(*args, **kwargs).arguments
        tensors = list(_tensors(given))
        grad_on = torch.is_grad_enabled()
        wanted = {id(t) for t in tensors if grad_on and t.requires_grad}
        request = pb.ComputeRequest(session_id=self.session_id, request_id=uuid.uuid4().hex)
        try:
            codec.encode_values(given, request.args, wants_grad=lambda t: id(t) in wanted)
        except ValueError as error:
            raise InvalidArgumentError(f"{self.spec.name}: {error}") from None
        response = self.client.call("Compute", request, session_id=self.session_id)
        result = _materialize(codec.decode_value(response.result, "result", inputs=given),
                              _device_of(tensors), keep={id(t) for t in tensors})
        if self.spec.returns is registry.Returns.OUTPUTS or not wanted:
            return result
        grads = _gradients_by_input(given, response)
        inputs = [t for t in tensors if id(t) in wanted]
        return _ServerGradients.apply(_Pending(result, [grads.get(id(t)) for t in inputs]),
                                      *inputs)

    # -- state, also when nested in a model's state_dict ------------------------------------

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        for name, t in self.client.get_state(self.session_id).items():
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if mine or strict:
            self.client.set_state(self.session_id, mine)

    def extra_repr(self) -> str:
        name = "" if type(self).__name__ == self.spec.name else f"{self.spec.name}, "
        return f"{name}session={self.session_id!r}, server={self.client.target!r}"

    def close(self, delete_session: bool = False) -> None:
        """Optionally delete the server-side session (its state is lost)."""
        if delete_session:
            self.client.delete_session(self.session_id)


class _Pending:
    """Carries the loss value and its server-computed gradients into the autograd
    Function without making them Function inputs."""

    def __init__(self, value: Tensor, grads: list[Tensor | None]) -> None:
        self.value = value
        self.grads = grads


class _ServerGradients(torch.autograd.Function):
    """Returns the server's loss; backward scales the server's gradients by the incoming
    gradient, so `(2 * loss + other).backward()` is right too."""

    @staticmethod
    def forward(ctx: Any, pending: _Pending, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grads = pending.grads
        ctx.targets = [(t.device, t.dtype) for t in inputs]
        return pending.value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        scale = grad_output.reshape(())
        grads = [None if g is None else (g.to(device) * scale.to(device)).to(dtype)
                 for g, (device, dtype) in zip(ctx.grads, ctx.targets)]
        return (None, *grads)


def _without_self(signature: inspect.Signature) -> inspect.Signature:
    params = list(signature.parameters.values())[1:]
    return signature.replace(parameters=params)


def _tensors(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _device_of(tensors: list[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _materialize(result: Any, device: torch.device, keep: set[int]) -> Any:
    """Decoded results own their memory and sit on the inputs' device (as lightly's do);
    inputs returned by reference (ids in `keep`) are passed through untouched."""
    if isinstance(result, Tensor) and id(result) not in keep:
        return result.to(device, copy=True)
    if isinstance(result, (list, tuple)):
        return type(result)(_materialize(r, device, keep) for r in result)
    return result


def _gradients_by_input(given: dict[str, Any], response: pb.ComputeResponse
                        ) -> dict[int, Tensor | None]:
    """id(input tensor) -> its gradient, pairing each grads tree with its argument."""
    found: dict[int, Tensor | None] = {}
    for name, msg in response.grads.items():
        _pair_up(given[name], codec.decode_value(msg, f"grads.{name}"), found.__setitem__)
    return found


def _pair_up(arg: Any, grad: Any, put: Callable[[int, Tensor | None], None]) -> None:
    if isinstance(arg, Tensor):
        put(id(arg), grad if isinstance(grad, Tensor) else None)
    elif isinstance(arg, (list, tuple)) and isinstance(grad, (list, tuple)):
        for a, g in zip(arg, grad):
            _pair_up(a, g, put)
