"""SymNegCosineSimilarityLoss: symmetrized SimSiam loss (lightly 1.5; removed in 1.6)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check


class SymNegCosineSimilarityLoss(nn.Module):
    """Symmetrized negative cosine similarity with stop-gradient on the projections
    ("Exploring Simple Siamese Representation Learning", Chen and He, 2020).

    Prefer `NegativeCosineSimilarity`; this class keeps lightly 1.5 code working.
    """

    def __init__(self) -> None:
        # Explicit, so that the constructor's signature is lightly's `()` rather than
        # nn.Module's `(*args, **kwargs)`.
        super().__init__()

    def forward(self, out0: tuple[Tensor, Tensor], out1: tuple[Tensor, Tensor]) -> Tensor:
        """Loss of two views, each a pair `(z, p)` of (batch_size, dim) tensors.

        z is the projection (no gradient reaches it), p the prediction.

        Returns:
            `(-mean cos(p0, z1) - mean cos(p1, z0)) / 2`, a 0-d tensor.
        """
        z0, p0 = _view("out0", out0)
        z1, p1 = _view("out1", out1)
        for name, t in (("out1[0]", z1), ("out0[1]", p0), ("out1[1]", p1)):
            check.same_shape("out0[0]", z0, name, t)
        check.min_batch("out0[0]", z0, minimum=1)
        return 0.5 * (_negative_cosine(p0, z1) + _negative_cosine(p1, z0))


def _view(name: str, value: object) -> tuple[Tensor, Tensor]:
    z, p = check.pair(name, value)
    hint = "(batch_size, dim)"
    return (
        check.tensor(f"{name}[0]", z, ndim=2, shape_hint=hint),
        check.tensor(f"{name}[1]", p, ndim=2, shape_hint=hint),
    )


def _negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    return -F.cosine_similarity(p, z.detach(), dim=-1, eps=1e-8).mean()
