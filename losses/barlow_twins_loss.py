"""BarlowTwinsLoss: redundancy reduction between two views."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from ._functional import off_diagonal


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins ("Self-Supervised Learning via Redundancy Reduction", Zbontar et al., 2021).

    Standardizes each feature over the batch, forms the cross-correlation matrix `c`
    (dim, dim) and pushes it towards the identity.

    Args:
        lambda_param: weight of the off-diagonal (redundancy) term.
        gather_distributed: accepted; see the README on global batches.
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False) -> None:
        super().__init__()
        self.lambda_param = check.number("lambda_param", lambda_param)
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Loss of two views.

        Args:
            z_a: (batch_size, dim) embeddings of the first view, batch_size >= 2.
            z_b: (batch_size, dim) embeddings of the second view.

        Returns:
            `sum_i (c_ii - 1)^2 + lambda * sum_{i != j} c_ij^2`, a 0-d tensor.
        """
        check.two_views("z_a", z_a, "z_b", z_b, min_rows=2, one_dtype=True)
        c = _standardize(z_a).T @ _standardize(z_b) / z_a.shape[0]  # (D, D)
        on_diagonal = (c.diagonal() - 1).pow(2).sum()
        return on_diagonal + self.lambda_param * off_diagonal(c).pow(2).sum()


def _standardize(z: Tensor) -> Tensor:
    """Per-feature batch standardization of z (B, D): biased variance, eps 1e-5, no affine."""
    return F.batch_norm(z, running_mean=None, running_var=None, training=True)
