"""Center: an exponential moving average of teacher outputs (DINO, iBOT)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as check
from ._state import StatefulLoss

CENTER_MODES = ("mean",)


def check_center_mode(mode: object, name: str = "center_mode") -> str:
    """The only mode lightly has is "mean"."""
    return check.choice(name, mode, CENTER_MODES)


class Center(StatefulLoss):
    """A buffer `center` of shape `size` moved towards the mean of each batch.

    The mean runs over the dims where `size` is 1: `center <- m * center + (1 - m) * mean`.
    The buffer keeps its dtype (float32) whatever the batch's dtype.

    Args:
        size: shape of the center, e.g. (1, dim).
        mode: "mean".
        momentum: m, in [0, 1].
    """

    def __init__(self, size: tuple[int, ...], mode: str = "mean", momentum: float = 0.9) -> None:
        super().__init__()
        check_center_mode(mode, "mode")
        self.size = tuple(size)
        self.momentum = check.in_unit_interval("momentum", momentum)
        self.reduce_dims = tuple(i for i, s in enumerate(self.size) if s == 1)
        self.center: Tensor
        self.register_buffer("center", torch.zeros(self.size))

    @property
    def value(self) -> Tensor:
        """The current center."""
        return self.center

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Move the center towards the mean of x over the reduced dims."""
        batch_center = x.mean(dim=self.reduce_dims, keepdim=True)
        new = self.center * self.momentum + batch_center * (1 - self.momentum)
        self._change_state(lambda: self.center.copy_(new), "center", new, self.center)
