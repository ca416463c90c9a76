"""Helpers to compare a fast path with the reference (used by tests and benchmarks).

Tolerances are relative to the size of the values compared; see TOLERANCES. For low precision, prefer
``assert_error_within``: the fast path's error against a float32 reference must be at most ``k`` times
the error of plain PyTorch computing the same thing in the same low precision (flash-attention's rule).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

# dtype -> (atol, rtol) for values of order 1, fast path vs reference in the same dtype.
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}

def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                            name: str = "tensor", max_report: int = 5) -> None:
    """torch.allclose with a report of where and by how much the two differ."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=False)
    if not bad.any():
        return
    idx = bad.nonzero()[:max_report]
    diff = (a - e).abs()
    lines = [f"{name}: {int(bad.sum())}/{a.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
             f"max abs diff {diff.max().item():.4g}, max |expected| {e.abs().max().item():.4g}"]
    for i in idx:
        i = tuple(i.tolist())
        lines.append(f"  at {i}: actual {a[i].item():.6g} expected {e[i].item():.6g}")
    raise AssertionError("\n".join(lines))


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, name: str = "tensor",
                        scale: float | None = None) -> None:
    """Compare with TOLERANCES[dtype], the absolute tolerance scaled by max|expected| (or ``scale``)."""
    atol, rtol = TOLERANCES[dtype]
    ref_scale = expected.detach().abs().max().item() if scale is None else scale
    assert_verbose_allclose(actual, expected, atol=atol * max(ref_scale, 1e-30), rtol=rtol, name=name)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_error_within(fast: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor, *, k: float = 2.0,
                        floor: float = 0.0, name: str = "tensor") -> None:
    """|fast - reference| <= k * |plain - reference| + floor, with reference in float32 or float64."""
    err_fast = max_error(fast, reference)
    err_plain = max_error(plain, reference)
    if err_fast > k * err_plain + floor:
        raise AssertionError(f"{name}: fast path error {err_fast:.4g} exceeds {k} x plain-PyTorch error "
                             f"{err_plain:.4g} (+ floor {floor:.3g}) against the float32 reference")


# Fused kernel vs reference, per (op, dtype); shared by the fused-op tests (add rows, do not change them).
#   float32:          |fast - ref| <= atol * max|ref| + rtol * |ref|        (ref: float32 reference)
#   bfloat16/float16: |fast - ref| <= k * |plain - ref| + floor * max|ref|  (assert_error_within; ref:
#                     the reference upcast to float32 on the same low-precision inputs; plain: the
#                     reference run in the low precision itself)
# ct_loss: measured at Cs=12, Ch=20, Ct=24, 5x7 under the interpreter: float32 max error ~3e-7 of the
# largest value; low precision fast/plain error ratio <= 2 except where plain PyTorch is luckily exact
# (ratio up to ~4 at errors < 1e-4 of the largest value, covered by the floor).
# mgd_loss: the fused path rounds what plain PyTorch rounds (A, the hidden activation, G - T, every
# gradient) but keeps G and the loss in fp32; measured on the CPU test grid its error is 0.4x-1.3x plain
# PyTorch's for gradients; the loss, whose plain error is sometimes far below an ulp, is held by the floor
# (about half an ulp of the dtype).
KERNEL_TOLERANCES: Dict[Tuple[str, torch.dtype], Dict[str, float]] = {
    ("ct_loss", torch.float32): {"atol": 1e-5, "rtol": 1e-4},
    ("ct_loss", torch.bfloat16): {"k": 2.0, "floor": 2e-3},
    ("ct_loss", torch.float16): {"k": 2.0, "floor": 5e-4},
    ("mgd_loss", torch.float32): {"atol": 1e-4, "rtol": 1e-4},
    ("mgd_loss", torch.bfloat16): {"k": 2.0, "floor": 2e-3},
    ("mgd_loss", torch.float16): {"k": 2.0, "floor": 2.5e-4},
}


def assert_kernel_close(op: str, dtype: torch.dtype, fast: torch.Tensor, reference: torch.Tensor,
                        plain: torch.Tensor | None = None, *, name: str = "tensor") -> None:
    """Check a fused kernel's output against the reference with the KERNEL_TOLERANCES rule for
    (op, dtype); ``plain`` (the reference in the low precision) is needed for bfloat16/float16."""
    tol = KERNEL_TOLERANCES[(op, dtype)]
    scale = max(reference.detach().abs().max().item(), 1e-30) if reference.numel() else 1.0
    if "atol" in tol:
        assert_verbose_allclose(fast, reference, atol=tol["atol"] * scale, rtol=tol["rtol"], name=name)
        return
    if plain is None:
        raise ValueError(f"{op} in {dtype}: pass plain (the reference computed in {dtype})")
    if fast.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != expected {tuple(reference.shape)}")
    assert_error_within(fast, plain, reference, k=tol["k"], floor=tol["floor"] * scale, name=name)
