"""Input validation shared by every backend of the fused losses.

Only shapes, dtypes, devices and Python scalars are inspected: nothing here reads tensor values,
so validation never synchronises the host with the device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .mask import check_seed

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def _tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/bfloat16/float16/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {t.dim()}-D tensor of shape [{_shape(t)}]")


def _same(ref_name: str, ref: torch.Tensor, items: dict) -> None:
    for name, t in items.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: put all inputs on one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: all inputs must share a dtype")


def _param(name: str, t, shape: tuple) -> None:
    _tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        want = "x".join(str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}], got [{_shape(t)}]")


def check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a Python float, got {type(alpha).__name__} {alpha!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")


def check_features(student, teacher) -> None:
    _tensor("student", student, 4)
    _tensor("teacher", teacher, 4)
    _same("student", student, {"teacher": teacher})
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student batch {student.shape[0]} != teacher batch {teacher.shape[0]} "
                         f"(student [{_shape(student)}], teacher [{_shape(teacher)}])")
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"student and teacher features must have the same spatial size: student "
                         f"[{_shape(student)}] (HxW {student.shape[2]}x{student.shape[3]}) vs teacher "
                         f"[{_shape(teacher)}] (HxW {teacher.shape[2]}x{teacher.shape[3]})")


def check_mgd(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, align_w: Optional[torch.Tensor],
              align_b: Optional[torch.Tensor], mask: str, ratio, alpha, seed, sample_offset) -> None:
    check_features(student, teacher)
    cs, ct = student.shape[1], teacher.shape[1]
    if (align_w is None) != (align_b is None):
        raise ValueError("align_w and align_b must be given together (both or neither)")
    if align_w is None and cs != ct:
        raise ValueError(f"student has {cs} channels but teacher has {ct} (student [{_shape(student)}], "
                         f"teacher [{_shape(teacher)}]): pass align_w [{ct}x{cs}x1x1] and align_b [{ct}]")
    if align_w is not None:
        _param("align_w", align_w, (ct, cs, 1, 1))
        _param("align_b", align_b, (ct,))
    _param("gen_w1", gen_w1, (ct, ct, 3, 3))
    _param("gen_b1", gen_b1, (ct,))
    _param("gen_w2", gen_w2, (ct, ct, 3, 3))
    _param("gen_b2", gen_b2, (ct,))
    _same("student", student, {"gen_w1": gen_w1, "gen_b1": gen_b1, "gen_w2": gen_w2, "gen_b2": gen_b2,
                               "align_w": align_w, "align_b": align_b})
    if mask not in ("spatial", "channel"):
        raise ValueError(f"mask must be 'spatial' or 'channel', got {mask!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (the dropped fraction, lambda_mgd) must be a float in [0, 1), got {ratio!r}")
    check_alpha(alpha)
    check_seed(seed)
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, int) or sample_offset < 0:
        raise ValueError(f"sample_offset must be an int >= 0, got {sample_offset!r}")


def check_ct(student, teacher, w1, b1, w2, b2, alpha, reduction) -> None:
    check_features(student, teacher)
    cs, ct = student.shape[1], teacher.shape[1]
    _tensor("w1", w1)
    if w1.dim() not in (2, 4) or w1.shape[1] != cs or (w1.dim() == 4 and tuple(w1.shape[2:]) != (1, 1)):
        raise ValueError(f"w1 must have shape [Ch x {cs}] or [Ch x {cs} x 1 x 1] for a student with {cs} "
                         f"channels, got [{_shape(w1)}]")
    ch = w1.shape[0]
    _param("b1", b1, (ch,))
    _tensor("w2", w2)
    if w2.dim() not in (2, 4) or tuple(w2.shape[:2]) != (ct, ch) or (w2.dim() == 4 and tuple(w2.shape[2:]) != (1, 1)):
        raise ValueError(f"w2 must have shape [{ct} x {ch}] or [{ct} x {ch} x 1 x 1] (teacher channels x "
                         f"hidden width), got [{_shape(w2)}]")
    _param("b2", b2, (ct,))
    _same("student", student, {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    check_alpha(alpha)
    if reduction not in ("sum_over_batch", "mean"):
        raise ValueError(f"reduction must be 'sum_over_batch' or 'mean', got {reduction!r}")


def check_kd(student_logits, teacher_logits, temperature, alpha) -> None:
    _tensor("student_logits", student_logits, 2)
    _tensor("teacher_logits", teacher_logits, 2)
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits is on "
                         f"{student_logits.device}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits [{_shape(student_logits)}] and teacher_logits "
                         f"[{_shape(teacher_logits)}] must have the same shape [N x classes]")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    check_alpha(alpha)
