"""The reference losses against METHODS.md's formulas computed independently, gradcheck, bad input."""
import math

import pytest
import torch

from fastkd.ops import BackendUnavailableError, ct_loss, dispatch, explain, kd_loss, mgd_loss
from fastkd.ops import reference as ref
from fastkd.ops.mask import mgd_keep_mask


def conv_by_unfold(x, w, b, pad):
    """A convolution written as im2col + matmul (independent of F.conv2d)."""
    n, c, h, wd = x.shape
    k = w.shape[-1]
    cols = torch.nn.functional.unfold(x, k, padding=pad)  # [N, C*k*k, H*W]
    out = torch.einsum("ok,nkp->nop", w.reshape(w.shape[0], -1), cols) + b[None, :, None]
    return out.reshape(n, w.shape[0], h, wd)


def mgd_by_formula(s, t, w1, b1, w2, b2, aw, ab, mask, ratio, alpha, seed, offset=0):
    a = s if aw is None else torch.einsum("oc,nchw->nohw", aw[:, :, 0, 0], s) + ab[None, :, None, None]
    n, c, h, w = a.shape
    m = mgd_keep_mask(mask, n, c, h, w, ratio=ratio, seed=seed, sample_offset=offset, dtype=a.dtype)
    hidden = conv_by_unfold(a * m, w1, b1, 1).clamp_min(0)
    g = conv_by_unfold(hidden, w2, b2, 1)
    return alpha * ((g - t) ** 2).sum() / n


