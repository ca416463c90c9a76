"""What the fused Triton kernels (ct_triton.py, mgd_triton.py) share.

- ``INTERPRET`` / ``INTERPRETING``: whether the kernels run under TRITON_INTERPRET=1 (tests on the CPU), as
  a host flag and as a compile-time constant for the kernels. Interpreter-only workarounds sit behind it.
- ``dot`` / ``store``: ``tl.dot`` with fp32 accumulation and a store rounding to nearest even, both faithful
  to the GPU under Triton 3.6's interpreter too.
- Host helpers: feature strides as (sample, pixel, channel) rows, the float32 dot precision, the device
  guard, and the row split of the split-K weight-gradient kernels. Precision and parallelism follow the
  GPU the launch is bound for (``_target.py``: the tensors' device, or an ahead-of-time target).
- ``autotune``: ``triton.autotune`` with the tuning table and the tuning mode (see ``_tuning.py``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._target import on_gpu, sm_count
from ._tuning import autotune  # noqa: F401  (re-exported for the kernel modules)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETING = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation; DOT_PREC ("ieee" / "tf32") matters for float32 operands only.
    Triton 3.6's interpreter multiplies bf16/fp16 bit patterns as integers, so there the operands go
    through fp32 (exact products, the same fp32 accumulation as the tensor cores)."""
    if INTERPRETING:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def store(ptr, value, mask):
    """Store ``value`` in ``ptr``'s dtype, rounding to nearest even as the GPU's cvt does. Triton 3.6's
    interpreter truncates float32 -> bfloat16 (a downward bias), so there the rounding is done on the bits."""
    if INTERPRETING:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


def dot_precision(t: torch.Tensor) -> str:
    """float32 follows PyTorch's convolution setting (``torch.backends.cudnn.allow_tf32``, the flag that
    governs the reference's convolutions on the same GPU): TF32 on tensor cores unless disabled; "tf32"
    for bf16/fp16 only names the default (their products are exact)."""
    if t.dtype == torch.float32 and not (on_gpu(t) and torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def pixel_rows(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """(t, (s_n, s_p, s_c)): element (n, c, p = h*W + w) of a 4-D [N, C, H, W] tensor sits at
    n*s_n + p*s_p + c*s_c. NCHW-contiguous and channels_last both fold (h, w) into one pixel index; a
    tensor whose H, W do not (e.g. a spatial slice) is made contiguous first."""
    _, _, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        t = t.contiguous()
    return t, (t.stride(0), t.stride(3) if w > 1 else t.stride(2), t.stride(1))


def nhwc_strides(hw: int, c: int) -> Tuple[int, int, int]:
    """(s_n, s_p, s_c) of a row-major [N*H*W, C] buffer seen as a feature."""
    return hw * c, c, 1


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU even when another one is current (Triton uses the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def parallel_target(device: torch.device) -> int:
    """Programs that keep the device busy: two per SM on a GPU (the bound one, _target.py), 16 elsewhere
    (the interpreter)."""
    sms = sm_count(device)
    return 16 if sms is None else 2 * sms


def split_rows(rows: int, splits: int, align: int) -> Tuple[int, int]:
    """-> (splits, chunk): ``rows`` cut into at most ``splits`` chunks of ``chunk`` rows, a multiple of
    ``align`` (>= every BLOCK_K of the kernel that loops over a chunk with a static bound). The chunks are
    balanced so that the last one is more than half full (splits * chunk - rows < chunk / 2): the masked
    iterations of the last split stay a small fraction of the work."""
    blocks = triton.cdiv(rows, align)
    splits = max(1, min(splits, blocks))
    while True:
        chunk = triton.cdiv(blocks, splits) * align
        used = triton.cdiv(rows, chunk)
        if used == 1 or 2 * (used * chunk - rows) < chunk:
            return used, chunk
        splits -= 1

