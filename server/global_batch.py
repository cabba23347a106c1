"""Global-batch steps: the shards of W ranks become one batch, computed once.

The registry says which arguments are per-sample (Batch.ROWS: concatenated along dim 0 in
rank order; Batch.VIEW_ROWS: view-major rows, concatenated view by view) and which are not
(Batch.NONE: must be equal on every rank). Concatenation happens in autograd, so the
gradient of each shard's leaves falls out of one backward pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lossd.losses.registry import Arg, Batch, LossSpec
from lossd.v1 import codec

from .errors import Aborted, InvalidArgument
from .steps import StepInputs


@dataclass(frozen=True)
class Source:
    """Where a rank's tensor gets its gradient: the id of a leaf of the global step, and
    whether it is a per-sample shard (scaled by the world size) or a shared argument."""

    leaf: int
    per_sample: bool


def merge_shards(
    spec: LossSpec, shards: list[StepInputs]
) -> tuple[StepInputs, list[dict[int, Source]]]:
    """One StepInputs of the global batch, plus, per rank, the Source of each of its
    tensors: its own leaf, or rank 0's for arguments that are not per-sample.

    Raises InvalidArgument when shards do not fit together.
    """
    merged = StepInputs(args={})
    leaf_of: list[dict[int, Source]] = [{} for _ in shards]
    for arg in spec.args:
        values = [shard.args.get(arg.name) for shard in shards]
        if all(v is None for v in values) and not any(arg.name in s.args for s in shards):
            continue
        if arg.batch is Batch.NONE:
            _check_equal(arg.name, values)
            merged.args[arg.name] = values[0]
            for rank, value in enumerate(values):
                for mine, first in zip(codec.tensors_in(value), codec.tensors_in(values[0])):
                    leaf_of[rank][id(mine)] = Source(id(first), per_sample=False)
            continue
        for rank, value in enumerate(values):
            for t in codec.tensors_in(value):
                leaf_of[rank][id(t)] = Source(id(t), per_sample=True)
        sizes = [_batch_size(arg, shard) for shard in shards]
        merged.args[arg.name] = _concatenate(arg, values, sizes)
    # The graph holds every rank's per-sample leaves but only rank 0's other arguments.
    merged.wanted = [
        t
        for rank, shard in enumerate(shards)
        for t in shard.wanted
        if id(t) in leaf_of[rank] and leaf_of[rank][id(t)].leaf == id(t)
    ]
    return merged, leaf_of


def _batch_size(arg: Arg, shard: StepInputs) -> int | None:
    if arg.batch is not Batch.VIEW_ROWS:
        return None
    reference = shard.args.get(arg.views_of)
    if not isinstance(reference, Tensor) or reference.dim() == 0:
        raise InvalidArgument(
            f"Expected `{arg.views_of}` to be a tensor to split `{arg.name}` into views."
        )
    return int(reference.shape[0])


def _concatenate(arg: Arg, values: list[Any], sizes: list[int | None]) -> Any:
    """Per-sample values of every rank, joined in rank order (the same nesting)."""
    first = values[0]
    if first is None:
        if any(v is not None for v in values):
            raise InvalidArgument(f"Expected `{arg.name}` to be None on every rank, or on none.")
        return None
    if isinstance(first, Tensor):
        if arg.batch is Batch.VIEW_ROWS:
            return _cat(arg.name, _view_major(arg.name, values, sizes))
        return _cat(arg.name, values)
    if isinstance(first, (list, tuple)):
        lengths = {len(v) if isinstance(v, (list, tuple)) else -1 for v in values}
        if len(lengths) != 1:
            raise InvalidArgument(
                f"Expected `{arg.name}` to have the same number of items on "
                f"every rank, but got {sorted(lengths)}."
            )
        items = [_concatenate(arg, [v[i] for v in values], sizes) for i in range(len(first))]
        return items if isinstance(first, list) else tuple(items)
    _check_equal(arg.name, values)
    return first


def _view_major(name: str, values: list[Tensor], sizes: list[int | None]) -> list[Tensor]:
    """(V * B_r, ...) shards -> the global (V * sum B_r, ...) rows, view by view."""
    views = {t.shape[0] // b if b else -1 for t, b in zip(values, sizes)}
    if len(views) != 1 or any(not b or t.shape[0] % b for t, b in zip(values, sizes)):
        raise InvalidArgument(
            f"Expected `{name}` to hold the same number of views on every "
            "rank, each as many rows as the rank's batch."
        )
    (num_views,) = views
    parts = []
    for v in range(num_views):
        for t, b in zip(values, sizes):
            assert b is not None
            parts.append(t[v * b : (v + 1) * b])
    return parts


def _cat(name: str, tensors: list[Tensor]) -> Tensor:
    try:
        return torch.cat(tensors)
    except RuntimeError as error:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise InvalidArgument(
            f"Expected the ranks' `{name}` to concatenate along dim 0, but "
            f"got shapes {shapes}: {error}"
        ) from None


def _check_equal(name: str, values: list[Any]) -> None:
    first = values[0]
    for rank, value in enumerate(values[1:], start=1):
        if not _same(first, value):
            raise InvalidArgument(
                f"Expected `{name}` to be the same on every rank (it is not per-sample), but "
                f"ranks 0 and {rank} differ."
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.detach(), b.detach()))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@dataclass
class _Rendezvous:
    world_size: int
    deadline: float
    shards: dict[int, Any] = field(default_factory=dict)
    closed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    replies: dict[int, Any] = field(default_factory=dict)
    error: BaseException | None = None


class GlobalSteps:
    """The global steps of one session that are waiting for ranks."""

    def __init__(self) -> None:
        self._open: dict[int, _Rendezvous] = {}
        self._lock = threading.Lock()

    def submit(
        self,
        step: int,
        world_size: int,
        rank: int,
        shard: Any,
        timeout: float,
        compute: Callable[[list[Any]], list[Any]],
    ) -> Any:
        """Hand in rank's shard of `step`; return rank's reply once all shards are in.

        The rank completing the step runs `compute(shards in rank order)`, which returns
        one reply per rank. A step missing ranks past `timeout` seconds fails with Aborted
        on every rank that sent its shard, naming the missing ranks.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidArgument(f"Expected `rank` in [0, {world_size}), but got {rank}.")
        with self._lock:
            meeting = self._open.get(step)
            if meeting is None:
                meeting = self._open[step] = _Rendezvous(world_size, time.monotonic() + timeout)
            if meeting.world_size != world_size:
                raise InvalidArgument(
                    f"Expected `world_size` {meeting.world_size} like the other "
                    f"ranks of step {step}, but got {world_size}."
                )
            if rank in meeting.shards:
                raise InvalidArgument(
                    f"rank {rank} sent step {step} twice (with another request id)"
                )
            meeting.shards[rank] = shard
            last = len(meeting.shards) == world_size
            if last:
                meeting.closed = True
                del self._open[step]
        if last:
            self._complete(meeting, compute)
        elif not meeting.done.wait(max(0.0, meeting.deadline - time.monotonic())):
            self._abort(step, meeting, timeout)
        meeting.done.wait()
        if meeting.error is not None:
            raise meeting.error
        return meeting.replies[rank]

    @staticmethod
    def _complete(meeting: _Rendezvous, compute: Callable[[list[Any]], list[Any]]) -> None:
        try:
            replies = compute([meeting.shards[r] for r in range(meeting.world_size)])
            meeting.replies = dict(enumerate(replies))
        except BaseException as error:  # noqa: BLE001 - every rank gets the same error
            meeting.error = error
        finally:
            meeting.done.set()

    def _abort(self, step: int, meeting: _Rendezvous, timeout: float) -> None:
        with self._lock:
            if meeting.closed:
                return
            meeting.closed = True
            self._open.pop(step, None)
            missing = sorted(set(range(meeting.world_size)) - set(meeting.shards))
        meeting.error = Aborted(
            f"global step {step}: rank(s) {', '.join(map(str, missing))} of "
            f"{meeting.world_size} did not arrive within {timeout:g} s; the step was not "
            "computed and no state changed"
        )
        meeting.done.set()
