"""TiCoLoss: transformation invariance and covariance contrast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from ._state import StatefulLoss


class TiCoLoss(StatefulLoss):
    """TiCo ("TiCo: Transformation Invariance and Covariance Contrast for Self-Supervised
    Visual Representation Learning", Zhu et al., 2022).

    Args:
        beta: momentum of the covariance estimate, in [0, 1].
        rho: weight of the covariance contrast term.
        gather_distributed: accepted; see the README on global batches.

    State: `C` (dim, dim), the running covariance of the normalized `z_a`; absent until
    the first batch (lightly keeps it outside `state_dict()`; lossd does not). It takes
    the first batch's dtype (at least float32) and keeps it.
    """

    _lazy_buffers = ("C",)

    def __init__(self, beta: float = 0.9, rho: float = 8.0, gather_distributed: bool = False):
        super().__init__()
        self.beta = check.in_unit_interval("beta", beta)
        self.rho = check.number("rho", rho)
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)
        self.C: Tensor | None
        self.register_buffer("C", None)

    def forward(self, z_a: Tensor, z_b: Tensor, update_covariance_matrix: bool = True) -> Tensor:
        """Loss of two views.

        Args:
            z_a: (batch_size, dim) embeddings, batch_size >= 2.
            z_b: (batch_size, dim) embeddings of the second view.
            update_covariance_matrix: move `C` towards this batch's covariance.

        Returns:
            `1 - mean <x_i, y_i> + rho * mean x_i^T C x_i` on normalized rows, 0-d.
        """
        check.two_views("z_a", z_a, "z_b", z_b, min_rows=2)
        check.flag("update_covariance_matrix", update_covariance_matrix)
        previous = self.C
        if previous is not None and previous.shape[0] != z_a.shape[1]:
            raise check.state_mismatch(
                "z_a",
                f"of dim {previous.shape[0]}, like the covariance `C`",
                f"shape {tuple(z_a.shape)}",
            )
        x = F.normalize(z_a, dim=1)
        y = F.normalize(z_b, dim=1)
        batch_cov = (x.T @ x).detach() / x.shape[0]  # (D, D)
        if previous is None:
            cov = (1 - self.beta) * batch_cov
        else:
            cov = self.beta * previous.to(batch_cov.device) + (1 - self.beta) * batch_cov
        invariance = 1.0 - (x * y).sum(dim=1).mean()
        contrast = self.rho * ((x @ cov.to(x.dtype)) * x).sum(dim=1).mean()
        if update_covariance_matrix:
            new = cov.detach().to(_state_dtype(previous, batch_cov))
            self._change_state(lambda: setattr(self, "C", new), "C", new, new)
        return invariance + contrast

    def _check_loaded(self, name: str, value: Tensor) -> str | None:
        if value.dim() != 2 or value.shape[0] != value.shape[1]:
            return f"expected a square (dim, dim) matrix, got shape {tuple(value.shape)}"
        return None


def _state_dtype(previous: Tensor | None, batch: Tensor) -> torch.dtype:
    if previous is not None:
        return previous.dtype
    return torch.promote_types(batch.dtype, torch.float32)
