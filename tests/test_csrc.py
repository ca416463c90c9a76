"""The compiled CPU kernels (fastkd._C, backend "csrc") against the reference and the mask contract.

Without the extension these tests skip, giving the load error, unless FASTKD_REQUIRE_EXT=1 (CI,
``make test``): then they fail, so a build that silently failed cannot pass.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from fastkd import _ext
from fastkd.ops import BackendUnavailableError, ct_loss, dispatch, explain, mgd_loss, reference
from fastkd.ops.mask import mask_counters, mgd_keep_mask, philox_uniform
from fastkd.testing import assert_close_scaled

REQUIRE_EXT = os.environ.get("FASTKD_REQUIRE_EXT", "0") == "1"
SEEDS = [0, 1, 123456789, 2**32 - 1, 2**32 + 5, 2**63 + 12345, 2**64 - 1]


def csrc():
    """The csrc backend object; fails (FASTKD_REQUIRE_EXT=1) or skips when fastkd._C cannot load."""
    why = _ext.load_error()
    if why is not None:
        if REQUIRE_EXT:
            pytest.fail(f"FASTKD_REQUIRE_EXT=1 but the extension is unusable: {why}")
        pytest.skip(why)
    backend = dispatch._load("csrc")
    assert backend is not None and backend.unavailable() is None
    return backend


def test_extension_loads_when_required():
    if not REQUIRE_EXT:
        pytest.skip("FASTKD_REQUIRE_EXT is not set")
    assert _ext.load_error() is None
    assert _ext.is_available()


# ---------------------------------------------------------------------------------------------
# The mask contract, bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_philox_uniform_bit_equal(seed):
    b = csrc()
    counter = torch.cat([torch.arange(0, 3000, dtype=torch.int64),
                         torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62 + 9, -1])])
    got, want = b.philox_uniform(seed, counter), philox_uniform(seed, counter)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("mode", ["spatial", "channel"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 7, 2**33 + 1])
def test_keep_mask_bit_equal(mode, seed, offset):
    b = csrc()
    n, c, h, w = 3, 24, 5, 9
    got = b.keep_mask(mode, n, c, h, w, ratio=0.65, seed=seed, sample_offset=offset)
    want = mgd_keep_mask(mode, n, c, h, w, ratio=0.65, seed=seed, sample_offset=offset)
    assert torch.equal(got, want)


def test_keep_mask_ratio_on_a_drawn_value():
    """A ratio equal to a drawn u: u < ratio is decided in float32, like the reference."""
    b = csrc()
    u = philox_uniform(77, mask_counters("spatial", 2, 1, 5, 9, 0))
    for ratio in (float(u.flatten()[3]), float(u.flatten()[17])):
        got = b.keep_mask("spatial", 2, 1, 5, 9, ratio=ratio, seed=77, sample_offset=0)
        assert torch.equal(got, mgd_keep_mask("spatial", 2, 1, 5, 9, ratio=ratio, seed=77))


# ---------------------------------------------------------------------------------------------
# MGD and CT against the reference: loss and every gradient
# ---------------------------------------------------------------------------------------------
ALGOS = ["winograd", "direct"]


@pytest.fixture(params=ALGOS)
def algo(request, monkeypatch):
    """Each MGD test runs with both convolution algorithms of the csrc kernels."""
    monkeypatch.setenv("FASTKD_CSRC_MGD_ALGO", request.param)
    return request.param


def _mgd_inputs(n, cs, ct, h, w, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    s, t = rnd(n, cs, h, w), rnd(n, ct, h, w)
    if channels_last:
        s, t = s.contiguous(memory_format=torch.channels_last), t.contiguous(memory_format=torch.channels_last)
    params = dict(gen_w1=rnd(ct, ct, 3, 3, scale=0.1), gen_b1=rnd(ct, scale=0.1),
                  gen_w2=rnd(ct, ct, 3, 3, scale=0.1), gen_b2=rnd(ct, scale=0.1))
    if cs != ct:
        params.update(align_w=rnd(ct, cs, 1, 1, scale=0.2), align_b=rnd(ct, scale=0.1))
    return s.requires_grad_(), t, {k: v.requires_grad_() for k, v in params.items()}


def _loss_and_grads(fn, wrt, grad_out):
    loss = fn()
    return loss, torch.autograd.grad(loss, wrt, grad_outputs=torch.tensor(grad_out))


def _compare(got, want, names):
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert_close_scaled(got[0], want[0], torch.float32, name="loss")
    for name, a, e in zip(names, got[1], want[1]):
        assert a.shape == e.shape, name
        assert_close_scaled(a, e, torch.float32, name=f"d{name}")


@pytest.mark.parametrize("mode", ["spatial", "channel"])
@pytest.mark.parametrize("shape", [(3, 24, 24, 5, 9), (2, 16, 24, 7, 7), (4, 8, 8, 13, 17)],
                         ids=["5x9-C24", "align-16to24-7x7", "13x17-C8"])
def test_mgd_matches_reference(mode, shape, algo):
    b = csrc()
    s, t, params = _mgd_inputs(*shape)
    kw = dict(align_w=params.get("align_w"), align_b=params.get("align_b"), mask=mode, ratio=0.5,
              alpha=3e-2, seed=2**40 + 11, sample_offset=5)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
    names = ["student"] + list(params)
    wrt = [s] + list(params.values())
    got = _loss_and_grads(lambda: mgd_loss(s, t, *p, backend="csrc", **kw), wrt, 1.7)
    want = _loss_and_grads(lambda: reference.mgd_loss(s, t, *p, **kw), wrt, 1.7)
    _compare(got, want, names)
    assert b.name == "csrc"


@pytest.mark.parametrize("align", [False, True])
def test_mgd_channels_last_and_partial_grads(align, algo):
    csrc()
    s, t, params = _mgd_inputs(2, 12 if align else 16, 16, 6, 10, channels_last=True, seed=3)
    params["gen_w2"].requires_grad_(False)  # a frozen parameter: no gradient asked for
    kw = dict(align_w=params.get("align_w"), align_b=params.get("align_b"), mask="spatial", ratio=0.3,
              alpha=0.1, seed=99)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
    wrt = [s] + [v for v in params.values() if v.requires_grad]
    names = ["student"] + [k for k, v in params.items() if v.requires_grad]
    got = _loss_and_grads(lambda: mgd_loss(s, t, *p, backend="csrc", **kw), wrt, -0.4)
    want = _loss_and_grads(lambda: reference.mgd_loss(s, t, *p, **kw), wrt, -0.4)
    _compare(got, want, names)
    with torch.no_grad():
        assert_close_scaled(mgd_loss(s, t, *p, backend="csrc", **kw), want[0], torch.float32, name="no_grad")


def test_mgd_sample_offset_splits_the_batch(algo):
    """Two halves with sample_offset draw the same masks as the whole batch (data-parallel split)."""
    csrc()
    s, t, params = _mgd_inputs(4, 8, 8, 5, 5, seed=5)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
    kw = dict(mask="spatial", ratio=0.5, alpha=1.0, backend="csrc")
    whole = mgd_loss(s, t, *p, seed=8, **kw) * 4
    halves = mgd_loss(s[:2], t[:2], *p, seed=8, **kw) * 2 + mgd_loss(s[2:], t[2:], *p, seed=8, sample_offset=2,
                                                                       **kw) * 2
    assert_close_scaled(halves, whole, torch.float32, name="split")


@pytest.mark.parametrize("frozen", [(), ("student",), ("gen_w1", "gen_b1"), ("student", "gen_w1", "gen_b1"),
                                    ("gen_w2",), ("student", "gen_w1", "gen_b1", "gen_w2")],
                         ids=["all", "no-student", "no-w1b1", "w2b2-only", "no-w2", "b2-only"])
def test_mgd_winograd_chunks_and_gradient_subsets(frozen, monkeypatch):
    """Winograd processes the batch in chunks of samples (here 45 = 4 x 11 + 1: the last one shorter) and
    skips the passes whose gradients nobody asked for; every subset still matches the reference."""
    csrc()
    monkeypatch.setenv("FASTKD_CSRC_MGD_ALGO", "winograd")
    s, t, params = _mgd_inputs(45, 4, 6, 5, 9, seed=8)
    tensors = {"student": s, **params}
    for name in frozen:
        tensors[name].requires_grad_(False)
    kw = dict(align_w=params["align_w"], align_b=params["align_b"], mask="channel", ratio=0.4, alpha=0.2, seed=5)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
    names = [k for k, v in tensors.items() if v.requires_grad]
    wrt = [tensors[k] for k in names]
    got = _loss_and_grads(lambda: mgd_loss(s, t, *p, backend="csrc", **kw), wrt, 0.9)
    want = _loss_and_grads(lambda: reference.mgd_loss(s, t, *p, **kw), wrt, 0.9)
    _compare(got, want, names)


def test_mgd_algorithms_agree_and_unknown_algo_is_named(monkeypatch):
    csrc()
    s, t, params = _mgd_inputs(3, 16, 16, 14, 14, seed=6)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
    losses = {}
    for name in ALGOS:
        monkeypatch.setenv("FASTKD_CSRC_MGD_ALGO", name)
        losses[name] = mgd_loss(s, t, *p, mask="spatial", ratio=0.65, alpha=1.0, seed=1, backend="csrc")
    assert_close_scaled(losses["winograd"], losses["direct"], torch.float32, name="winograd vs direct")
    monkeypatch.setenv("FASTKD_CSRC_MGD_ALGO", "fft")
    with pytest.raises(ValueError, match="FASTKD_CSRC_MGD_ALGO='fft'"):
        mgd_loss(s, t, *p, mask="spatial", seed=1, backend="csrc")


def _ct_inputs(n, cs, ch, ct, h, w, weights_4d, channels_last=False):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(n, cs, h, w, generator=g), torch.randn(n, ct, h, w, generator=g)
    if channels_last:
        s, t = s.contiguous(memory_format=torch.channels_last), t.contiguous(memory_format=torch.channels_last)
    w1, w2 = torch.randn(ch, cs, generator=g) * 0.2, torch.randn(ct, ch, generator=g) * 0.2
    if weights_4d:
        w1, w2 = w1[:, :, None, None].contiguous(), w2[:, :, None, None].contiguous()
    b1, b2 = torch.randn(ch, generator=g) * 0.1, torch.randn(ct, generator=g) * 0.1
    return [x.requires_grad_() for x in (s, w1, b1, w2, b2)], t


@pytest.mark.parametrize("reduction", ["sum_over_batch", "mean"])
@pytest.mark.parametrize("weights_4d", [False, True], ids=["2d", "4d"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ct_matches_reference(reduction, weights_4d, channels_last):
    csrc()
    (s, w1, b1, w2, b2), t = _ct_inputs(3, 24, 20, 12, 5, 9, weights_4d, channels_last)
    wrt = [s, w1, b1, w2, b2]
    got = _loss_and_grads(lambda: ct_loss(s, t, w1, b1, w2, b2, alpha=0.3, reduction=reduction,
                                          backend="csrc"), wrt, 2.5)
    want = _loss_and_grads(lambda: reference.ct_loss(s, t, w1, b1, w2, b2, alpha=0.3, reduction=reduction),
                           wrt, 2.5)
    _compare(got, want, ["student", "w1", "b1", "w2", "b2"])


@pytest.mark.parametrize("alpha", [1e38, 3.4028234663852886e38])
def test_largest_loss_weights_give_inf_like_the_reference_not_an_error(alpha, algo):
    """A loss weight the config accepts (finite, at most float32's largest) times a loss over 3.4 is beyond
    float32: every CPU backend returns inf (the engine's non-finite guard then stops the run), none raises."""
    csrc()
    s, t, params = _mgd_inputs(2, 8, 8, 5, 6)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
    kw = dict(mask="spatial", ratio=0.5, alpha=alpha, seed=3)
    (cs, w1, b1, w2, b2), ct_t = _ct_inputs(2, 8, 8, 8, 5, 6, False, False)
    for backend in ("reference", "csrc"):
        mgd = mgd_loss(s, t + 10, *p, backend=backend, **kw)
        ct = ct_loss(cs, ct_t + 10, w1, b1, w2, b2, alpha=alpha, backend=backend)
        assert mgd.dtype == ct.dtype == torch.float32
        assert mgd.item() == ct.item() == float("inf"), backend
        mgd.backward()  # the backward takes the same weight without raising
        assert not torch.isfinite(s.grad).all()
        s.grad = None


def test_ct_student_without_grad():
    csrc()
    (s, w1, b1, w2, b2), t = _ct_inputs(2, 8, 8, 8, 7, 7, False)
    s = s.detach()
    got = _loss_and_grads(lambda: ct_loss(s, t, w1, b1, w2, b2, backend="csrc"), [w1, b2], 1.0)
    want = _loss_and_grads(lambda: reference.ct_loss(s, t, w1, b1, w2, b2), [w1, b2], 1.0)
    _compare(got, want, ["w1", "b2"])


# needs subsets x student layouts (NCHW: per-sample GEMMs reading the student in place; NHWC: rows
# view; sliced: a copy), odd batch sizes (uneven sample ranges), grad_output != 1
_CT_SUBSETS = {"all": (1, 1, 1, 1, 1), "student": (1, 0, 0, 0, 0), "w1": (0, 1, 0, 0, 0),
               "b1": (0, 0, 1, 0, 0), "w2-b2": (0, 0, 0, 1, 1), "no-student": (0, 1, 1, 1, 1)}


@pytest.mark.parametrize("plain_gemm", [False, True], ids=["fast-gemm", "plain-gemm"])
@pytest.mark.parametrize("subset", list(_CT_SUBSETS))
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "sliced"])
def test_ct_grad_subsets_and_layouts(subset, layout, plain_gemm, monkeypatch):
    """plain-gemm: FASTKD_CT_PLAIN_GEMM=1, at::mm for every GEMM (the path without oneDNN / sgemm)."""
    csrc()
    if plain_gemm:
        monkeypatch.setenv("FASTKD_CT_PLAIN_GEMM", "1")
    (s, w1, b1, w2, b2), t = _ct_inputs(5, 24, 16, 20, 6, 7, False, channels_last=layout == "nhwc")
    if layout == "sliced":  # neither NCHW nor NHWC dense: student and teacher are channel slices
        s = torch.cat([s.detach(), s.detach()], 1)[:, 3:27].requires_grad_()
        t = torch.cat([t, t], 1)[:, 5:25]
        assert not s.is_contiguous() and not s.is_contiguous(memory_format=torch.channels_last)
    params = [s, w1, b1, w2, b2]
    names = ["student", "w1", "b1", "w2", "b2"]
    for x, flag in zip(params, _CT_SUBSETS[subset]):
        x.requires_grad_(bool(flag))
    wrt = [x for x in params if x.requires_grad]
    got = _loss_and_grads(lambda: ct_loss(s, t, w1, b1, w2, b2, alpha=0.7, backend="csrc"), wrt, -1.3)
    want = _loss_and_grads(lambda: reference.ct_loss(s, t, w1, b1, w2, b2, alpha=0.7), wrt, -1.3)
    _compare(got, want, [n for n, x in zip(names, params) if x.requires_grad])


