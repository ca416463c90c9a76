"""Pure-PyTorch reference of the distillation losses: the oracle every fast path is tested against.

Follows METHODS.md to the letter. Runs on any device and dtype; ``upcast=True`` computes in float32
(float64 inputs stay float64). Losses are returned as a 0-d float32 tensor (float64 for float64
inputs); the gradients flow back to the inputs in their own dtype.

MGD:  A = align(S) if Cs != Ct else S          (1x1 conv with bias)
      G = conv3x3(relu(conv3x3(A * M, w1, b1)), w2, b2)      (padding 1, biases)
      loss = alpha * sum((G - T)^2) / N
CT:   S' = W2 relu(W1 S + b1) + b2              (per-pixel MLP over channels)
      loss = alpha * sum((S' - T)^2) / N        (reduction 'sum_over_batch')
           = alpha * mean((S' - T)^2)           (reduction 'mean')
KD:   loss = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), mean over the batch
CWD:  channel-wise KD of dense logits [N, C, H, W] (Shu et al., ICCV 2021; MGD's segmentation distiller):
      per (n, c), p = softmax over the H*W positions of z/T;
      loss = alpha * T^2 * sum_{n,c} KL(p_t[n,c] || p_s[n,c]) / (N * C)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .mask import mgd_keep_mask


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(t: Optional[torch.Tensor], upcast: bool) -> Optional[torch.Tensor]:
    if t is None or not upcast or t.dtype == torch.float64:
        return t
    return t.float()


def mgd_generate(student, gen_w1, gen_b1, gen_w2, gen_b2, *, align_w=None, align_b=None,
                 mask="spatial", ratio=0.65, seed: int, sample_offset=0) -> torch.Tensor:
    """The generated feature G of MGD (used by the loss, and by tests and visualisations)."""
    a = student if align_w is None else F.conv2d(student, align_w, align_b)
    n, c, h, w = a.shape
    keep = mgd_keep_mask(mask, n, c, h, w, ratio=ratio, seed=seed, sample_offset=sample_offset,
                         device=a.device, dtype=a.dtype)
    hidden = F.relu(F.conv2d(a * keep, gen_w1, gen_b1, padding=1))
    return F.conv2d(hidden, gen_w2, gen_b2, padding=1)


def mgd_loss(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, *, align_w=None, align_b=None,
             mask="spatial", ratio=0.65, alpha=2e-5, seed: int, sample_offset=0,
             upcast: bool = False) -> torch.Tensor:
    acc = _acc_dtype(student)
    args = [_up(t, upcast) for t in (student, gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b)]
    s, w1, b1, w2, b2, aw, ab = args
    g = mgd_generate(s, w1, b1, w2, b2, align_w=aw, align_b=ab, mask=mask, ratio=ratio, seed=seed,
                     sample_offset=sample_offset)
    diff = g.to(acc) - teacher.detach().to(acc)
    return alpha * diff.pow(2).sum() / student.shape[0]


def ct_transform(student, w1, b1, w2, b2) -> torch.Tensor:
    """S' = W2 relu(W1 S + b1) + b2 as 1x1 convolutions (weights [out, in] or [out, in, 1, 1])."""
    w1 = w1 if w1.dim() == 4 else w1[:, :, None, None]
    w2 = w2 if w2.dim() == 4 else w2[:, :, None, None]
    return F.conv2d(F.relu(F.conv2d(student, w1, b1)), w2, b2)


def ct_loss(student, teacher, w1, b1, w2, b2, *, alpha=1.0, reduction="sum_over_batch",
            upcast: bool = False) -> torch.Tensor:
    acc = _acc_dtype(student)
    s, w1, b1, w2, b2 = (_up(t, upcast) for t in (student, w1, b1, w2, b2))
    diff = ct_transform(s, w1, b1, w2, b2).to(acc) - teacher.detach().to(acc)
    sq = diff.pow(2).sum()
    if reduction == "mean":
        return alpha * sq / diff.numel()
    return alpha * sq / student.shape[0]


def kd_loss(student_logits, teacher_logits, *, temperature=4.0, alpha=1.0,
            upcast: bool = True) -> torch.Tensor:
    acc = _acc_dtype(student_logits)
    zs = student_logits.to(acc) if upcast else student_logits
    zt = teacher_logits.detach().to(zs.dtype)
    log_ps = F.log_softmax(zs / temperature, dim=1)
    log_pt = F.log_softmax(zt / temperature, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return (alpha * temperature * temperature) * kl.to(acc)


def channel_kd_loss(student_logits, teacher_logits, *, temperature=4.0, alpha=3.0,
                    upcast: bool = True) -> torch.Tensor:
    """Channel-wise spatial-softmax KD of [N, C, H, W] logits (see the module docstring)."""
    acc = _acc_dtype(student_logits)
    n, c = student_logits.shape[:2]
    zs = (student_logits.to(acc) if upcast else student_logits).flatten(2) / temperature
    zt = teacher_logits.detach().to(zs.dtype).flatten(2) / temperature
    log_ps, log_pt = F.log_softmax(zs, dim=2), F.log_softmax(zt, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    return (alpha * temperature * temperature / (n * c)) * kl.to(acc)
