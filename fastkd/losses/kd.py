"""Logit KD module (Hinton et al. 2015)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import kd_loss, preload


class LogitKD(nn.Module):
    """``alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, mean over the batch.

    Shapes: student_logits, teacher_logits [N, classes] -> 0-d float32 loss. No parameters.

    Example::
        kd = LogitKD(temperature=4.0, alpha=1.0)
        loss = kd(student_logits, teacher_logits)
    """

    def __init__(self, *, temperature: float = 4.0, alpha: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.temperature, self.alpha, self.backend = float(temperature), float(alpha), backend
        preload("kd_loss")

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, temperature=self.temperature, alpha=self.alpha,
                       backend=self.backend)

    def get_extra_state(self):
        return {"alpha": self.alpha}

    def set_extra_state(self, state):
        self.alpha = float(state.get("alpha", self.alpha))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, alpha={self.alpha:g}"