# ---------------------------------------------------------------------------------------------
# Determinism: the loss does not depend on the number of threads
# ---------------------------------------------------------------------------------------------
def test_loss_bit_equal_across_thread_counts(algo):
    csrc()
    s, t, params = _mgd_inputs(8, 32, 32, 14, 14, seed=4)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]
    (cs_, w1, b1, w2, b2), ct_t = _ct_inputs(16, 64, 64, 64, 7, 7, False)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((mgd_loss(s, t, *p, mask="spatial", seed=2**35, backend="csrc"),
                            mgd_loss(s, t, *p, mask="channel", seed=2**35, backend="csrc"),
                            ct_loss(cs_, ct_t, w1, b1, w2, b2, backend="csrc")))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert torch.equal(a, e), (a.item(), e.item())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ct_loss_and_bias_grads_bit_equal_across_thread_counts(channels_last):
    csrc()
    (s, w1, b1, w2, b2), t = _ct_inputs(40, 64, 48, 40, 7, 7, False, channels_last)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            loss = ct_loss(s, t, w1, b1, w2, b2, alpha=0.5, backend="csrc")
            results.append((loss,) + torch.autograd.grad(loss, [b1, b2], grad_outputs=torch.tensor(0.75)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert torch.equal(a, e)


# ---------------------------------------------------------------------------------------------
# Custom ops, dispatch and the loader
# ---------------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck():
    csrc()
    s, t, params = _mgd_inputs(2, 8, 8, 5, 6)
    args = (s, t, params["gen_w1"], params["gen_b1"], params["gen_w2"], params["gen_b2"], None, None, True,
            0.5, 0.1, 3, 0)
    torch.library.opcheck(torch.ops.fastkd_C.mgd_forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    (cs_, w1, b1, w2, b2), ct_t = _ct_inputs(2, 8, 6, 4, 3, 5, False)
    torch.library.opcheck(torch.ops.fastkd_C.ct_forward.default, (cs_, ct_t, w1, b1, w2, b2, 0.5, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_fullgraph():
    """The csrc ops are custom ops with fake implementations: torch.compile keeps them in one graph."""
    csrc()
    (s, w1, b1, w2, b2), t = _ct_inputs(2, 8, 6, 4, 3, 5, False)
    ms, mt, params = _mgd_inputs(2, 8, 8, 5, 6)
    p = [params[k] for k in ("gen_w1", "gen_b1", "gen_w2", "gen_b2")]

    def both(s, t, ms, mt):
        return (ct_loss(s, t, w1, b1, w2, b2, backend="csrc")
                + mgd_loss(ms, mt, *p, mask="channel", ratio=0.5, seed=2**50, backend="csrc"))

    wrt = [s, w1, b2, ms] + p
    compiled = torch.compile(both, fullgraph=True, dynamic=False)
    got = _loss_and_grads(lambda: compiled(s, t, ms, mt), wrt, 1.5)
    want = _loss_and_grads(lambda: both(s, t, ms, mt), wrt, 1.5)
    _compare(got, want, ["s", "w1", "b2", "ms", "gen_w1", "gen_b1", "gen_w2", "gen_b2"])


def test_auto_on_cpu_picks_csrc():
    csrc()
    s, t, params = _mgd_inputs(2, 8, 8, 5, 6)
    inputs = dict(student=s, teacher=t, gen_w1=params["gen_w1"], align_w=None, mask="spatial")
    assert dispatch.select("mgd_loss", "auto", "cpu", inputs).name == dispatch.auto_order("mgd_loss", "cpu")[0]
    assert dict(explain("mgd_loss", "cpu", **inputs))["csrc"] is None
    (cs_, w1, _, w2, _), ct_t = _ct_inputs(2, 8, 8, 8, 5, 6, False)
    assert dispatch.select("ct_loss", "auto", "cpu", dict(student=cs_, teacher=ct_t, w1=w1, w2=w2)).name == "csrc"


def test_refusals_name_the_reason():
    b = csrc()
    s = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    assert "float32 only" in b.refuse("ct_loss", student=s, teacher=s, w1=s, w2=s)
    m = torch.empty(2, 8, 5, 6, device="meta")
    assert "CPU only" in b.refuse("ct_loss", student=m, teacher=m, w1=m, w2=m)
    assert "no csrc kernel" in b.refuse("kd_loss", student_logits=s, teacher_logits=s)
    # float64 through auto falls back to the reference
    w = torch.randn(8, 8, dtype=torch.float64)
    bias = torch.zeros(8, dtype=torch.float64)
    t = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    assert ct_loss(s, t, w, bias, w, bias).dtype == torch.float64


def test_dispatcher_reason_when_extension_unavailable(monkeypatch):
    why = "fastkd._C is not built (No module named 'fastkd._C'); build it with ..."
    monkeypatch.setitem(_ext._state, "error", why)
    s = torch.randn(2, 8, 5, 6)
    w = torch.randn(8, 8)
    bias = torch.zeros(8)
    inputs = dict(student=s, teacher=s, w1=w, w2=w)
    assert dict(explain("ct_loss", "cpu", **inputs))["csrc"] == why
    with pytest.raises(BackendUnavailableError, match="not built"):
        ct_loss(s, s, w, bias, w, bias, backend="csrc")
    assert dispatch.select("ct_loss", "auto", "cpu", inputs).name == "reference"


def test_loader_records_a_missing_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastkd._C", None)  # makes `from fastkd import _C` fail
    why = _ext._load()
    assert why is not None and "fastkd._C" in why and "pip install" in why
