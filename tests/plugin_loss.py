"""Two feature losses fastkd has never seen, registered from outside the package (tests/test_loss_registry.py).

``l2proj``: plain L2 between the 1x1-projected student feature and the teacher's.
``dropl2``: the same on a random subset of the pixels, drawn from the step's seed (a seeded loss: the
Distiller draws its seeds and calls it outside the compiled region). A config names this module in
``imports: [tests.plugin_loss]`` to use them from the CLI.
"""
from typing import Literal, Optional

import torch
from torch import nn

from fastkd.config import PairConfig, config_class
from fastkd.losses import SeedStream, register_loss


@config_class
class L2ProjPairConfig(PairConfig):
    loss: Literal["l2proj"] = "l2proj"
    """Distillation loss for this pair."""


class L2Proj(nn.Module):
    """loss = alpha * sum((conv1x1(S) - T)^2) / N; student [N, Cs, H, W], teacher [N, Ct, H, W]."""

    def __init__(self, student_channels: int, teacher_channels: int, *, alpha: float):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        self.alpha = float(alpha)

    def squared_error(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (self.proj(student).float() - teacher.float()) ** 2

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.squared_error(student, teacher).sum() / student.shape[0]

    def get_extra_state(self):
        return {"alpha": self.alpha}

    def set_extra_state(self, state):
        self.alpha = float(state["alpha"])


register_loss(L2ProjPairConfig, lambda cs, ct, cfg, alpha, seed, backend: L2Proj(cs, ct, alpha=alpha))


@config_class
class DropL2PairConfig(PairConfig):
    loss: Literal["dropl2"] = "dropl2"
    """Distillation loss for this pair."""
    keep: float = 0.5
    """Fraction of the pixels kept."""

    def __post_init__(self):
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        super().__post_init__()


class DropL2(L2Proj):
    """L2Proj on the pixels a mask keeps; the mask (one per step, shared by the samples) comes from ``seed``."""

    def __init__(self, student_channels: int, teacher_channels: int, *, alpha: float, keep: float, seed: int):
        super().__init__(student_channels, teacher_channels, alpha=alpha)
        self.keep = keep
        self.seeds = SeedStream(seed)
        self.seen = []  # the seeds of the calls, for the tests

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, seed: int, sample_offset: int = 0):
        self.seen.append(seed)
        gen = torch.Generator().manual_seed(seed)
        keep = (torch.rand(student.shape[2:], generator=gen) < self.keep).to(student.device)
        return self.alpha * (self.squared_error(student, teacher) * keep).sum() / student.shape[0]

    def get_extra_state(self):
        return {"alpha": self.alpha, "seeds": self.seeds.state()}

    def set_extra_state(self, state):
        self.alpha = float(state["alpha"])
        self.seeds.load_state(state["seeds"])


def at_least_2x2(cfg: PairConfig, student: torch.Tensor, teacher: torch.Tensor) -> Optional[str]:
    """A pixel mask needs pixels: [N,C,H,W] features of the same HxW, at least 2x2."""
    if student.dim() != 4 or student.shape[2:] != teacher.shape[2:] or min(student.shape[2:]) < 2:
        return f"dropl2 needs [N,C,H,W] features of the same HxW, at least 2x2; got {list(student.shape)} " \
               f"and {list(teacher.shape)}"
    return None


def build_drop_l2(student_channels, teacher_channels, cfg, alpha, seed, backend):
    return DropL2(student_channels, teacher_channels, alpha=alpha, keep=cfg.keep, seed=seed)


register_loss(DropL2PairConfig, build_drop_l2, seeded=True, check=at_least_2x2)
