"""MGD module: owns the align and generation layers and the mask seed stream."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import mgd_loss, preload
from .seeds import SeedStream


class MGD(nn.Module):
    """Masked Generative Distillation (Yang et al., ECCV 2022).

        A = align(S) if Cs != Ct else S                   align: Conv2d(Cs, Ct, 1)
        G = generation(A * M)                             Conv3x3 -> ReLU -> Conv3x3 (Ct -> Ct, biases)
        loss = alpha * sum((G - T)^2) / N

    Shapes: student [N, Cs, H, W], teacher [N, Ct, H, W] -> 0-d float32 loss.
    Each call draws a fresh mask from the module's seed stream (saved in ``state_dict`` as extra
    state, so a resumed run continues it), unless ``seed=`` is given explicitly (the engine draws seeds
    outside the compiled region and passes them in with ``sample_offset``).

    Example::
        mgd = MGD(512, 512, mask="channel", ratio=0.15, alpha=7e-5, seed=0)
        loss = mgd(student_feat, teacher_feat)
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, mask: str = "spatial",
                 ratio: float = 0.65, alpha: float = 2e-5, seed: int = 0, backend: str = "auto"):
        super().__init__()
        cs, ct = int(student_channels), int(teacher_channels)
        self.align = nn.Conv2d(cs, ct, kernel_size=1) if cs != ct else None
        self.generation = nn.Sequential(
            nn.Conv2d(ct, ct, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(ct, ct, kernel_size=3, padding=1))
        self.mask, self.ratio, self.alpha, self.backend = mask, float(ratio), float(alpha), backend
        self.student_channels, self.teacher_channels = cs, ct
        self.seeds = SeedStream(seed)
        preload("mgd_loss")  # imports done eagerly: a first call inside torch.compile must not import

    def next_seed(self) -> int:
        return self.seeds.next()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, seed: Optional[int] = None,
                sample_offset: int = 0) -> torch.Tensor:
        if student.dim() != 4 or teacher.dim() != 4 or student.shape[1] != self.student_channels \
                or teacher.shape[1] != self.teacher_channels:
            raise ValueError(f"MGD built for student {self.student_channels} / teacher {self.teacher_channels} "
                             f"channels got student {list(student.shape)} and teacher {list(teacher.shape)}")
        if seed is None:
            if torch.compiler.is_compiling():
                # The stream's counter would be traced as a constant: one recompilation per step.
                raise RuntimeError("MGD called inside torch.compile without seed=: draw it outside the compiled "
                                   "region with MGD.next_seed() and pass seed= (and sample_offset=)")
            seed = self.seeds.next()
        g1, g2 = self.generation[0], self.generation[2]
        return mgd_loss(student, teacher, g1.weight, g1.bias, g2.weight, g2.bias,
                        align_w=None if self.align is None else self.align.weight,
                        align_b=None if self.align is None else self.align.bias,
                        mask=self.mask, ratio=self.ratio, alpha=self.alpha, seed=seed,
                        sample_offset=sample_offset, backend=self.backend)

    def get_extra_state(self):
        return {"seeds": self.seeds.state(), "alpha": self.alpha}

    def set_extra_state(self, state):
        self.seeds.load_state(state["seeds"])
        self.alpha = float(state.get("alpha", self.alpha))

    def extra_repr(self) -> str:
        return f"mask={self.mask!r}, ratio={self.ratio}, alpha={self.alpha:g}, backend={self.backend!r}"
