"""PMSNLoss and PMSNCustomLoss: MSN with a prior on the prototype distribution."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from .msn_loss import MSNLoss

TargetDistribution = Callable[[Tensor], Tensor]


def power_law_distribution(
    size: int, exponent: float, device: torch.device | str = "cpu"
) -> Tensor:
    """q_k proportional to k^-exponent for k = 1..size, float32, summing to 1; (size,)."""
    q = torch.arange(1, size + 1, dtype=torch.float32, device=device) ** (-exponent)
    return q / q.sum()


def uniform_distribution(mean_anchor_probs: Tensor) -> Tensor:
    """The uniform distribution over the K prototypes of mean_anchor_probs (K,)."""
    k = mean_anchor_probs.shape[0]
    return torch.full((k,), 1.0 / k, device=mean_anchor_probs.device)


def power_law(mean_anchor_probs: Tensor) -> Tensor:
    """The power law with exponent 0.25 (PMSN's default) over the K prototypes."""
    return power_law_distribution(mean_anchor_probs.shape[0], 0.25, mean_anchor_probs.device)


#: Target distributions that can be chosen by name, e.g. over the wire.
TARGET_DISTRIBUTIONS: dict[str, TargetDistribution] = {
    "power_law": power_law,
    "uniform": uniform_distribution,
}


class PMSNLoss(MSNLoss):
    """PMSN ("The Hidden Uniform Cluster Prior in Self-Supervised Learning", Assran et al.,
    2022): MSN whose regularizer is KL(power law || mean anchor assignment).

    Args:
        temperature, sinkhorn_iterations, regularization_weight, gather_distributed: as
            for MSNLoss.
        power_law_exponent: the prior is q_k proportional to k^-exponent.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1,
        power_law_exponent: float = 0.25,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=regularization_weight,
            gather_distributed=gather_distributed,
        )
        self.power_law_exponent = check.number("power_law_exponent", power_law_exponent)

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """KL(power law || mean anchor assignment (K,))."""
        q = power_law_distribution(
            mean_anchor_probs.shape[0], self.power_law_exponent, mean_anchor_probs.device
        )
        return F.kl_div(mean_anchor_probs.log(), q, reduction="sum")


class PMSNCustomLoss(MSNLoss):
    """PMSN with any prior: KL(target_distribution(m) || m) for the mean assignment m.

    Args:
        target_distribution: a callable `(K,) mean assignment -> (K,) prior`, or a name
            from `TARGET_DISTRIBUTIONS` ("uniform", "power_law").
        temperature, sinkhorn_iterations, regularization_weight, gather_distributed: as
            for MSNLoss.
    """

    def __init__(
        self,
        target_distribution: TargetDistribution | str,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        regularization_weight: float = 1,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__(
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            regularization_weight=regularization_weight,
            gather_distributed=gather_distributed,
        )
        if not callable(target_distribution):
            name = check.choice(
                "target_distribution", target_distribution, sorted(TARGET_DISTRIBUTIONS)
            )
            target_distribution = TARGET_DISTRIBUTIONS[name]
        self.target_distribution = target_distribution

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """KL(target_distribution(m) || m) for the mean anchor assignment m (K,)."""
        q = self.target_distribution(mean_anchor_probs).to(mean_anchor_probs.device)
        return F.kl_div(mean_anchor_probs.log(), q, reduction="sum")
