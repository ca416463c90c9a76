"""A step that leaves non-finite weights or optimizer state must never become a checkpoint.

The loss of a step can be finite while its optimizer step writes inf/NaN (an overflowing update of a
huge learning rate or alpha). ``state_is_finite`` therefore looks at what a checkpoint would hold: the
fp32 master weights and the optimizer state the optimizer owns, and the floating buffers (BatchNorm
statistics) of the module. Under ZeRO each rank holds a partition of them; the engine sums the flags of
all ranks in the one all-reduce it makes per step anyway, so the verdict is exact in every ZeRO stage.

Cost: one ``torch._foreach_norm(ord=inf)`` per (device, dtype) group, i.e. one fused read of the
optimizer's tensors per step (a few flat partitions under ZeRO 1-3), and no extra host sync.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn


def optimizer_tensors(optimizer) -> List[torch.Tensor]:
    """The master weights and state tensors behind a DeepSpeed (or plain torch) optimizer, each once."""
    base = getattr(optimizer, "optimizer", optimizer)
    found: List[torch.Tensor] = []
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        found.extend(t for t in getattr(optimizer, name, None) or [] if isinstance(t, torch.Tensor))
    found.extend(p for g in base.param_groups for p in g["params"])
    for state in base.state.values():
        found.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    seen, out = set(), []
    for t in found:
        if id(t) not in seen and t.numel() > 0 and t.is_floating_point():
            seen.add(id(t))
            out.append(t.detach())
    return out


def module_buffers(module: nn.Module) -> List[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point() and b.numel() > 0]


def nonfinite_flag(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 on ``device`` if any tensor holds an inf or NaN, else 0.0 (float64, no host sync)."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    flag = torch.zeros((), dtype=torch.float64, device=device)
    for ts in groups.values():
        peak = torch.stack(torch._foreach_norm(ts, math.inf))  # max |x|: inf or NaN iff one is
        flag = flag + (~torch.isfinite(peak)).any().to(device, torch.float64)
    return flag


def state_flag(engine, module: nn.Module, device: torch.device) -> torch.Tensor:
    """Non-finite flag of this rank's share of what a checkpoint of ``engine`` would hold."""
    return nonfinite_flag(optimizer_tensors(engine.optimizer) + module_buffers(module), device)
