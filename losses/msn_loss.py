"""MSNLoss: masked Siamese networks."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check


def prototype_probabilities(queries: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """Softmax over prototypes (K, D) of the similarities of queries (N, D); (N, K)."""
    return F.softmax(queries @ prototypes.T / temperature, dim=1)


def sharpen(probabilities: Tensor, temperature: float) -> Tensor:
    """Raise rows of probabilities (N, K) to 1/temperature and renormalize them."""
    sharp = probabilities ** (1.0 / temperature)
    return sharp / sharp.sum(dim=1, keepdim=True)


@torch.no_grad()
def sinkhorn(probabilities: Tensor, iterations: int = 3) -> Tensor:
    """MSN's Sinkhorn-Knopp balancing of target probabilities (B, K); 0 iterations: as is."""
    if iterations <= 0:
        return probabilities
    num_targets, num_prototypes = probabilities.shape
    q = probabilities.T / probabilities.sum()  # (K, B)
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / num_targets
    return (q * num_targets).T


class MSNLoss(nn.Module):
    """MSN ("Masked Siamese Networks for Label-Efficient Learning", Assran et al., 2022).

    Cross entropy between the prototype assignments of the anchor views and the sharpened,
    Sinkhorn-balanced assignments of the targets, plus a regularizer on the mean anchor
    assignment (KL to the uniform distribution, "me-max").

    Args:
        temperature: softmax temperature of the prototype similarities (> 0).
        sinkhorn_iterations: >= 0; 0 skips the balancing.
        regularization_weight: weight of the regularizer.
        gather_distributed: accepted; see the README on global batches.
        me_max_weight: lightly 1.5's name for `regularization_weight`; overrides it.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1.0,
        gather_distributed: bool = False,
        me_max_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check.positive("temperature", temperature)
        self.sinkhorn_iterations = check.integer(
            "sinkhorn_iterations", sinkhorn_iterations, minimum=0
        )
        self.regularization_weight = check.number("regularization_weight", regularization_weight)
        if me_max_weight is not None:
            warnings.warn(
                "me_max_weight is deprecated; use regularization_weight",
                DeprecationWarning,
                stacklevel=2,
            )
            self.regularization_weight = check.number("me_max_weight", me_max_weight)
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)

    def forward(
        self,
        anchors: Tensor,
        targets: Tensor,
        prototypes: Tensor,
        target_sharpen_temperature: float = 0.25,
    ) -> Tensor:
        """Loss of the anchor views against the targets.

        Args:
            anchors: (num_views * batch_size, dim), view-major: row r pairs with target
                row r % batch_size.
            targets: (batch_size, dim); no gradient reaches them.
            prototypes: (num_prototypes, dim), usually a trainer's parameter.
            target_sharpen_temperature: sharpening temperature of the targets (> 0).

        Returns:
            A 0-d tensor.
        """
        check.tensor("anchors", anchors, ndim=2, shape_hint="(num_views * batch_size, dim)")
        check.tensor("targets", targets, ndim=2, shape_hint="(batch_size, dim)")
        check.tensor("prototypes", prototypes, ndim=2, shape_hint="(num_prototypes, dim)")
        sharpen_temp = check.positive("target_sharpen_temperature", target_sharpen_temperature)
        batch_size = targets.shape[0]
        if batch_size == 0 or anchors.shape[0] % batch_size or not anchors.shape[0]:
            raise check.fail(
                "anchors",
                f"a positive multiple of {batch_size} rows (the batch size of `targets`)",
                f"shape {tuple(anchors.shape)}",
            )
        check.size_at("targets", targets, 1, anchors.shape[1], "the dim of `anchors`")
        check.size_at("prototypes", prototypes, 1, anchors.shape[1], "the dim of `anchors`")
        if prototypes.shape[0] < 1:
            raise check.fail(
                "prototypes",
                "a tensor with at least 1 prototype (row)",
                f"shape {tuple(prototypes.shape)}",
            )
        check.same_dtype("anchors", anchors, "targets", targets)
        check.same_dtype("anchors", anchors, "prototypes", prototypes)
        num_views = anchors.shape[0] // batch_size
        anchors = F.normalize(anchors, dim=1)
        prototypes = F.normalize(prototypes, dim=1)
        logits = anchors @ prototypes.T / self.temperature  # (V * B, K)
        with torch.no_grad():
            # Targets in at least float32: sharpened float16 probabilities underflow to 0
            # and Sinkhorn would divide 0 by 0.
            exact = torch.promote_types(logits.dtype, torch.float32)
            target_probs = prototype_probabilities(
                F.normalize(targets.to(exact), dim=1), prototypes.to(exact), self.temperature
            )
            target_probs = sinkhorn(sharpen(target_probs, sharpen_temp), self.sinkhorn_iterations)
            target_probs = target_probs.repeat(num_views, 1).to(logits.dtype)  # (V * B, K)
        log_probs = F.log_softmax(logits, dim=1)
        loss = -(target_probs * log_probs).sum(dim=1).mean()
        if self.regularization_weight > 0:
            mean_probs = log_probs.exp().mean(dim=0)  # (K,)
            loss = loss + self.regularization_weight * self.regularization_loss(mean_probs)
        return loss

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """KL(mean anchor assignment (K,) || uniform)."""
        return torch.xlogy(mean_anchor_probs, mean_anchor_probs).sum() + math.log(
            mean_anchor_probs.shape[0]
        )
