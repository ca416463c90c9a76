"""Optimizer and learning-rate schedule (warmup + cosine | step | constant | poly), stepped per optimizer step."""
from __future__ import annotations

import math
from typing import Callable, List

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:  # no decay on biases and norm weights (1-D parameters)
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(cfg: ScheduleConfig, *, total_steps: int, steps_per_epoch: int, base_lr: float) -> Callable[[int], float]:
    """f(step) -> multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_epochs * steps_per_epoch))
    milestones: List[int] = [int(round(m * steps_per_epoch)) for m in cfg.milestones]
    floor = cfg.min_lr / base_lr

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "step":
            return cfg.gamma ** sum(step >= m for m in milestones)
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        if cfg.name == "poly":  # mmseg's PolyLrUpdaterHook (by iteration)
            return floor + (1.0 - floor) * (1.0 - progress) ** cfg.power
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, total_steps: int,
                    steps_per_epoch: int, base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, base_lr=base_lr))
