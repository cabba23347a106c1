"""KoLeoLoss: Kozachenko-Leonenko entropy estimator, as used in DINOv2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check


class KoLeoLoss(nn.Module):
    """Spreads embeddings apart by maximizing the log distance to each nearest neighbour
    ("Spreading vectors for similarity search", Sablayrolles et al., 2018; DINOv2).

    Args:
        p: the norm of the distance (p-norm).
        eps: added to norms and distances for stability.
    """

    def __init__(self, p: float = 2, eps: float = 1e-8) -> None:
        super().__init__()
        self.p = check.positive("p", p)
        self.eps = check.positive("eps", eps)

    def forward(self, x: Tensor) -> Tensor:
        """Loss of a batch.

        Args:
            x: (batch_size, dim) embeddings.

        Returns:
            `-mean_i log(||x_i - x_nn(i) + eps||_p + eps)` on L2-normalized rows, 0-d.
        """
        check.tensor("x", x, ndim=2, shape_hint="(batch_size, dim)")
        check.min_batch("x", x, minimum=1)
        x = F.normalize(x, p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            # Nearest neighbour by cosine similarity; -2 on the diagonal excludes self.
            similarity = x @ x.T
            similarity.fill_diagonal_(-2)
            neighbour = similarity.argmax(dim=1)
        distance = F.pairwise_distance(x, x[neighbour], p=self.p, eps=self.eps)
        return -(distance + self.eps).log().mean()
