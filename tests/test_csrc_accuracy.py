"""Accuracy of the csrc MGD kernels at real channel counts (512) and small maps, against the reference in
float64, with the measures that mean something here (issue 15):

- per tensor (the loss and every gradient), the L2-relative error ||got - ref|| / ||ref||;
- per tensor, the largest entry's error relative to the largest entry, ``max|got - ref| / max|ref|``,
  on inputs whose generator pre-activations all lie far (>= 0.3) from the ReLU kink: there no rounding
  can flip a gate, so every entry must be accurate. Near the kink a forward error of ~1e-6 flips the
  gates of pre-activations within ~1e-6 of zero, which moves single gradient entries by far more than
  rounding; that is not an error of the kernel but of the question, and only the L2 measure is
  meaningful there.

Winograd F(4x4,3x3) in float32 is ~10x less accurate than direct float32 convolution (measured here:
L2-relative <= ~4e-6 against float32 eager's <= ~5e-7); the bounds below leave 5x room.
"""
import pytest
import torch
import torch.nn.functional as F

from fastkd import _ext
from fastkd.ops import mgd_loss
from fastkd.ops.mask import mgd_keep_mask

pytestmark = pytest.mark.skipif(not _ext.is_available(), reason="fastkd._C is not built")
BOUND = 2e-5
KW = dict(ratio=0.5, alpha=2e-5, seed=7)


def _inputs(n, cs, ct, hw, away_from_kink):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    s, t = r(n, cs, hw, hw), r(n, ct, hw, hw)
    if away_from_kink:  # |pre-activation| = |small conv + (+-0.5)| >= 0.3 everywhere
        w1, b1 = r(ct, ct, 3, 3) * 2e-4, torch.sign(r(ct)) * 0.5
    else:  # He initialisation, as a generator starts training
        w1, b1 = r(ct, ct, 3, 3) * (2 / (9 * ct)) ** 0.5, r(ct) * 0.01
    p = dict(gen_w1=w1, gen_b1=b1, gen_w2=r(ct, ct, 3, 3) * (1 / (9 * ct)) ** 0.5, gen_b2=r(ct) * 0.01)
    if cs != ct:
        p.update(align_w=r(ct, cs, 1, 1) * cs ** -0.5, align_b=r(ct) * 0.01)
    return s, t, p


def _min_distance_to_kink(s, p, mask):
    a = s if "align_w" not in p else F.conv2d(s, p["align_w"], p["align_b"])
    n, c, h, w = a.shape
    keep = mgd_keep_mask(mask, n, c, h, w, ratio=KW["ratio"], seed=KW["seed"], dtype=a.dtype)
    return F.conv2d(a * keep, p["gen_w1"], p["gen_b1"], padding=1).abs().min().item()


def _loss_and_grads(s, t, p, mask, dtype, backend):
    s = s.to(dtype).requires_grad_()
    p = {k: v.to(dtype).requires_grad_() for k, v in p.items()}
    loss = mgd_loss(s, t.to(dtype), **p, mask=mask, **KW, backend=backend)
    grads = torch.autograd.grad(loss * 1.5, [s, *p.values()])
    return dict(zip(["loss", "student", *p], [loss.double(), *(x.double() for x in grads)]))


@pytest.mark.parametrize("algo", ["winograd", "direct"])
@pytest.mark.parametrize("case", [("spatial", 2, 256, 512, 8, False), ("channel", 2, 512, 512, 7, True)],
                         ids=["align-256to512-8x8-he-init", "512-7x7-away-from-kink"])
def test_mgd_error_at_real_channel_counts(case, algo, monkeypatch):
    monkeypatch.setenv("FASTKD_CSRC_MGD_ALGO", algo)
    mask, n, cs, ct, hw, away = case
    s, t, p = _inputs(n, cs, ct, hw, away)
    if away:
        assert _min_distance_to_kink(s, p, mask) >= 0.3  # the premise of the max-entry measure
    want = _loss_and_grads(s, t, p, mask, torch.float64, "reference")
    got = _loss_and_grads(s, t, p, mask, torch.float32, "csrc")
    report = []
    for name, ref in want.items():
        err = got[name] - ref
        l2 = (err.norm() / ref.norm()).item()
        worst = (err.abs().max() / ref.abs().max()).item()
        report.append(f"{name}: L2-rel {l2:.2e}, max-entry-rel {worst:.2e}")
        assert l2 <= BOUND, "\n".join(report)
        if away:
            assert worst <= BOUND, "\n".join(report)
