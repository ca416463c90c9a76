"""Channel-wise logit distillation for dense prediction (the logit loss of MGD's segmentation distiller)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.reference import channel_kd_loss


class ChannelWiseKD(nn.Module):
    """Channel-wise distillation of dense logits (Shu et al., ICCV 2021), as MGD's ``use_logit`` term.

        p_x[n, c] = softmax over the H*W positions of z_x[n, c] / T        (x = student, teacher)
        loss = alpha * T^2 * sum_{n, c} KL(p_t[n, c] || p_s[n, c]) / (N * C)

    MGD's Cityscapes recipes: T = 4, alpha = 3. Shapes: student_logits, teacher_logits [N, C, H, W]
    (the decode heads' outputs, same size) -> 0-d float32 loss. No parameters.

    Example::
        cwd = ChannelWiseKD(temperature=4.0, alpha=3.0)
        loss = cwd(student_logits, teacher_logits)
    """

    def __init__(self, *, temperature: float = 4.0, alpha: float = 3.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.dim() != 4 or student_logits.shape != teacher_logits.shape:
            raise ValueError(f"channel-wise KD needs [N, C, H, W] logits of one shape, got student "
                             f"{list(student_logits.shape)} and teacher {list(teacher_logits.shape)}")
        return channel_kd_loss(student_logits, teacher_logits, temperature=self.temperature, alpha=self.alpha)

    def get_extra_state(self):
        return {"alpha": self.alpha}

    def set_extra_state(self, state):
        self.alpha = float(state.get("alpha", self.alpha))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, alpha={self.alpha:g}"
