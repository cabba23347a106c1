"""RemoteLoss: an nn.Module whose forward runs on a lossd server, wired into autograd."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
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

    _owns_client = False  # set by drop-in classes, which open their own connection

    def __init__(
        self,
        client: LossClient,
        name: str,
        *,
        session_id: str | None = None,
        seed: int | None = None,
        device: str | None = None,
        shared_bank: str | None = None,
        world_size: int = 1,
        rank: int = 0,
        attach_only: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        try:
            self.spec = registry.get(name)
        except ValueError as error:
            raise InvalidArgumentError(str(error)) from None
        _check_ranks(world_size, rank, session_id)
        self.client = client
        self.world_size, self.rank = world_size, rank
        self.session: SessionInfo = client.create_session(
            name,
            session_id=session_id,
            seed=seed,
            device=device,
            shared_bank=shared_bank,
            attach_only=attach_only,
            **(config or {}),
        )
        self._next_step = self.session.steps  # the global step the ranks agree on
        self._signature = _without_self(self.spec.forward)

    @property
    def session_id(self) -> str:
        """The id of the server-side session."""
        return self.session.session_id

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run one step on the server; see the in-process class for the arguments."""
        given = self._signature.bind(*args, **kwargs).arguments
        tensors = codec.tensors_in(given)
        grad_on = torch.is_grad_enabled()
        wanted = {id(t) for t in tensors if grad_on and t.requires_grad}
        request = pb.ComputeRequest(session_id=self.session_id, request_id=uuid.uuid4().hex)
        if self.world_size > 1:
            request.global_batch.CopyFrom(
                pb.GlobalBatch(world_size=self.world_size, rank=self.rank, step=self._next_step)
            )
        reply = self.client.step(request, given, wanted)
        self._next_step += 1
        result = _materialize(reply.result, _device_of(tensors), keep={id(t) for t in tensors})
        if self.spec.returns is registry.Returns.OUTPUTS or not wanted:
            return result
        grads: dict[int, Tensor | None] = {}
        for name, tree in reply.grads.items():
            _pair_up(given[name], tree, grads.__setitem__)
        inputs = [t for t in tensors if id(t) in wanted]
        return _ServerGradients.apply(_Pending(result, [grads.get(id(t)) for t in inputs]), *inputs)

    # -- state, also when nested in a model's state_dict ------------------------------------

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        for name, t in self.client.get_state(self.session_id).items():
            destination[prefix + name] = t

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        mine = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
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
        # The common `loss.backward()` passes 1: hand the gradients over without a multiply
        # (a look at the value is free on the CPU, where the server's gradients arrive).
        unit = scale.device.type == "cpu" and bool(scale == 1)
        grads = [
            None if g is None else _scaled(g, scale, unit, device, dtype)
            for g, (device, dtype) in zip(ctx.grads, ctx.targets)
        ]
        return (None, *grads)


def _scaled(
    grad: Tensor, scale: Tensor, unit: bool, device: torch.device, dtype: torch.dtype
) -> Tensor:
    grad = grad.to(device=device, dtype=dtype)
    return grad if unit else grad * scale.to(device=device, dtype=dtype)


def _check_ranks(world_size: int, rank: int, session_id: str | None) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgumentError(
            f"Expected `rank` in [0, world_size={world_size}), but got {rank}."
        )
    if world_size > 1 and not session_id:
        raise InvalidArgumentError(
            "Expected `session_id` with world_size > 1: every rank "
            "attaches to the same session by it."
        )


def _without_self(signature: inspect.Signature) -> inspect.Signature:
    params = list(signature.parameters.values())[1:]
    return signature.replace(parameters=params)


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


def _pair_up(arg: Any, grad: Any, put: Callable[[int, Tensor | None], None]) -> None:
    if isinstance(arg, Tensor):
        put(id(arg), grad if isinstance(grad, Tensor) else None)
    elif isinstance(arg, (list, tuple)) and isinstance(grad, (list, tuple)):
        for a, g in zip(arg, grad):
            _pair_up(a, g, put)
