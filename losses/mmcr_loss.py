"""MMCRLoss: maximum manifold capacity representations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks as check


class MMCRLoss(nn.Module):
    """MMCR ("Learning Efficient Coding of Natural Images with Maximum Manifold Capacity
    Representations", Yerxa et al., 2023).

    Args:
        lmda: weight of the per-sample nuclear norm term (>= 0).
    """

    def __init__(self, lmda: float = 5e-3) -> None:
        super().__init__()
        self.lmda = check.non_negative("lmda", lmda)

    def forward(self, online: Tensor, momentum: Tensor) -> Tensor:
        """Loss of k views per sample from two encoders.

        Args:
            online: (batch_size, k, dim) online-encoder embeddings.
            momentum: (batch_size, k, dim) momentum-encoder embeddings (gets a gradient
                too: lightly does not detach it).

        Returns:
            `-||mean_views(z)||_* + lmda * mean_b ||z_b||_*` with z = [online, momentum]
            (batch_size, 2k, dim) and ||.||_* the nuclear norm; 0-d.
        """
        hint = "(batch_size, k, dim)"
        check.tensor("online", online, ndim=3, shape_hint=hint)
        check.tensor("momentum", momentum, ndim=3, shape_hint=hint)
        check.same_shape("online", online, "momentum", momentum)
        if online.shape[1] < 1:
            raise check.fail(
                "online",
                "a tensor with at least 1 view along dim 1",
                f"shape {tuple(online.shape)}",
            )
        z = torch.cat([online, momentum], dim=1)  # (B, 2k, D)
        centroids = z.mean(dim=1)  # (B, D)
        loss = -_nuclear_norm(centroids) + self.lmda * _nuclear_norm(z).sum() / z.shape[0]
        return loss.to(z.dtype)


def _nuclear_norm(x: Tensor) -> Tensor:
    """Sum of singular values of the trailing matrices of x; float16/bfloat16 in float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # no half-precision SVD kernels
    return torch.linalg.svdvals(x).sum(dim=-1)
