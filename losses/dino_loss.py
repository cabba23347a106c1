"""DINOLoss: self-distillation with no labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from ._state import StatefulLoss
from .center import check_center_mode


class DINOLoss(StatefulLoss):
    """DINO ("Emerging Properties in Self-Supervised Vision Transformers", Caron et al., 2021).

    Cross entropy between the centered, sharpened teacher distribution of each teacher
    view and the student distribution of every other view.

    Args:
        output_dim: D, the size of the output distribution.
        warmup_teacher_temp: teacher temperature at epoch 0 of the warmup.
        teacher_temp: teacher temperature after the warmup (and when no epoch is given).
        warmup_teacher_temp_epochs: W; the temperature moves linearly over epochs 0..W-1.
        student_temp: student temperature (> 0).
        center_momentum: momentum of the center, in [0, 1].
        center_mode: "mean".

    State: `center` (1, 1, output_dim) float32, moved after every call towards the mean
    teacher output (also under `torch.no_grad()`), as lightly does.
    """

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
    ) -> None:
        super().__init__()
        self.output_dim = check.integer("output_dim", output_dim, minimum=1)
        self.teacher_temp = check.positive("teacher_temp", teacher_temp)
        warmup = check.positive("warmup_teacher_temp", warmup_teacher_temp)
        self.warmup_teacher_temp_epochs = check.integer(
            "warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, minimum=0
        )
        self.student_temp = check.positive("student_temp", student_temp)
        self.center_momentum = check.in_unit_interval("center_momentum", center_momentum)
        self.center_mode = check_center_mode(center_mode)
        # lightly's schedule is a float32 linspace; keep its exact values.
        self.teacher_temp_schedule: list[float] = torch.linspace(
            warmup, self.teacher_temp, self.warmup_teacher_temp_epochs, device="cpu"
        ).tolist()
        self.center: Tensor
        self.register_buffer("center", torch.zeros(1, 1, self.output_dim))

    def forward(
        self,
        teacher_out: list[Tensor],
        student_out: list[Tensor],
        teacher_temp: float | None = None,
        epoch: int | None = None,
    ) -> Tensor:
        """Loss of teacher and student views.

        Args:
            teacher_out: V_t tensors (batch_size, output_dim), usually the global views.
            student_out: V_s tensors (batch_size, output_dim), the same globals first.
            teacher_temp: this step's teacher temperature; overrides `epoch`.
            epoch: picks the teacher temperature from the warmup schedule (lightly 1.5).

        Returns:
            The mean over the V_t * V_s - min(V_t, V_s) view pairs with different
            indices and over the batch, a 0-d tensor.
        """
        hint = "(batch_size, output_dim)"
        teachers = check.tensor_list("teacher_out", teacher_out, shape_hint=hint)
        students = check.tensor_list("student_out", student_out, shape_hint=hint)
        _check_views(teachers, students, self.output_dim)
        temperature = self._teacher_temperature(teacher_temp, epoch)
        t = torch.stack(teachers)  # (V_t, B, D)
        s = torch.stack(students)  # (V_s, B, D)
        teacher_probs = F.softmax((t - self.center) / temperature, dim=-1)
        student_logp = F.log_softmax(s / self.student_temp, dim=-1).to(teacher_probs.dtype)
        # Sum over all (teacher, student) view pairs, minus the pairs of the same index:
        # one contraction with the students' sum instead of one per pair.
        shared = min(len(teachers), len(students))
        all_pairs = torch.einsum("tbd,bd->", teacher_probs, student_logp.sum(dim=0))
        same_index = torch.einsum("vbd,vbd->", teacher_probs[:shared], student_logp[:shared])
        n_terms = len(teachers) * len(students) - shared
        loss = -(all_pairs - same_index) / (n_terms * t.shape[1])
        self.update_center(t)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """Move the center towards the mean of teacher_out (views, batch_size, output_dim)."""
        batch_center = teacher_out.mean(dim=(0, 1), keepdim=True)
        m = self.center_momentum
        new = self.center * m + batch_center * (1 - m)
        self._change_state(lambda: self.center.copy_(new), "center", new, self.center)

    def _teacher_temperature(self, teacher_temp: object, epoch: object) -> float:
        if teacher_temp is not None:
            return check.positive("teacher_temp", teacher_temp)
        if epoch is None:
            return self.teacher_temp
        epoch = check.integer("epoch", epoch)
        schedule = self.teacher_temp_schedule
        if epoch < -len(schedule):
            raise check.fail("epoch", f"an integer >= {-len(schedule)}", repr(epoch))
        return schedule[epoch] if epoch < len(schedule) else self.teacher_temp


def _check_views(teachers: list[Tensor], students: list[Tensor], output_dim: int) -> None:
    first = teachers[0]
    check.min_batch("teacher_out[0]", first, minimum=1)
    for name, views in (("teacher_out", teachers), ("student_out", students)):
        for i, view in enumerate(views):
            check.size_at(f"{name}[{i}]", view, 1, output_dim, "output_dim")
            check.size_at(
                f"{name}[{i}]", view, 0, first.shape[0], "the batch size of teacher_out[0]"
            )
    if len(teachers) * len(students) - min(len(teachers), len(students)) == 0:
        raise check.fail(
            "teacher_out and student_out",
            "at least two views in total (pairs of the same view index are skipped)",
            f"{len(teachers)} teacher and {len(students)} student view(s)",
        )
