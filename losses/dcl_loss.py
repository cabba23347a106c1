"""DCLLoss and DCLWLoss: decoupled contrastive learning."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from ._functional import mask_diagonal

WeightFn = Callable[[Tensor, Tensor], Tensor]


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's positive-pair weights: `2 - B * softmax_i(<out0_i, out1_i> / sigma)`, detached.

    Args:
        out0, out1: (batch_size, dim) normalized embeddings.

    Returns:
        (batch_size,) weights.
    """
    similarity = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    return 2 - out0.shape[0] * F.softmax(similarity, dim=0)


#: Weight functions that can be chosen by name, e.g. over the wire.
WEIGHT_FUNCTIONS: dict[str, WeightFn] = {
    "von_mises_fisher": negative_mises_fisher_weights,
}


class DCLLoss(nn.Module):
    """Decoupled contrastive loss ("Decoupled Contrastive Learning", Yeh et al., 2021).

    Like NT-Xent, but the positive pair is left out of the denominator.

    Args:
        temperature: tau (> 0).
        weight_fn: None, a callable `(out0, out1) -> (batch_size,)` weights of the
            positive terms (it receives normalized embeddings), or a name from
            `WEIGHT_FUNCTIONS` ("von_mises_fisher": DCLW's weights with sigma 0.5).
        gather_distributed: accepted; see the README on global batches.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        weight_fn: WeightFn | str | None = None,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check.positive("temperature", temperature)
        self.weight_fn = _weight_fn(weight_fn)
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Loss of two views, symmetrized.

        Args:
            out0: (batch_size, dim) embeddings of the first view, batch_size >= 2.
            out1: (batch_size, dim) embeddings of the second view.

        Returns:
            A 0-d tensor.
        """
        check.two_views("out0", out0, "out1", out1, min_rows=2, one_dtype=True)
        x = F.normalize(out0, dim=1)
        y = F.normalize(out1, dim=1)
        sim_xy = x @ y.T / self.temperature  # (B, B)
        positive = sim_xy.diagonal()
        between = mask_diagonal(sim_xy)
        loss_x = self._directional(x, y, positive, x @ x.T / self.temperature, between)
        loss_y = self._directional(y, x, positive, y @ y.T / self.temperature, between.T)
        return 0.5 * (loss_x + loss_y)

    def _directional(
        self, anchor: Tensor, other: Tensor, positive: Tensor, within: Tensor, between: Tensor
    ) -> Tensor:
        """Mean over anchors of -positive * w + logsumexp over the 2B - 2 negatives."""
        if self.weight_fn is not None:
            positive = positive * self.weight_fn(anchor, other)
        negatives = torch.logaddexp(
            torch.logsumexp(mask_diagonal(within), dim=1), torch.logsumexp(between, dim=1)
        )
        return (negatives - positive).mean()


class DCLWLoss(DCLLoss):
    """DCL with von-Mises-Fisher weighting of the positive pairs (DCLW).

    Args:
        temperature: tau (> 0).
        sigma: width of the weighting softmax (> 0).
        gather_distributed: accepted; see the README on global batches.
    """

    def __init__(
        self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False
    ) -> None:
        sigma = check.positive("sigma", sigma)
        super().__init__(
            temperature=temperature,
            weight_fn=partial(negative_mises_fisher_weights, sigma=sigma),
            gather_distributed=gather_distributed,
        )
        self.sigma = sigma


def _weight_fn(weight_fn: WeightFn | str | None) -> WeightFn | None:
    if weight_fn is None or callable(weight_fn):
        return weight_fn
    return WEIGHT_FUNCTIONS[check.choice("weight_fn", weight_fn, sorted(WEIGHT_FUNCTIONS))]
