"""IBOTPatchLoss: masked patch-token self-distillation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from ._state import StatefulLoss
from .center import Center, check_center_mode


class IBOTPatchLoss(StatefulLoss):
    """The patch loss of iBOT ("iBOT: Image BERT Pre-Training with Online Tokenizer",
    Zhou et al., 2021), as used in DINOv2.

    Cross entropy between the centered teacher distribution and the student distribution
    of each masked patch token, averaged per image, then over the images.

    Args:
        output_dim: D, the size of the output distribution.
        teacher_temp: default teacher temperature (> 0).
        student_temp: student temperature (> 0).
        center_mode: "mean".
        center_momentum: momentum of the center, in [0, 1].

    State: `center.center` (1, output_dim) float32, moved after every call towards the
    mean teacher output over the masked tokens. A batch without masked tokens leaves it
    alone (lightly would set it to NaN for good).
    """

    def __init__(
        self,
        output_dim: int = 65536,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_mode: str = "mean",
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.output_dim = check.integer("output_dim", output_dim, minimum=1)
        self.teacher_temp = check.positive("teacher_temp", teacher_temp)
        self.student_temp = check.positive("student_temp", student_temp)
        check_center_mode(center_mode)
        check.in_unit_interval("center_momentum", center_momentum)
        self.center = Center(size=(1, self.output_dim), mode=center_mode, momentum=center_momentum)

    def forward(
        self,
        teacher_out: Tensor,
        student_out: Tensor,
        mask: Tensor,
        teacher_temp: float | None = None,
    ) -> Tensor:
        """Loss of the masked tokens of a batch of images.

        Args:
            teacher_out: (N, output_dim) teacher outputs of the masked tokens, in the
                row-major order of the True entries of `mask`.
            student_out: (N, output_dim) student outputs of the same tokens.
            mask: (batch_size, height, width) bool, True where a token is masked; N is
                its number of True entries.
            teacher_temp: this step's teacher temperature (> 0).

        Returns:
            `sum_n ce_n / max(1, masked tokens in n's image) / batch_size`, a 0-d tensor.
        """
        hint = "(num_masked_tokens, output_dim)"
        check.tensor("teacher_out", teacher_out, ndim=2, shape_hint=hint)
        check.tensor("student_out", student_out, ndim=2, shape_hint=hint)
        check.bool_tensor("mask", mask, ndim=3, shape_hint="(batch_size, height, width)")
        check.min_batch("mask", mask, minimum=1)
        check.size_at("teacher_out", teacher_out, 1, self.output_dim, "output_dim")
        check.same_shape("teacher_out", teacher_out, "student_out", student_out)
        temperature = (
            self.teacher_temp
            if teacher_temp is None
            else check.positive("teacher_temp", teacher_temp)
        )
        per_image = mask.sum(dim=(1, 2))  # (B,)
        num_masked = int(per_image.sum())  # the one host sync; mask indexing needs it anyway
        if num_masked != teacher_out.shape[0]:
            raise check.fail(
                "teacher_out",
                f"{num_masked} rows, one per True entry of `mask`",
                f"shape {tuple(teacher_out.shape)}",
            )
        teacher_probs = F.softmax((teacher_out - self.center.value) / temperature, dim=-1)
        student_logp = F.log_softmax(student_out / self.student_temp, dim=-1)
        ce = -(teacher_probs * student_logp).sum(dim=-1)  # (N,)
        image_weight = 1.0 / per_image.clamp(min=1).to(ce.dtype)  # (B,)
        token_weight = image_weight.repeat_interleave(per_image, output_size=num_masked)  # (N,)
        loss = (ce * token_weight).sum() / mask.shape[0]
        if num_masked > 0:
            self.center.update(teacher_out)
        return loss
