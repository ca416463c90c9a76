"""The feature losses by name: each one's config class, module, mask seeding and start-up check.

A feature loss is one entry here; the Distiller asks the entry, never the name (docs/losses.md,
"A feature loss of your own"):

    register_loss(MyPairConfig, build_my_loss, seeded=False)          # MyPairConfig.loss is the name

- ``config``: a ``fastkd.config.PairConfig`` subclass made with ``@fastkd.config.config_class`` that
  declares ``loss: Literal["name"] = "name"`` and the loss's own fields (registered on the config side
  too, so YAML pairs with ``loss: name`` validate into it).
- ``build(student_channels, teacher_channels, cfg, alpha, seed, backend) -> nn.Module``: the module of
  one pair. It has a float attribute ``alpha`` (its weight: ``alpha: auto`` sets it after calibration; keep
  it in ``get_extra_state`` so that checkpoints hold it) and ``forward(student, teacher)`` returns the
  weighted 0-d loss of the micro-batch, averaged over its samples (the Distiller scales the terms to
  sum / global count). ``seed`` is the pair's own stream base; ``backend`` the fastkd.ops backend.
- ``seeded``: the module draws random masks. It then owns ``seeds`` (a ``fastkd.losses.SeedStream``,
  saved in its extra state) and its forward takes ``seed=`` and ``sample_offset=``; the Distiller draws
  one seed per step and calls it outside the compiled region. Unseeded modules run inside it.
- ``check(cfg, student, teacher) -> problem or None``: the start-up check of the pair's features on one
  batch (default: both [N,C,H,W] with the same HxW).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional

import torch
from torch import nn

from ..config import ConfigError, CTPairConfig, MGDPairConfig, PairConfig, pair_config_class, register_pair_config
from .ct import CT
from .mgd import MGD

Build = Callable[[int, int, PairConfig, float, int, str], nn.Module]
Check = Callable[[PairConfig, torch.Tensor, torch.Tensor], Optional[str]]


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def same_grid(cfg: PairConfig, student: torch.Tensor, teacher: torch.Tensor) -> Optional[str]:
    """Both features [N,C,H,W] with the same HxW (a per-pixel loss); the channels may differ."""
    s, t = student, teacher
    if s.dim() != 4 or t.dim() != 4:
        return f"features must be [N,C,H,W]; student {_shape(s)}, teacher {_shape(t)}"
    if s.shape[2:] != t.shape[2:]:
        return (f"cannot be paired, spatial sizes differ: student {cfg.student} {_shape(s)} (HxW {s.shape[2]}x"
                f"{s.shape[3]}) vs teacher {cfg.teacher} {_shape(t)} (HxW {t.shape[2]}x{t.shape[3]}); pick "
                f"layers with the same stride")
    return None


@dataclasses.dataclass(frozen=True)
class FeatureLoss:
    """One registered feature loss (see the module docstring)."""
    config: type
    build: Build
    seeded: bool = False
    check: Check = same_grid

    @property
    def name(self) -> str:
        return self.config.loss


_LOSSES: Dict[str, FeatureLoss] = {}


def register_loss(config: type, build: Build, *, seeded: bool = False, check: Check = same_grid) -> FeatureLoss:
    """Register a feature loss under its config class's ``loss`` name (again with the same class: replaced)."""
    register_pair_config(config)  # TypeError naming the class when it is not a proper pair config
    entry = FeatureLoss(config, build, bool(seeded), check)
    _LOSSES[entry.name] = entry
    return entry


def feature_loss(name: str) -> FeatureLoss:
    """The entry of a loss; ConfigError for a name nobody registered (or registered as a config only)."""
    if name not in _LOSSES:
        pair_config_class(name)  # unknown: names the registered losses
        raise ConfigError(f"loss {name!r} has a config class but no module: register it with "
                          f"fastkd.losses.register_loss")
    return _LOSSES[name]


def _mgd(cs: int, ct: int, cfg, alpha: float, seed: int, backend: str) -> nn.Module:
    return MGD(cs, ct, mask=cfg.mask, ratio=cfg.ratio, alpha=alpha, seed=seed, backend=backend)


def _ct(cs: int, ct: int, cfg, alpha: float, seed: int, backend: str) -> nn.Module:
    return CT(cs, ct, cfg.hidden_channels, alpha=alpha, reduction=cfg.reduction, backend=backend)


register_loss(MGDPairConfig, _mgd, seeded=True)
register_loss(CTPairConfig, _ct)