def make_mgd(n=2, cs=6, ct=8, h=5, w=7, dtype=torch.float64, align=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    s, t = r(n, cs if align else ct, h, w), r(n, ct, h, w)
    p = dict(gen_w1=r(ct, ct, 3, 3) * 0.2, gen_b1=r(ct) * 0.1, gen_w2=r(ct, ct, 3, 3) * 0.2, gen_b2=r(ct) * 0.1)
    if align:
        p.update(align_w=r(ct, cs, 1, 1) * 0.3, align_b=r(ct) * 0.1)
    return s, t, p


@pytest.mark.parametrize("mask", ["spatial", "channel"])
@pytest.mark.parametrize("align", [True, False])
def test_mgd_matches_formula(mask, align):
    s, t, p = make_mgd(align=align)
    got = mgd_loss(s, t, p["gen_w1"], p["gen_b1"], p["gen_w2"], p["gen_b2"], align_w=p.get("align_w"),
                   align_b=p.get("align_b"), mask=mask, ratio=0.5, alpha=3e-3, seed=42, backend="reference")
    want = mgd_by_formula(s, t, p["gen_w1"], p["gen_b1"], p["gen_w2"], p["gen_b2"], p.get("align_w"),
                          p.get("align_b"), mask, 0.5, 3e-3, 42)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_mgd_masks_follow_samples_across_splits():
    s, t, p = make_mgd(n=4)
    kw = dict(align_w=p["align_w"], align_b=p["align_b"], mask="spatial", ratio=0.6, alpha=1e-2, seed=9,
              backend="reference")
    args = (p["gen_w1"], p["gen_b1"], p["gen_w2"], p["gen_b2"])
    whole = mgd_loss(s, t, *args, **kw)
    # per-process losses are sums divided by the local batch: re-weight to the global batch
    halves = sum(mgd_loss(s[i:i + 2], t[i:i + 2], *args, sample_offset=i, **kw) * 2 / 4 for i in (0, 2))
    torch.testing.assert_close(whole, halves, rtol=1e-12, atol=0)


def test_mgd_ratio_zero_is_unmasked_generation():
    s, t, p = make_mgd()
    got = mgd_loss(s, t, p["gen_w1"], p["gen_b1"], p["gen_w2"], p["gen_b2"], align_w=p["align_w"],
                   align_b=p["align_b"], ratio=0.0, alpha=1.0, seed=5, backend="reference")
    a = torch.nn.functional.conv2d(s, p["align_w"], p["align_b"])
    g = conv_by_unfold(conv_by_unfold(a, p["gen_w1"], p["gen_b1"], 1).relu(), p["gen_w2"], p["gen_b2"], 1)
    torch.testing.assert_close(got, ((g - t) ** 2).sum() / 2)


@pytest.mark.parametrize("reduction", ["sum_over_batch", "mean"])
@pytest.mark.parametrize("weights_4d", [False, True])
def test_ct_matches_formula(reduction, weights_4d):
    g = torch.Generator().manual_seed(1)
    n, cs, ch, ct, h, w = 3, 5, 7, 6, 4, 3
    s, t = torch.randn(n, cs, h, w, generator=g, dtype=torch.float64), torch.randn(n, ct, h, w, generator=g,
                                                                                   dtype=torch.float64)
    w1, b1 = torch.randn(ch, cs, generator=g, dtype=torch.float64), torch.randn(ch, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(ct, ch, generator=g, dtype=torch.float64), torch.randn(ct, generator=g, dtype=torch.float64)
    # per pixel: s' = W2 relu(W1 s + b1) + b2, written with explicit pixel rows
    rows = s.permute(0, 2, 3, 1).reshape(-1, cs)
    out = (rows @ w1.T + b1).clamp_min(0) @ w2.T + b2
    sq = ((out - t.permute(0, 2, 3, 1).reshape(-1, ct)) ** 2).sum()
    want = 0.7 * (sq / out.numel() if reduction == "mean" else sq / n)
    args = (w1[:, :, None, None], b1, w2[:, :, None, None], b2) if weights_4d else (w1, b1, w2, b2)
    got = ct_loss(s, t, *args, alpha=0.7, reduction=reduction, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_kd_matches_formula():
    g = torch.Generator().manual_seed(2)
    zs, zt = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, 10, generator=g, dtype=torch.float64)
    temp, alpha = 4.0, 0.9
    ps = torch.exp(zs / temp) / torch.exp(zs / temp).sum(1, keepdim=True)
    pt = torch.exp(zt / temp) / torch.exp(zt / temp).sum(1, keepdim=True)
    want = alpha * temp**2 * (pt * (pt.log() - ps.log())).sum(1).mean()
    torch.testing.assert_close(kd_loss(zs, zt, temperature=temp, alpha=alpha, backend="reference"), want,
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes_run_and_return_float32(dtype):
    s, t, p = make_mgd(dtype=dtype)
    loss = mgd_loss(s.requires_grad_(), t, *(p[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")),
                    align_w=p["align_w"], align_b=p["align_b"], seed=1, backend="reference")
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == dtype
    s64, t64, p64 = make_mgd(dtype=torch.float64)
    want = mgd_loss(s64, t64, *(p64[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")),
                    align_w=p64["align_w"], align_b=p64["align_b"], seed=1, backend="reference")
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    assert abs(loss.item() - want.item()) <= tol * abs(want.item())
    up = ref.mgd_loss(s, t, *(p[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")),
                      align_w=p["align_w"], align_b=p["align_b"], seed=1, upcast=True)
    assert abs(up.item() - want.item()) <= 2 * tol * abs(want.item())


def test_gradcheck_mgd():
    s, t, p = make_mgd(n=2, cs=3, ct=4, h=4, w=3)
    leaves = [s] + [p[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2", "align_w", "align_b")]
    leaves = [x.clone().requires_grad_() for x in leaves]

    def f(s, w1, b1, w2, b2, aw, ab):
        return mgd_loss(s, t, w1, b1, w2, b2, align_w=aw, align_b=ab, mask="channel", ratio=0.3, alpha=0.1, seed=4,
                        backend="reference")

    assert torch.autograd.gradcheck(f, leaves)


def test_gradcheck_ct_and_kd():
    g = torch.Generator().manual_seed(3)
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    s, t = r(2, 3, 2, 3), torch.randn(2, 4, 2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ct_loss(*a, alpha=0.5, backend="reference"),
                                    (s, t, r(5, 3), r(5), r(4, 5), r(4)))
    zs, zt = r(3, 6), torch.randn(3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, zt, temperature=2.0, backend="reference"), (zs,))


class TestBadInput:
    def setup_method(self):
        self.s, self.t, self.p = make_mgd(dtype=torch.float32)
        self.gen = [self.p[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
        self.al = dict(align_w=self.p["align_w"], align_b=self.p["align_b"])

    def test_spatial_mismatch_names_shapes(self):
        with pytest.raises(ValueError, match=r"spatial size.*2x6x5x7.*2x8x4x7"):
            mgd_loss(self.s, self.t[:, :, :4], *self.gen, **self.al, seed=0)

    def test_channel_mismatch_without_align(self):
        with pytest.raises(ValueError, match=r"student has 6 channels but teacher has 8.*align_w"):
            mgd_loss(self.s, self.t, *self.gen, seed=0)

    def test_ratio_outside_range(self):
        for ratio in (-0.1, 1.0, 1.5):
            with pytest.raises(ValueError, match="ratio"):
                mgd_loss(self.s, self.t, *self.gen, **self.al, seed=0, ratio=ratio)

    def test_wrong_ndim(self):
        with pytest.raises(ValueError, match=r"student must be 4-D, got 3-D"):
            mgd_loss(self.s[0], self.t, *self.gen, **self.al, seed=0)
        with pytest.raises(ValueError, match=r"student_logits must be 2-D"):
            kd_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4))

    def test_dtype_and_device_mismatch(self):
        with pytest.raises(TypeError, match=r"teacher has dtype torch.float64"):
            mgd_loss(self.s, self.t.double(), *self.gen, **self.al, seed=0)
        with pytest.raises(ValueError, match=r"on meta"):
            mgd_loss(self.s, self.t.to("meta"), *self.gen, **self.al, seed=0)

    def test_non_finite_alpha(self):
        for alpha in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="alpha must be finite"):
                mgd_loss(self.s, self.t, *self.gen, **self.al, seed=0, alpha=alpha)
            with pytest.raises(ValueError, match="alpha must be finite"):
                kd_loss(torch.randn(2, 3), torch.randn(2, 3), alpha=alpha)

    def test_wrong_generator_shape(self):
        bad = [self.gen[0][:, :, :1, :1]] + self.gen[1:]
        with pytest.raises(ValueError, match=r"gen_w1 must have shape \[8x8x3x3\], got \[8x8x1x1\]"):
            mgd_loss(self.s, self.t, *bad, **self.al, seed=0)

    def test_ct_weight_shapes(self):
        with pytest.raises(ValueError, match=r"w1 must have shape \[Ch x 6\]"):
            ct_loss(self.s, self.t, torch.randn(4, 5), torch.randn(4), torch.randn(8, 4), torch.randn(8))
        with pytest.raises(ValueError, match=r"w2 must have shape \[8 x 4\]"):
            ct_loss(self.s, self.t, torch.randn(4, 6), torch.randn(4), torch.randn(7, 4), torch.randn(7))
        with pytest.raises(ValueError, match="reduction"):
            ct_loss(self.s, self.t, torch.randn(4, 6), torch.randn(4), torch.randn(8, 4), torch.randn(8),
                    reduction="sum")

    def test_kd_temperature(self):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0.0)


def test_unknown_backend_says_why():
    s, t, p = make_mgd(dtype=torch.float32, align=False)
    with pytest.raises(BackendUnavailableError, match=r"no backend named 'fast'"):
        mgd_loss(s, t, *(p[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")), seed=0, backend="fast")
    reasons = dict(explain("kd_loss", "cpu", student_logits=torch.randn(2, 3), teacher_logits=torch.randn(2, 3)))
    assert reasons["reference"] is None
    assert reasons["triton"]  # triton has no KD kernel: refused with a reason


def test_auto_resolves_to_the_first_accepting_backend():
    s, t, p = make_mgd(dtype=torch.float32, align=False)
    args = (p["gen_w1"], p["gen_b1"], p["gen_w2"], p["gen_b2"])
    inputs = dict(student=s, teacher=t, gen_w1=p["gen_w1"], align_w=None, mask="spatial")
    chosen = dispatch.select("mgd_loss", "auto", "cpu", inputs)
    first_ok = next(name for name, why in explain("mgd_loss", "cpu", **inputs) if why is None)
    assert chosen.name == first_ok
    a = mgd_loss(s, t, *args, seed=3, backend="auto")
    b = mgd_loss(s, t, *args, seed=3, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert math.isfinite(a.item())


def test_auto_order_has_per_op_exceptions(monkeypatch):
    # an op whose measured-faster backend differs on a device gets a "device:op" entry
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu:ct_loss", ["reference", "csrc"])
    assert dispatch.auto_order("ct_loss", "cpu")[0] == "reference"
    assert dispatch.auto_order("mgd_loss", "cpu") == dispatch.AUTO_ORDER["cpu"]
    s, t = torch.randn(2, 6, 3, 3), torch.randn(2, 8, 3, 3)
    chosen = dispatch.select("ct_loss", "auto", "cpu", dict(student=s, teacher=t, w1=torch.randn(8, 6),
                                                             w2=torch.randn(8, 8)))
    assert chosen.name == "reference"
