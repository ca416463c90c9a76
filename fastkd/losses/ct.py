"""CT module: owns the learnable channel-wise transform (a per-pixel two-layer MLP)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import ct_loss, preload


class CT(nn.Module):
    """Feature distillation through a learnable nonlinear channel-wise transformation.

        S' = W2 relu(W1 S + b1) + b2         W1: 1x1 conv Cs -> Ch, W2: 1x1 conv Ch -> Ct (biases)
        loss = alpha * sum((S' - T)^2) / N   (reduction "sum_over_batch"; "mean" divides by N*Ct*H*W)

    Shapes: student [N, Cs, H, W], teacher [N, Ct, H, W] -> 0-d float32 loss. Ch defaults to Ct.

    Example::
        ct = CT(1024, 2048, alpha=2e-5)
        loss = ct(student_feat, teacher_feat)
    """

    def __init__(self, student_channels: int, teacher_channels: int, hidden_channels: Optional[int] = None,
                 *, alpha: float = 2e-5, reduction: str = "sum_over_batch", backend: str = "auto"):
        super().__init__()
        cs, ct = int(student_channels), int(teacher_channels)
        ch = ct if hidden_channels is None else int(hidden_channels)
        self.transform = nn.Sequential(nn.Conv2d(cs, ch, kernel_size=1), nn.ReLU(inplace=True),
                                       nn.Conv2d(ch, ct, kernel_size=1))
        self.alpha, self.reduction, self.backend = float(alpha), reduction, backend
        self.student_channels, self.teacher_channels = cs, ct
        preload("ct_loss")  # imports done eagerly: a first call inside torch.compile must not import

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[1] != self.student_channels \
                or teacher.shape[1] != self.teacher_channels:
            raise ValueError(f"CT built for student {self.student_channels} / teacher {self.teacher_channels} "
                             f"channels got student {list(student.shape)} and teacher {list(teacher.shape)}")
        l1, l2 = self.transform[0], self.transform[2]
        return ct_loss(student, teacher, l1.weight, l1.bias, l2.weight, l2.bias, alpha=self.alpha,
                       reduction=self.reduction, backend=self.backend)

    def get_extra_state(self):
        return {"alpha": self.alpha}

    def set_extra_state(self, state):
        self.alpha = float(state.get("alpha", self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, reduction={self.reduction!r}, backend={self.backend!r}"
