"""A step that leaves non-finite weights or optimizer state must never become a checkpoint.

The loss of a step can be finite while its optimizer step writes inf/NaN (an overflowing update of a
huge learning rate or alpha). ``state_is_finite`` therefore looks at what a checkpoint would hold: the
fp32 master weights and the optimizer state the optimizer owns, and the floating buffers (BatchNorm
statistics) of the module. Under ZeRO each rank holds a partition of them; the engine sums the flags of
all ranks in the one all-reduce it makes per step anyway, so the verdict is exact in every ZeRO stage.

Cost: one ``torch._foreach_norm(ord=inf)`` per (device, dtype) group, i.e. one fused read of the
optimizer's tensors per step (a few flat partitions under ZeRO 1-3), and no extra host sync. The same pass
gives the largest weight, which the stop message reports for the last good step and checkpoint (finite
weights can still be absurd just before a blow-up).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn


def master_weights(optimizer) -> List[torch.Tensor]:
    """The weights a DeepSpeed (or plain torch) optimizer updates: the fp32 master partitions under ZeRO,
    its parameters otherwise, each once."""
    base = getattr(optimizer, "optimizer", optimizer)
    found: List[torch.Tensor] = []
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # ZeRO-3, ZeRO-1/2
        found.extend(t for t in getattr(optimizer, name, None) or [] if isinstance(t, torch.Tensor))
    found.extend(p for g in base.param_groups for p in g["params"])
    return _unique(found)


def optimizer_tensors(optimizer) -> List[torch.Tensor]:
    """The master weights and state tensors behind a DeepSpeed (or plain torch) optimizer, each once."""
    base = getattr(optimizer, "optimizer", optimizer)
    states = [v for state in base.state.values() for v in state.values()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return _unique(master_weights(optimizer) + states)


def _unique(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen and t.numel() > 0 and t.is_floating_point():
            seen.add(id(t))
            out.append(t.detach())
    return out


def module_buffers(module: nn.Module) -> List[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point() and b.numel() > 0]


def max_abs(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """max |x| over every tensor, float64 on ``device`` (inf or NaN when one holds such), no host sync."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    peak = torch.zeros((), dtype=torch.float64, device=device)
    for ts in groups.values():
        peak = torch.maximum(peak, torch.stack(torch._foreach_norm(ts, math.inf)).max().to(device, torch.float64))
    return peak  # torch.maximum propagates NaN


def nonfinite_flag(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 on ``device`` if any tensor holds an inf or NaN, else 0.0 (float64, no host sync)."""
    return (~torch.isfinite(max_abs(tensors, device))).to(torch.float64)


def state_check(engine, module: nn.Module, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(non-finite flag, max |weight|) of this rank's share of what a checkpoint of ``engine`` would hold:
    one read of the weights, the optimizer state and the module's floating buffers."""
    weights = master_weights(engine.optimizer)
    ids = {id(t) for t in weights}
    rest = [t for t in optimizer_tensors(engine.optimizer) + module_buffers(module) if id(t) not in ids]
    weight_peak = max_abs(weights, device)
    return (~torch.isfinite(torch.maximum(weight_peak, max_abs(rest, device)))).to(torch.float64), weight_peak


def state_flag(engine, module: nn.Module, device: torch.device) -> torch.Tensor:
    """Non-finite flag of this rank's share of what a checkpoint of ``engine`` would hold."""
    return state_check(engine, module, device)[0]
