"""NTXentLoss: the contrastive loss of SimCLR, and of MoCo when a memory bank is used."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks as check
from ._functional import mask_diagonal
from .memory_bank import BankSize, MemoryBankModule, bank_size_2d


class NTXentLoss(nn.Module):
    """Normalized temperature-scaled cross entropy (SimCLR, Chen et al., 2020).

    Without a bank, each of the 2B embeddings is contrasted with the other 2B - 1 of the
    batch. With a bank (MoCo, He et al., 2019), each `out0` row is contrasted with its
    `out1` partner and the bank's rows; the normalized `out1` is then enqueued, but only
    when `out0` requires grad (lightly's rule: evaluation steps leave the bank alone).

    Args:
        temperature: tau; any value with |tau| >= 1e-8 (lightly allows negative values).
        memory_bank_size: 0 (no bank), `(num_features, dim)`, or a bare `num_features`
            with dim taken from the first batch.
        gather_distributed: accepted; see the README on global batches.

    State: `memory_bank.bank` (num_features, dim) and `memory_bank.bank_ptr` (1,).
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: BankSize = 0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = check.number("temperature", temperature)
        if abs(self.temperature) < 1e-8:
            raise check.fail(
                "temperature", "a number with abs(temperature) >= 1e-8", repr(temperature)
            )
        self.gather_distributed = check.flag("gather_distributed", gather_distributed)
        self.memory_bank = MemoryBankModule(size=bank_size_2d("memory_bank_size", memory_bank_size))

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        """Loss of two views.

        Args:
            out0: (batch_size, dim) embeddings of the first view.
            out1: (batch_size, dim) embeddings of the second view.

        Returns:
            The mean cross entropy, a 0-d tensor.
        """
        check.two_views("out0", out0, "out1", out1, min_rows=1)
        x = F.normalize(out0, dim=1)
        y = F.normalize(out1, dim=1)
        if not self.memory_bank.enabled:
            return _in_batch_loss(x, y, self.temperature)
        check.same_dtype("out0", out0, "out1", out1)  # the bank products need one dtype
        bank = self.memory_bank.read("out1", y, dtype=torch.promote_types(x.dtype, y.dtype))
        loss = _bank_loss(x, y, bank, self.temperature)
        if x.requires_grad:
            self.memory_bank.push(y)
        return loss


def _in_batch_loss(x: Tensor, y: Tensor, temperature: float) -> Tensor:
    """SimCLR loss of unit rows x, y (B, D): row i's positive is its partner in the other view."""
    batch_size = x.shape[0]
    z = torch.cat([x, y])  # (2B, D)
    logits = mask_diagonal(z @ z.T / temperature)  # (2B, 2B), self-similarity excluded
    partner = torch.arange(2 * batch_size, device=x.device).roll(batch_size)
    return F.cross_entropy(logits, partner)


def _bank_loss(x: Tensor, y: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """MoCo loss: positives <x_i, y_i>, negatives <x_i, bank_k> over the bank (K, D)."""
    positive = (x * y).sum(dim=1) / temperature  # (B,)
    negatives = x @ bank.T / temperature  # (B, K)
    # logsumexp over [positive, negatives] without materializing the (B, K + 1) concat
    return (torch.logaddexp(positive, torch.logsumexp(negatives, dim=1)) - positive).mean()
