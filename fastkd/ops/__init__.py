"""fastkd.ops: the distillation losses, functional API (torch.nn.functional style).

    mgd_loss(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, *, align_w=None, align_b=None,
             mask="spatial"|"channel", ratio=0.65, alpha=2e-5, seed, sample_offset=0, backend="auto")
    ct_loss(student, teacher, w1, b1, w2, b2, *, alpha=1.0, reduction="sum_over_batch"|"mean",
            backend="auto")
    kd_loss(student_logits, teacher_logits, *, temperature=4.0, alpha=1.0, backend="auto")

Every backend computes the same function (and draws the same MGD mask for the same seed); the
reference backend (``fastkd.ops.reference``) is the oracle. Each returns a 0-d float32 tensor.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import checks, dispatch
from .dispatch import BackendUnavailableError, explain, preload
from .mask import mgd_keep_mask, philox_uniform

__all__ = ["mgd_loss", "ct_loss", "kd_loss", "explain", "preload", "BackendUnavailableError", "mgd_keep_mask",
           "philox_uniform"]


def mgd_loss(student: torch.Tensor, teacher: torch.Tensor, gen_w1: torch.Tensor, gen_b1: torch.Tensor,
             gen_w2: torch.Tensor, gen_b2: torch.Tensor, *, align_w: Optional[torch.Tensor] = None,
             align_b: Optional[torch.Tensor] = None, mask: str = "spatial", ratio: float = 0.65,
             alpha: float = 2e-5, seed: int, sample_offset: int = 0, backend: str = "auto") -> torch.Tensor:
    """Masked Generative Distillation loss ``alpha * sum((G - T)^2) / N`` (METHODS.md section 1).

    student [N, Cs, H, W], teacher [N, Ct, H, W]; align_w [Ct, Cs, 1, 1] / align_b [Ct] when Cs != Ct;
    gen_w1, gen_w2 [Ct, Ct, 3, 3], gen_b1, gen_b2 [Ct]. The keep-mask is drawn from ``seed`` by the
    counter-based contract of ``fastkd.ops.mask`` (``sample_offset`` = global index of sample 0).
    """
    checks.check_mgd(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b, mask, ratio,
                     alpha, seed, sample_offset)
    args = dict(student=student, teacher=teacher, gen_w1=gen_w1, gen_b1=gen_b1, gen_w2=gen_w2, gen_b2=gen_b2,
                align_w=align_w, align_b=align_b, mask=mask, ratio=float(ratio), alpha=float(alpha), seed=seed,
                sample_offset=sample_offset)
    impl = dispatch.select("mgd_loss", backend, student.device, dict(
        student=student, teacher=teacher, gen_w1=gen_w1, align_w=align_w, mask=mask), _run_mgd, args)
    return _run_mgd(impl, **args)


def _run_mgd(impl, student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, **kw) -> torch.Tensor:
    return impl.mgd_loss(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, **kw)


def ct_loss(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor, *, alpha: float = 1.0, reduction: str = "sum_over_batch",
            backend: str = "auto") -> torch.Tensor:
    """Channel-wise transform loss ``alpha * sum((W2 relu(W1 S + b1) + b2 - T)^2) / N`` (METHODS.md s. 2).

    student [N, Cs, H, W], teacher [N, Ct, H, W]; w1 [Ch, Cs] (or [Ch, Cs, 1, 1]), b1 [Ch],
    w2 [Ct, Ch] (or [Ct, Ch, 1, 1]), b2 [Ct]. ``reduction="mean"`` divides by N*Ct*H*W instead of N.
    """
    checks.check_ct(student, teacher, w1, b1, w2, b2, alpha, reduction)
    args = dict(student=student, teacher=teacher, w1=w1, b1=b1, w2=w2, b2=b2, alpha=float(alpha),
                reduction=reduction)
    impl = dispatch.select("ct_loss", backend, student.device, dict(
        student=student, teacher=teacher, w1=w1, w2=w2), _run_ct, args)
    return _run_ct(impl, **args)


def _run_ct(impl, student, teacher, w1, b1, w2, b2, **kw) -> torch.Tensor:
    return impl.ct_loss(student, teacher, w1, b1, w2, b2, **kw)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 4.0,
            alpha: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Hinton logit KD ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, batch mean."""
    checks.check_kd(student_logits, teacher_logits, temperature, alpha)
    impl = dispatch.select("kd_loss", backend, student_logits.device, dict(
        student_logits=student_logits, teacher_logits=teacher_logits))
    return impl.kd_loss(student_logits, teacher_logits, temperature=float(temperature), alpha=float(alpha))
