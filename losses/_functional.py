"""Small tensor helpers used by several losses."""

from __future__ import annotations

import torch
from torch import Tensor


def off_diagonal(x: Tensor) -> Tensor:
    """The off-diagonal entries of the trailing (n, n) matrices of `x` (..., n, n).

    Returns (..., n * (n - 1)). A view when `x` is contiguous: no mask, no copy.
    """
    n = x.shape[-1]
    flat = x.reshape(*x.shape[:-2], n * n)[..., :-1]
    return flat.reshape(*x.shape[:-2], n - 1, n + 1)[..., 1:].reshape(*x.shape[:-2], -1)


def mask_diagonal(logits: Tensor) -> Tensor:
    """`logits` (n, m) with entries [i, i] set to -inf, so softmax and logsumexp skip them."""
    eye = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(eye, float("-inf"))
