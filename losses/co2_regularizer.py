"""CO2Regularizer: consistency regularization for contrastive learning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from ._functional import off_diagonal
from .memory_bank import BankSize, MemoryBankModule, bank_size_2d


class CO2Regularizer(nn.Module):
    """Symmetric KL between the two views' distributions over negatives
    ("CO2: Consistent Contrast for Unsupervised Visual Representation Learning",
    Wei et al., 2020).

    Unlike lightly 1.6, whose result is detached (so the term never trains), the value
    returned here carries a gradient to `out0` and `out1`.

    Args:
        alpha: weight of the regularizer.
        t_consistency: temperature of the pseudo-label softmax (> 0).
        memory_bank_size: 0 (negatives from the batch) or a bank, as for NTXentLoss.

    State: `memory_bank.bank`, `memory_bank.bank_ptr`; the normalized `out1` is enqueued
    on every call.
    """

    def __init__(
        self,
        alpha: float = 1,
        t_consistency: float = 0.05,
        memory_bank_size: BankSize = 0,
    ) -> None:
        super().__init__()
        self.alpha = check.number("alpha", alpha)
        self.t_consistency = check.positive("t_consistency", t_consistency)
        self.memory_bank = MemoryBankModule(size=bank_size_2d("memory_bank_size", memory_bank_size))

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Regularizer of two views.

        Args:
            out0: (batch_size, dim) embeddings of the first view.
            out1: (batch_size, dim) embeddings of the second view.

        Returns:
            `alpha * (KL(p||q) + KL(q||p)) / 2`, a 0-d tensor.
        """
        check.two_views("out0", out0, "out1", out1, min_rows=1, one_dtype=True)
        x = F.normalize(out0, dim=1)
        y = F.normalize(out1, dim=1)
        positive = (x * y).sum(dim=1, keepdim=True)  # (B, 1)
        if self.memory_bank.enabled:
            bank = self.memory_bank.read("out1", y, dtype=torch.promote_types(x.dtype, y.dtype))
            neg_x, neg_y = x @ bank.T, y @ bank.T  # (B, K) each
            self.memory_bank.push(y)
        else:
            sim = y @ x.T  # (B, B): sim[i, j] = <y_i, x_j>
            batch_size = sim.shape[0]
            neg_x = off_diagonal(sim.T).view(batch_size, batch_size - 1)
            neg_y = off_diagonal(sim).view(batch_size, batch_size - 1)
        p = F.log_softmax(torch.cat([positive, neg_x], dim=1) / self.t_consistency, dim=1)
        q = F.log_softmax(torch.cat([positive, neg_y], dim=1) / self.t_consistency, dim=1)
        div = F.kl_div(p, q, reduction="batchmean", log_target=True) + F.kl_div(
            q, p, reduction="batchmean", log_target=True
        )
        return self.alpha * 0.5 * div
