"""The loss modules: parameters they own, the seed stream, module == functional."""
import torch

from fastkd.losses import CT, MGD, LogitKD, SeedStream
from fastkd.ops import ct_loss, kd_loss, mgd_loss


def test_mgd_owns_align_only_when_channels_differ():
    assert MGD(8, 8).align is None
    m = MGD(6, 8)
    assert m.align.weight.shape == (8, 6, 1, 1) and m.align.bias.shape == (8,)
    convs = [l for l in m.generation if isinstance(l, torch.nn.Conv2d)]
    assert [c.weight.shape for c in convs] == [(8, 8, 3, 3), (8, 8, 3, 3)]
    assert all(c.bias is not None and c.padding == (1, 1) for c in convs)
    assert isinstance(m.generation[1], torch.nn.ReLU)
    assert not any(isinstance(l, (torch.nn.BatchNorm2d,)) for l in m.modules())


def test_mgd_module_equals_functional_and_draws_fresh_masks():
    torch.manual_seed(0)
    m = MGD(6, 8, mask="channel", ratio=0.5, alpha=1e-2, seed=77)
    s, t = torch.randn(2, 6, 5, 7), torch.randn(2, 8, 5, 7)
    expected_seeds = SeedStream(77)
    first_seed, second_seed = expected_seeds.next(), expected_seeds.next()
    assert first_seed != second_seed
    g1, g2 = m.generation[0], m.generation[2]
    args = (g1.weight, g1.bias, g2.weight, g2.bias)
    kw = dict(align_w=m.align.weight, align_b=m.align.bias, mask="channel", ratio=0.5, alpha=1e-2)
    l1, l2 = m(s, t), m(s, t)
    torch.testing.assert_close(l1, mgd_loss(s, t, *args, **kw, seed=first_seed))
    torch.testing.assert_close(l2, mgd_loss(s, t, *args, **kw, seed=second_seed))
    assert l1.item() != l2.item()
    # an explicit seed (the engine's path) does not consume the stream
    before = m.seeds.state()
    torch.testing.assert_close(m(s, t, seed=5, sample_offset=3), mgd_loss(s, t, *args, **kw, seed=5, sample_offset=3))
    assert m.seeds.state() == before


def test_mgd_seed_stream_resumes_from_state_dict():
    m = MGD(4, 4, seed=3)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    m(s, t), m(s, t)
    sd = m.state_dict()
    fresh = MGD(4, 4, seed=999)
    fresh.load_state_dict(sd)
    assert fresh.seeds.state() == {"base": 3, "calls": 2}
    torch.testing.assert_close(fresh(s, t), m(s, t))


def test_ct_module():
    c = CT(6, 8)
    assert c.transform[0].weight.shape == (8, 6, 1, 1)  # hidden width defaults to teacher channels
    c = CT(6, 8, hidden_channels=5, alpha=0.3, reduction="mean")
    s, t = torch.randn(2, 6, 3, 4), torch.randn(2, 8, 3, 4)
    l1, l2 = c.transform[0], c.transform[2]
    torch.testing.assert_close(c(s, t), ct_loss(s, t, l1.weight, l1.bias, l2.weight, l2.bias, alpha=0.3,
                                               reduction="mean"))


def test_logit_kd_module_and_alpha_in_state():
    kd = LogitKD(temperature=2.0, alpha=0.5)
    zs, zt = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(kd(zs, zt), kd_loss(zs, zt, temperature=2.0, alpha=0.5))
    kd.alpha = 0.25
    other = LogitKD()
    other.load_state_dict(kd.state_dict())
    assert other.alpha == 0.25


def test_training_reduces_mgd_loss():
    """A few optimiser steps on the generator (student fixed) lower the loss: gradients are usable."""
    torch.manual_seed(0)
    m = MGD(4, 4, mask="spatial", ratio=0.3, alpha=1.0, seed=1)
    s = torch.randn(4, 4, 6, 6)
    t = s.roll(1, dims=1) * 0.5
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = m(s, t, seed=123)  # fixed mask: the generator can fit it
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_modules_name_the_channels_they_were_built_for():
    import pytest

    with pytest.raises(ValueError, match=r"MGD built for student 8 / teacher 8 channels got student \[2, 6, 3, 3\]"):
        MGD(8, 8)(torch.randn(2, 6, 3, 3), torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match=r"CT built for student 6 / teacher 8 channels got .*teacher \[2, 16, 3, 3\]"):
        CT(6, 8)(torch.randn(2, 6, 3, 3), torch.randn(2, 16, 3, 3))


def test_mgd_without_seed_inside_compile_says_what_to_do():
    import pytest

    m = MGD(4, 4)
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with pytest.raises(Exception, match="next_seed"):
        torch.compile(lambda a, b: m(a, b), fullgraph=True, backend="eager")(s, t)


def test_first_call_inside_compile_needs_no_eager_warmup(tmp_path):
    """A fresh process builds the modules and calls them first inside torch.compile(fullgraph=True)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "first_call.py"
    script.write_text(
        "import torch\n"
        "from fastkd.losses import CT, MGD, LogitKD\n"
        "torch.manual_seed(0)\n"
        "mgd, ct, kd = MGD(6, 8, mask='channel', seed=1), CT(6, 8), LogitKD()\n"
        "s, t, zs, zt = torch.randn(2, 6, 5, 7), torch.randn(2, 8, 5, 7), torch.randn(2, 5), torch.randn(2, 5)\n"
        "def f(s, t, zs, zt, seed):\n"
        "    return mgd(s, t, seed=seed) + ct(s, t) + kd(zs, zt)\n"
        "got = torch.compile(f, fullgraph=True, backend='eager')(s, t, zs, zt, 123)\n"
        "want = f(s, t, zs, zt, 123)\n"
        "torch.testing.assert_close(got, want)\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
