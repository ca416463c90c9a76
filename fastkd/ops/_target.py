"""The GPU a Triton launch is bound for: its architecture, SM count and float32 dot precision.

For CUDA tensors that is their device. ``bound_to(arch, sms)`` makes the host functions of the kernel modules
bind launches of CPU tensors as they would on such a GPU (the ahead-of-time audit, benchmarks/gpu_static.py,
runs the real host code on CPU tensors with the launches captured, then compiles what they would launch for
sm_80 / sm_90): tile configs, pixel splits and TF32 follow the bound GPU, not the CPU or the interpreter.

Architecture limits (CUDA C Programming Guide, compute capabilities table) used by the tile configs' prune and
the audit: shared memory per block (opt-in maximum) and per SM, registers per SM, at most 255 per thread.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Tuple

import torch

SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024, 100: 228 * 1024}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = {80: 64, 90: 64, 100: 64}
H100_SMS = 132
FAMILIES = (80, 90)  # the architectures the tile configs are shipped for (sm_100 takes sm_90's)

_bound: Optional[Tuple[int, int]] = None  # (arch, SM count) inside bound_to


@contextlib.contextmanager
def bound_to(arch: int, sms: int = H100_SMS) -> Iterator[None]:
    """Inside: launches of CPU tensors are bound as for a GPU of compute capability ``arch`` (e.g. 90) with
    ``sms`` SMs. Not for running kernels: what is launched must be captured (it would not run on the CPU)."""
    global _bound
    if arch not in SHARED_PER_BLOCK:
        raise ValueError(f"bound_to: architecture {arch} is not one the kernels are audited for "
                         f"({', '.join(f'sm_{a}' for a in SHARED_PER_BLOCK)})")
    before, _bound = _bound, (arch, sms)
    try:
        yield
    finally:
        _bound = before


def family(arch: Optional[int]) -> Optional[int]:
    """The tuned architecture family of a compute capability (86 -> 80, 90 and 100 -> 90; None: no GPU)."""
    if arch is None:
        return None
    fams = [a for a in FAMILIES if a <= arch]
    return max(fams) if fams else None


def on_gpu(t: torch.Tensor) -> bool:
    """Whether launches with ``t`` are bound for a GPU (a CUDA tensor, or any tensor inside bound_to)."""
    return t.is_cuda or _bound is not None


@functools.lru_cache(maxsize=None)
def _props(index: int) -> Tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return 10 * p.major + p.minor, p.multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def arch(device: torch.device) -> Optional[int]:
    """Compute capability (e.g. 90) the launches on ``device`` are bound for; None for the interpreter."""
    if _bound is not None:
        return _bound[0]
    return _props(_index(device))[0] if device.type == "cuda" else None


def sm_count(device: torch.device) -> Optional[int]:
    if _bound is not None:
        return _bound[1]
    return _props(_index(device))[1] if device.type == "cuda" else None
