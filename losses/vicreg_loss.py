"""VICRegLoss: variance-invariance-covariance regularization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from ._functional import off_diagonal


def invariance_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of x and y (same shape)."""
    return F.mse_loss(x, y)


def variance_loss(x: Tensor, eps: float = 1e-4) -> Tensor:
    """Hinge on the per-feature standard deviation over the batch of x (B, ..., D)."""
    std = torch.sqrt(x.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_loss(x: Tensor) -> Tensor:
    """Sum of squared off-diagonal covariances over the batch of x (B, ..., D), / D.

    Averaged over the middle dims when x has more than two.
    """
    batch_size, dim = x.shape[0], x.shape[-1]
    x = x - x.mean(dim=0)
    cov = torch.einsum("b...c,b...d->...cd", x, x) / (batch_size - 1)  # (..., D, D)
    return (off_diagonal(cov).pow(2).sum(dim=-1) / dim).mean()


class VICRegLoss(nn.Module):
    """VICReg ("VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
    Learning", Bardes et al., 2022).

    Args:
        lambda_param: weight of the invariance term.
        mu_param: weight of the variance term.
        nu_param: weight of the covariance term.
        gather_distributed: accepted; see the README on global batches.
        eps: added to the variance before the square root (> 0).
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.lambda_param = check.number("lambda_param", lambda_param)
        self.mu_param = check.number("mu_param", mu_param)
        self.nu_param = check.number("nu_param", nu_param)
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)
        self.eps = check.positive("eps", eps)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Loss of two views.

        Args:
            z_a: (batch_size, ..., dim) embeddings, batch_size >= 2.
            z_b: embeddings of the second view, same shape.

        Returns:
            `lambda * inv + mu * (var(z_a) + var(z_b)) / 2 + nu * (cov(z_a) + cov(z_b))`, 0-d.
        """
        hint = "(batch_size, ..., dim)"
        check.tensor("z_a", z_a, min_ndim=2, shape_hint=hint)
        check.tensor("z_b", z_b, min_ndim=2, shape_hint=hint)
        check.same_shape("z_a", z_a, "z_b", z_b)
        check.min_batch("z_a", z_a)
        return self.compute(z_a, z_b)

    def compute(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """The loss without argument checks (for callers that checked already)."""
        inv = invariance_loss(z_a, z_b)
        var = 0.5 * (variance_loss(z_a, self.eps) + variance_loss(z_b, self.eps))
        cov = covariance_loss(z_a) + covariance_loss(z_b)
        return self.lambda_param * inv + self.mu_param * var + self.nu_param * cov
