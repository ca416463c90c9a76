"""The loader contract of the trainer: where a process's samples sit in the global batch, and the data position.

Sharding convention (every task's loaders follow it; a user factory should too):
an optimizer step consumes a global batch of G = micro x world x grad_accum samples; micro-step m of
rank r takes chunk c = m * world + r of it, so ``sample_offset = c * micro`` is the global index of the
process's first sample, and the same samples meet the same MGD mask and the same BatchNorm peers
whatever the split between processes and accumulation.

A loader has ``len`` (micro-batches per epoch) and may have ``set_epoch(epoch)`` and
``state_dict()`` / ``load_state_dict(state)`` (exact resume; without them the trainer skips batches).
"""
from __future__ import annotations

from typing import Optional

from ..config import ConfigError


def sample_offset(micro_step: int, rank: int, world: int, micro: int) -> int:
    return (micro_step * world + rank) * micro


def loader_state(loader) -> Optional[dict]:
    return loader.state_dict() if hasattr(loader, "state_dict") else None


def restore_loader(loader, state: Optional[dict], epoch: int) -> int:
    """Put the loader at the saved position; returns micro-batches to skip by hand (0 if it can seek)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if state is None:
        return 0
    if hasattr(loader, "load_state_dict"):
        try:
            loader.load_state_dict(state)
        except ValueError as exc:  # e.g. a different number of processes than when saved
            raise ConfigError(f"cannot restore the data position: {exc}") from None
        return 0
    return int(state.get("position", 0))
