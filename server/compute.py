"""Compute, whatever the transport: exactly-once by request id, alone or as one rank's
shard of a global batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lossd.v1 import codec
from lossd.v1 import lossd_pb2 as pb
from lossd.v1 import tensor_pb2 as tpb

from . import steps
from .errors import InvalidArgument
from .global_batch import merge_shards
from .limits import Admission
from .sessions import Session
from .steps import StepInputs, StepReply


class Computer:
    """Runs Compute requests on sessions.

    Args:
        admission: bounds the steps computing at once and those waiting for a turn.
        global_batch_timeout_s: how long the ranks of a global step wait for each other.
    """

    def __init__(self, admission: Admission, global_batch_timeout_s: float) -> None:
        self.admission = admission
        self.global_batch_timeout_s = global_batch_timeout_s

    def compute(
        self, session: Session, request: pb.ComputeRequest, chunks: Iterator[Tensor] | None = None
    ) -> StepReply:
        """The reply to one request; a retried request id gets the first reply.

        `chunks` are the assembled chunks of a streamed request; tensors in shared memory
        are read from the session's regions.
        """
        return session.replies.run(
            request.request_id, lambda: self._compute(session, request, chunks)
        )

    def _compute(
        self, session: Session, request: pb.ComputeRequest, chunks: Iterator[Tensor] | None
    ) -> StepReply:
        source = codec.Payloads(chunks, session.regions)
        compute_dtype = (
            None
            if request.compute_dtype == tpb.DTYPE_UNSPECIFIED
            else _decode_dtype(request.compute_dtype)
        )
        inputs = steps.decode_inputs(
            session.spec, request.args, session.device, source, compute_dtype
        )
        if not request.HasField("global_batch") or request.global_batch.world_size <= 1:
            result, grads = steps.run_step(session, inputs, self.admission)
            return steps.build_reply(inputs, result, grads, session.steps)
        batch = request.global_batch
        return session.global_steps.submit(
            batch.step,
            batch.world_size,
            batch.rank,
            inputs,
            self.global_batch_timeout_s,
            lambda shards: self._global_step(session, shards),
        )

    def _global_step(self, session: Session, shards: list[StepInputs]) -> list[StepReply]:
        """Compute the global batch once; answer each rank its shard's gradients times W
        (the full gradient for arguments that are not per-sample)."""
        merged, sources = merge_shards(session.spec, shards)
        result, grads = steps.run_step(session, merged, self.admission)
        tree = steps.result_tree(merged, result)
        replies = []
        for shard, source in zip(shards, sources):
            own: dict[int, Tensor | None] = {}
            for t in shard.wanted:
                src = source.get(id(t))
                grad = grads.get(src.leaf) if src is not None else None
                if grad is not None and src is not None and src.per_sample:
                    grad = grad * len(shards)
                own[id(t)] = grad
            replies.append(
                steps.to_host(StepReply(tree, steps.grad_trees(shard, own), session.steps))
            )
        return replies


def _decode_dtype(value: int) -> torch.dtype:
    try:
        dtype = codec.torch_dtype(value)
    except ValueError:
        raise InvalidArgument(f"Expected `compute_dtype` to be a dtype, but got {value}.") from None
    if not dtype.is_floating_point:
        raise InvalidArgument(f"Expected `compute_dtype` to be floating, but got {dtype}.")
    return dtype
