"""Channel-wise spatial-softmax logit KD (MGD's segmentation logit loss) and the poly schedule."""
import math

import pytest
import torch

from fastkd.config import ScheduleConfig
from fastkd.engine.schedules import lr_factor
from fastkd.losses import ChannelWiseKD
from fastkd.ops.reference import channel_kd_loss


def direct(zs, zt, tau, weight):
    """3 x tau^2 / (C x N) x sum over (n, c) of KL between spatial softmaxes, with explicit loops."""
    n, c, h, w = zs.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            s = [v / tau for v in zs[i, j].flatten().tolist()]
            t = [v / tau for v in zt[i, j].flatten().tolist()]
            ms, mt = max(s), max(t)
            ls = [v - ms - math.log(sum(math.exp(u - ms) for u in s)) for v in s]
            lt = [v - mt - math.log(sum(math.exp(u - mt) for u in t)) for v in t]
            total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return weight * tau * tau * total / (c * n)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 19, 3, 7)])
def test_channel_kd_matches_direct_formula(shape):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g) * 3
    loss = ChannelWiseKD(temperature=4.0, alpha=3.0)(zs, zt)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(direct(zs.double(), zt.double(), 4.0, 3.0), rel=1e-5)


def test_channel_kd_zero_for_equal_logits_and_gradient_only_to_student():
    zs = torch.randn(2, 4, 5, 5, requires_grad=True)
    zt = torch.randn(2, 4, 5, 5, requires_grad=True)
    assert channel_kd_loss(zt.detach(), zt.detach()).item() == pytest.approx(0.0, abs=1e-6)
    loss = ChannelWiseKD()(zs, zt)
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None
    # a per-channel constant shift changes no spatial softmax
    shifted = channel_kd_loss(zs.detach() + torch.randn(2, 4, 1, 1), zt.detach())
    assert shifted.item() == pytest.approx(channel_kd_loss(zs.detach(), zt.detach()).item(), rel=1e-5)


def test_channel_kd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape|one shape"):
        ChannelWiseKD()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_poly_schedule_is_mmsegs():
    cfg = ScheduleConfig(name="poly", power=0.9, min_lr=1e-4)
    f = lr_factor(cfg, total_steps=40000, steps_per_epoch=100, base_lr=0.01)
    for step in (0, 1, 10000, 39999):
        expected = (0.01 - 1e-4) * (1 - step / 40000) ** 0.9 + 1e-4
        assert 0.01 * f(step) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        ScheduleConfig(name="poly", power=0)
