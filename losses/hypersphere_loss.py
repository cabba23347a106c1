"""HypersphereLoss: alignment and uniformity on the hypersphere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check


class HypersphereLoss(nn.Module):
    """Alignment + uniformity ("Understanding Contrastive Representation Learning through
    Alignment and Uniformity on the Hypersphere", Wang and Isola, 2020).

    Args:
        t: scale of the uniformity kernel.
        lam: weight of the uniformity term.
        alpha: exponent of the alignment distance.
    """

    def __init__(self, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0) -> None:
        super().__init__()
        self.t = check.number("t", t)
        self.lam = check.number("lam", lam)
        self.alpha = check.number("alpha", alpha)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Loss of two views.

        Args:
            z_a: (batch_size, dim) embeddings, batch_size >= 2.
            z_b: (batch_size, dim) embeddings of the second view.

        Returns:
            `align(x, y) + lam * (unif(x) + unif(y)) / 2` on L2-normalized rows, 0-d.
        """
        check.two_views("z_a", z_a, "z_b", z_b, min_rows=2)
        x = F.normalize(z_a, dim=1)
        y = F.normalize(z_b, dim=1)
        align = (x - y).norm(dim=1).pow(self.alpha).mean()
        return align + self.lam * (self._uniformity(x) + self._uniformity(y)) / 2

    def _uniformity(self, x: Tensor) -> Tensor:
        """log of the mean Gaussian potential over the B(B-1)/2 pairs of rows of x (B, D)."""
        distance = torch.pdist(_at_least_float32(x))  # no half-precision pdist kernel
        return distance.pow(2).mul(-self.t).exp().mean().log().to(x.dtype)


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
