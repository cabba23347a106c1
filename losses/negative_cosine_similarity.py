"""NegativeCosineSimilarity: the SimSiam / BYOL objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check


class NegativeCosineSimilarity(nn.Module):
    """Minus the mean cosine similarity ("Exploring Simple Siamese Representation
    Learning", Chen and He, 2020).

    Args:
        dim: the dimension along which the cosine similarity is taken.
        eps: lower bound of the norms in the denominator.
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim = check.integer("dim", dim)
        self.eps = check.positive("eps", eps)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Loss of two broadcastable tensors, e.g. (batch_size, dim) each.

        Returns:
            `-mean(cosine_similarity(x0, x1, dim))`, a 0-d tensor.
        """
        check.tensor("x0", x0, min_ndim=1)
        check.tensor("x1", x1, min_ndim=1)
        try:
            shape = torch.broadcast_shapes(x0.shape, x1.shape)
        except RuntimeError:
            raise check.fail(
                "x1", f"broadcastable with `x0` {tuple(x0.shape)}", f"shape {tuple(x1.shape)}"
            ) from None
        if 0 in shape:
            raise check.fail(
                "x0", "non-empty tensors", f"shapes {tuple(x0.shape)} and {tuple(x1.shape)}"
            )
        if not -len(shape) <= self.dim < len(shape):
            raise check.fail(
                "x0",
                f"a tensor with a dim {self.dim} (the `dim` argument)",
                f"shape {tuple(shape)}",
            )
        return -F.cosine_similarity(x0, x1, self.dim, self.eps).mean()
