"""The csrc backend: fused CPU kernels from the compiled extension ``fastkd._C`` (csrc/).

The C++ ops ``torch.ops.fastkd_C.{mgd,ct}_{forward,backward}`` are torch custom ops; this module gives
them fake (meta) implementations, so torch.compile keeps each as one opaque node, and autograd
formulas that call the backward op. What each op fuses is described on top of csrc/mgd.cpp and
csrc/ct.cpp; the mask is drawn from the seed by the contract of ``fastkd.ops.mask``, bit for bit.

    forward   (loss, *residuals) = fastkd_C::<op>_forward(inputs)   residuals: what backward needs
    backward  grads = fastkd_C::<op>_backward(grad_loss, saved, needs)   unneeded grads are empty

Float32 CPU tensors only; other inputs are refused with a reason and ``auto`` falls back.
"""
from __future__ import annotations

import os

import torch

from .. import _ext

_OPS = ("mgd_forward", "mgd_backward", "ct_forward", "ct_backward")

# How the csrc MGD kernels run the generator's 3x3 convolutions (csrc/mgd.cpp, csrc/mgd_wino.cpp):
# "winograd" (default; F(4x4,3x3), 3x fewer FLOPs, ~1e-5 relative error) or "direct" (oneDNN).
MGD_ALGOS = {"direct": 0, "winograd": 1}


def mgd_algo() -> int:
    """The MGD convolution algorithm, from FASTKD_CSRC_MGD_ALGO (default winograd)."""
    name = os.environ.get("FASTKD_CSRC_MGD_ALGO", "winograd")
    if name not in MGD_ALGOS:
        raise ValueError(f"FASTKD_CSRC_MGD_ALGO={name!r}: expected one of {sorted(MGD_ALGOS)}")
    return MGD_ALGOS[name]
_registered: dict = {}


