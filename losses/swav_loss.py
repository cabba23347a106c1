"""SwaVLoss: swapped prediction of Sinkhorn cluster assignments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check


@torch.no_grad()
def sinkhorn(out: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """SwaV's Sinkhorn-Knopp codes of prototype scores out (B, K); rows sum to 1.

    The scores are shifted by their maximum before exp: the result is the same (the
    matrix is normalized by its total first) but cannot overflow, where lightly's
    returns NaN for large scores. float16/bfloat16 scores are balanced in float32.
    """
    if out.dtype in (torch.float16, torch.bfloat16):
        return sinkhorn(out.float(), iterations, epsilon).to(out.dtype)
    q = torch.exp((out - out.max()) / epsilon).T  # (K, B)
    q = q / q.sum()
    batch_size = q.shape[1]
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=0, keepdim=True) / batch_size
    return (q * batch_size).T


class SwaVLoss(nn.Module):
    """SwaV ("Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
    Caron et al., 2020).

    Args:
        temperature: softmax temperature of the predictions (> 0).
        sinkhorn_iterations: >= 0.
        sinkhorn_epsilon: entropy weight of the codes (> 0).
        sinkhorn_gather_distributed: accepted; see the README on global batches.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check.positive("temperature", temperature)
        self.sinkhorn_iterations = check.integer(
            "sinkhorn_iterations", sinkhorn_iterations, minimum=0
        )
        self.sinkhorn_epsilon = check.positive("sinkhorn_epsilon", sinkhorn_epsilon)
        self.sinkhorn_gather_distributed = check.flag(
            "sinkhorn_gather_distributed", sinkhorn_gather_distributed
        )

    def subloss(self, z: Tensor, q: Tensor) -> Tensor:
        """Cross entropy of the codes q (B, K) and the predictions z (B, K)."""
        return -(q * F.log_softmax(z / self.temperature, dim=1)).sum(dim=1).mean()

    def forward(
        self,
        high_resolution_outputs: list[Tensor],
        low_resolution_outputs: list[Tensor],
        queue_outputs: list[Tensor] | None = None,
    ) -> Tensor:
        """Loss of the multi-crop prototype scores.

        Args:
            high_resolution_outputs: tensors (batch_size, num_prototypes), one per
                high-resolution crop; codes are computed from these.
            low_resolution_outputs: tensors (batch_size, num_prototypes), one per
                low-resolution crop (may be empty).
            queue_outputs: optional, one tensor (queue_length, num_prototypes) per
                high-resolution crop, used only to compute the codes.

        Returns:
            Shape (1,), like lightly.
        """
        highs, lows, queues = _check_crops(
            high_resolution_outputs, low_resolution_outputs, queue_outputs
        )
        views = highs + lows
        loss = highs[0].new_zeros(1)
        for i, high in enumerate(highs):
            codes = self._codes(high, None if queues is None else queues[i])
            crossed = sum(self.subloss(z, codes) for v, z in enumerate(views) if v != i)
            loss = loss + crossed / (len(views) - 1)
        return loss / len(highs)

    def _codes(self, high: Tensor, queue: Tensor | None) -> Tensor:
        """Codes (B, K) of one high-resolution crop, balanced together with its queue."""
        with torch.no_grad():
            scores = high.detach() if queue is None else torch.cat([high.detach(), queue.detach()])
            codes = sinkhorn(scores, self.sinkhorn_iterations, self.sinkhorn_epsilon)
            return codes[: high.shape[0]]


def _check_crops(
    highs: object, lows: object, queues: object
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
    hint = "(batch_size, num_prototypes)"
    high = check.tensor_list("high_resolution_outputs", highs, shape_hint=hint)
    low = check.tensor_list("low_resolution_outputs", lows, min_len=0, shape_hint=hint)
    if len(high) + len(low) < 2:
        raise check.fail(
            "high_resolution_outputs and low_resolution_outputs",
            "at least two crops in total",
            f"{len(high)} and {len(low)}",
        )
    first = high[0]
    if first.shape[0] < 1 or first.shape[1] < 1:
        raise check.fail(
            "high_resolution_outputs[0]",
            "a tensor with at least 1 sample and 1 prototype",
            f"shape {tuple(first.shape)}",
        )
    for name, views in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
        for i, view in enumerate(views):
            check.size_at(f"{name}[{i}]", view, 1, first.shape[1], "num_prototypes")
            check.size_at(f"{name}[{i}]", view, 0, first.shape[0], "batch_size")
    queue = None
    if queues is not None:
        queue = check.tensor_list(
            "queue_outputs", queues, min_len=len(high), shape_hint="(queue_length, num_prototypes)"
        )
        for i, q in enumerate(queue):
            check.size_at(f"queue_outputs[{i}]", q, 1, first.shape[1], "num_prototypes")
    return high, low, queue