def _signed64(value: int) -> int:
    """A uint64 (seed, counter offset) as the int64 with the same bits (op schemas take int64)."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _layout_like(t: torch.Tensor) -> torch.memory_format:
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ---------------------------------------------------------------------------------------------
# MGD
# ---------------------------------------------------------------------------------------------
def _mgd_forward_fake(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b, spatial,
                      ratio, alpha, seed, sample_offset, algo=1):
    n, c, h, w = teacher.shape
    rows = lambda: teacher.new_empty((n * h * w, c))  # noqa: E731
    return teacher.new_empty(()), rows(), rows(), teacher.new_empty((c,))


def _mgd_backward_fake(grad, student, h, dg, db2, gen_w1, gen_w2, align_w, align_b, spatial, ratio, seed,
                       sample_offset, needs, algo=1):
    x = h
    e = lambda: x.new_empty((0,))  # noqa: E731
    c = x.shape[1]
    ds = torch.empty_like(student, memory_format=_layout_like(student)) if needs[0] else e()
    align = align_w is not None and needs[5]
    return (ds, torch.empty_like(gen_w1) if needs[1] else e(), x.new_empty((c,)) if needs[2] else e(),
            torch.empty_like(gen_w2) if needs[3] else e(), x.new_empty((c,)) if needs[4] else e(),
            torch.empty_like(align_w) if align else e(), x.new_empty((c,)) if align else e())


def _mgd_setup_context(ctx, inputs, output):
    student, _, gen_w1, _, gen_w2, _, align_w, align_b, spatial, ratio, _, seed, sample_offset, *algo = inputs
    _, h, dg, db2 = output
    ctx.mark_non_differentiable(h, dg, db2)  # residuals: no zero gradients materialised for them
    ctx.set_materialize_grads(False)
    # The student (saving it copies nothing) regenerates the masked input X in backward.
    ctx.save_for_backward(student, h, dg, db2, gen_w1, gen_w2, align_w, align_b)
    ctx.args = (spatial, ratio, seed, sample_offset)
    ctx.algo = algo[0] if algo else 1


def _mgd_backward(ctx, grad_loss, *unused):
    student, h, dg, db2, gen_w1, gen_w2, align_w, align_b = ctx.saved_tensors
    ng = ctx.needs_input_grad
    needs = [ng[0], ng[2], ng[3], ng[4], ng[5], bool(ng[6] or ng[7])]
    if not any(needs):
        return (None,) * len(ctx.needs_input_grad)
    g = torch.ops.fastkd_C.mgd_backward(grad_loss, student, h, dg, db2, gen_w1, gen_w2, align_w, align_b,
                                        *ctx.args, needs, ctx.algo)
    pick = lambda flag, t: t if flag else None  # noqa: E731
    return (pick(ng[0], g[0]), None, pick(ng[2], g[1]), pick(ng[3], g[2]), pick(ng[4], g[3]),
            pick(ng[5], g[4]), pick(ng[6], g[5]), pick(ng[7], g[6])) + (None,) * (len(ng) - 8)


# ---------------------------------------------------------------------------------------------
# CT
# ---------------------------------------------------------------------------------------------
def _ct_forward_fake(student, teacher, w1, b1, w2, b2, alpha, mean):
    n, c, h, w = teacher.shape
    m = n * h * w
    return (teacher.new_empty(()), teacher.new_empty((m, w1.shape[0])), teacher.new_empty((m, c)),
            teacher.new_empty((c,)))


def _ct_backward_fake(grad, student, h, dp, db2, w1, w2, needs):
    e = lambda: h.new_empty((0,))  # noqa: E731
    ds = torch.empty_like(student, memory_format=torch.channels_last) if needs[0] else e()
    return (ds, torch.empty_like(w1) if needs[1] else e(), h.new_empty((w1.shape[0],)) if needs[2] else e(),
            torch.empty_like(w2) if needs[3] else e(), h.new_empty((w2.shape[0],)) if needs[4] else e())


def _ct_setup_context(ctx, inputs, output):
    student, _, w1, _, w2, _, _, _ = inputs
    _, h, dp, db2 = output
    ctx.mark_non_differentiable(h, dp, db2)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student, h, dp, db2, w1, w2)


def _ct_backward(ctx, grad_loss, *unused):
    student, h, dp, db2, w1, w2 = ctx.saved_tensors
    ng = ctx.needs_input_grad
    needs = [ng[0], ng[2], ng[3], ng[4], ng[5]]
    if not any(needs):
        return (None,) * 8
    g = torch.ops.fastkd_C.ct_backward(grad_loss, student, h, dp, db2, w1, w2, needs)
    pick = lambda flag, t: t if flag else None  # noqa: E731
    return (pick(ng[0], g[0]), None, pick(ng[2], g[1]), pick(ng[3], g[2]), pick(ng[4], g[3]),
            pick(ng[5], g[4]), None, None)


def _register() -> None:
    """Fake implementations and autograd for the C++ ops (once, after the extension loaded)."""
    if _registered:
        return
    torch.library.register_fake("fastkd_C::mgd_forward")(_mgd_forward_fake)
    torch.library.register_fake("fastkd_C::mgd_backward")(_mgd_backward_fake)
    torch.library.register_fake("fastkd_C::ct_forward")(_ct_forward_fake)
    torch.library.register_fake("fastkd_C::ct_backward")(_ct_backward_fake)
    torch.library.register_autograd("fastkd_C::mgd_forward", _mgd_backward, setup_context=_mgd_setup_context)
    torch.library.register_autograd("fastkd_C::ct_forward", _ct_backward, setup_context=_ct_setup_context)
    _registered["done"] = True


class _CsrcBackend:
    name = "csrc"

    def unavailable(self):
        why = _ext.load_error()
        if why is None:
            _register()
        return why

    def refuse(self, op, **inputs):
        if op not in ("mgd_loss", "ct_loss"):
            return f"no csrc kernel for {op}"
        for name, t in inputs.items():
            if not isinstance(t, torch.Tensor):
                continue
            if t.device.type != "cpu":
                return f"{name} is on {t.device}; the csrc kernels run on the CPU only"
            if t.dtype != torch.float32:
                return f"{name} is {t.dtype}; the csrc kernels are float32 only"
        student = inputs["student"]
        if student.numel() == 0 or inputs["teacher"].numel() == 0:
            return "empty feature (a dimension is 0)"
        return None

    def keep_mask(self, mode, n, c, h, w, *, ratio, seed, sample_offset=0):
        """The keep-mask drawn by the C++ kernels (for tests): [N,1,H,W] or [N,C,1,1] float32."""
        return torch.ops.fastkd_C.keep_mask(mode == "spatial", n, c, h, w, float(ratio), _signed64(seed),
                                            _signed64(sample_offset))

    def philox_uniform(self, seed, counter):
        """``tl.rand(seed, counter)`` computed by the C++ Philox (for tests)."""
        return torch.ops.fastkd_C.philox_uniform(counter, _signed64(seed))

    def mgd_loss(self, student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, *, align_w=None, align_b=None,
                 mask="spatial", ratio=0.65, alpha=2e-5, seed, sample_offset=0):
        return torch.ops.fastkd_C.mgd_forward(
            student, teacher.detach(), gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b, mask == "spatial",
            float(ratio), float(alpha), _signed64(seed), _signed64(sample_offset), mgd_algo())[0]

    def ct_loss(self, student, teacher, w1, b1, w2, b2, *, alpha=1.0, reduction="sum_over_batch"):
        w1 = w1.reshape(w1.shape[0], w1.shape[1])
        w2 = w2.reshape(w2.shape[0], w2.shape[1])
        return torch.ops.fastkd_C.ct_forward(student, teacher.detach(), w1, b1, w2, b2, float(alpha),
                                             reduction == "mean")[0]


BACKEND = _CsrcBackend()
