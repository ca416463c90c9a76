"""Measured ``auto`` (fastkd/ops/_auto.py): cached and reused, same on every rank, can be switched off,
shown by ``explain``, never timed inside a torch.compile trace.

Two stand-in backends ("fake_a", "fake_b", both the reference's maths) are the candidates, so the tests
do not depend on the compiled extension; timings are forced (``_auto.measure`` replaced) where the
outcome must be deterministic, and one test times real backends.
"""
import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from fastkd.ops import _auto, ct_loss, dispatch, explain, mgd_loss, reference


class _Fake:
    """The reference's maths under another name; counts its calls and may sleep to be slow."""

    def __init__(self, name, sleep_s=0.0):
        self.name, self.sleep_s, self.calls = name, sleep_s, 0

    def unavailable(self):
        return None

    def refuse(self, op, **inputs):
        return None if op in ("mgd_loss", "ct_loss") else f"no {op}"

    def mgd_loss(self, *args, **kwargs):
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return reference.mgd_loss(*args, **kwargs)

    def ct_loss(self, *args, **kwargs):
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return reference.ct_loss(*args, **kwargs)


FAKES = {"fake_a": _Fake("fake_a"), "fake_b": _Fake("fake_b")}


def _install_fakes(cache, sleep_a=0.0):
    """Two fake backends as the CPU's candidates (fake_a first), trial on, cache in ``cache``."""
    os.environ["FASTKD_AUTO_TRIAL"] = "1"
    os.environ["FASTKD_CACHE_DIR"] = str(cache)
    FAKES["fake_a"].sleep_s = sleep_a
    for name in FAKES:
        FAKES[name].calls = 0
        dispatch.register(name, f"{__name__}:FAKES")  # never imported: the object is put in place
        dispatch._LOADED[name] = FAKES[name]
    dispatch.AUTO_ORDER["cpu"] = ["fake_a", "fake_b", "reference"]
    _auto.reset()


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_AUTO_TRIAL", "1")
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", list(dispatch.AUTO_ORDER["cpu"]))
    saved_registry = dict(dispatch._REGISTRY)
    _install_fakes(tmp_path / "cache")
    yield tmp_path / "cache"
    for name in FAKES:
        dispatch._REGISTRY.pop(name, None)
        dispatch._LOADED.pop(name, None)
    dispatch._REGISTRY.update(saved_registry)
    _auto.reset()


def _forced(timings, log):
    """A stand-in for ``_auto.measure`` returning ``timings`` (ms per backend) and logging its calls."""
    def measure(candidates, run, args, dev_type):
        log.append(list(candidates))
        return {name: timings[name] for name in candidates}
    return measure


def _ct(n=2, c=8, hw=3, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, c, hw, hw, generator=g).requires_grad_(requires_grad)
    t = torch.randn(n, c, hw, hw, generator=g)
    w = [torch.randn(c, c, generator=g) * 0.1, torch.zeros(c), torch.randn(c, c, generator=g) * 0.1, torch.zeros(c)]
    return s, t, w


def _ct_inputs(s, t, w):
    return dict(student=s, teacher=t, w1=w[0], w2=w[2])


def test_measured_choice_is_cached_and_reused(fakes, monkeypatch):
    log = []
    monkeypatch.setattr(_auto, "measure", _forced({"fake_a": 3.0, "fake_b": 1.0, "reference": 2.0}, log))
    s, t, w = _ct()
    want = ct_loss(s, t, *w, backend="reference")
    for _ in range(3):
        torch.testing.assert_close(ct_loss(s, t, *w), want, rtol=0, atol=0)
    assert log == [["fake_a", "fake_b", "reference"]]  # measured once, at first use
    assert FAKES["fake_b"].calls == 3 and FAKES["fake_a"].calls == 0  # the measured-fastest ran
    # a smaller last batch (3 -> bucket 4) and N=4 share a bucket; another channel count does not
    s3, t3, _ = _ct(n=3)
    s4, t4, _ = _ct(n=4)
    ct_loss(s3, t3, *w)
    ct_loss(s4, t4, *w)
    assert len(log) == 2
    s16, t16, w16 = _ct(c=16)
    ct_loss(s16, t16, *w16)
    assert len(log) == 3
    # on disk, keyed by the machine; a new process (memory forgotten) reuses it without measuring
    (path,) = list(fakes.iterdir())
    cached = json.load(open(path))
    assert cached["machine"]["threads"] == torch.get_num_threads() and cached["machine"]["torch"]
    assert {e["choice"] for e in cached["entries"].values()} == {"fake_b"}
    _auto.reset()
    ct_loss(s, t, *w)
    assert len(log) == 3 and FAKES["fake_b"].calls == 7
    assert explain("ct_loss", "cpu", **_ct_inputs(s, t, w)).how == "disk cache"
    # FASTKD_AUTO_TRIAL=fresh measures again and overwrites the file
    monkeypatch.setenv("FASTKD_AUTO_TRIAL", "fresh")
    monkeypatch.setattr(_auto, "measure", _forced({"fake_a": 0.5, "fake_b": 1.0, "reference": 2.0}, log))
    _auto.reset()
    ct_loss(s, t, *w)
    assert len(log) == 4 and FAKES["fake_a"].calls == 1
    key = _auto.bucket_key("ct_loss", "cpu", _ct_inputs(s, t, w))
    assert json.load(open(path))["entries"][key]["choice"] == "fake_a"


def test_steady_state_skips_the_bucket_and_follows_switches(fakes, monkeypatch):
    """After the first call, a call of the same signature is one memo lookup (``choose`` not entered), and
    the memo never outlives what it depends on: the switch, a reset, another shape."""
    monkeypatch.setattr(_auto, "measure", _forced({"fake_a": 3.0, "fake_b": 1.0, "reference": 2.0}, []))
    s, t, w = _ct()
    ct_loss(s, t, *w)
    entered = []
    real_choose = _auto.choose
    monkeypatch.setattr(_auto, "choose", lambda *a, **k: entered.append(1) or real_choose(*a, **k))
    for _ in range(3):
        ct_loss(s, t, *w)
    assert entered == [] and FAKES["fake_b"].calls == 4
    ct_loss(*_ct(n=3)[:2], *w)  # another shape: through choose (same bucket, same choice)
    assert entered == [1] and FAKES["fake_b"].calls == 5
    s_ng, t_ng, _ = _ct(requires_grad=False)  # requires_grad is part of the signature
    ct_loss(s_ng, t_ng, *w)
    assert len(entered) == 2
    monkeypatch.setenv("FASTKD_AUTO_TRIAL", "0")  # switched off: the static order at once
    ct_loss(s, t, *w)
    assert FAKES["fake_a"].calls == 1
    monkeypatch.setenv("FASTKD_AUTO_TRIAL", "1")
    _auto.reset()  # forgotten with the decisions
    assert _auto.memo_get(_auto.signature("ct_loss", "cpu", _ct_inputs(s, t, w))) is None


def test_switched_off_uses_the_static_order(fakes, monkeypatch):
    monkeypatch.setenv("FASTKD_AUTO_TRIAL", "0")
    monkeypatch.setattr(_auto, "measure", lambda *a: pytest.fail("measured although switched off"))
    s, t, w = _ct()
    ct_loss(s, t, *w)
    assert FAKES["fake_a"].calls == 1 and FAKES["fake_b"].calls == 0
    assert not fakes.exists()  # nothing written
    report = explain("ct_loss", "cpu", **_ct_inputs(s, t, w))
    assert report.choice == "fake_a" and "FASTKD_AUTO_TRIAL=0" in report.how


def test_explain_shows_the_choice_and_its_timings(fakes, monkeypatch):
    monkeypatch.setattr(_auto, "measure", _forced({"fake_a": 4.5, "fake_b": 0.25, "reference": 9.0}, []))
    s, t, w = _ct()
    before = explain("ct_loss", "cpu", **_ct_inputs(s, t, w))
    assert before.choice == "fake_a" and "not measured yet" in before.how and before.ms == {}
    ct_loss(s, t, *w)
    after = explain("ct_loss", "cpu", **_ct_inputs(s, t, w))
    assert (after.choice, after.how, after.ms) == ("fake_b", "measured", {"fake_a": 4.5, "fake_b": 0.25,
                                                                          "reference": 9.0})
    assert set(dict(after)) == set(dispatch.known_backends())  # still every backend with its reason
    text = str(after)
    assert "auto -> fake_b (measured)" in text and "0.250 ms" in text and "4.500 ms" in text


def test_a_single_accepting_backend_is_not_measured(fakes, monkeypatch):
    monkeypatch.setattr(_auto, "measure", lambda *a: pytest.fail("nothing to compare"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ["reference"])
    s, t, w = _ct()
    ct_loss(s, t, *w)
    assert explain("ct_loss", "cpu", **_ct_inputs(s, t, w)).how == "only one accepts"


def test_real_trial_picks_the_faster_and_leaves_no_trace(fakes):
    """A real timed trial: fake_a sleeps 50 ms per call, fake_b and the reference do not. The trial runs
    on detached copies: the caller's tensors get no gradient and their graph is untouched."""
    _install_fakes(fakes, sleep_a=0.05)
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 8, 5, 5, generator=gen).requires_grad_()
    t = torch.randn(2, 8, 5, 5, generator=gen)
    p = [(torch.randn(8, 8, 3, 3, generator=gen) * 0.1).requires_grad_(), torch.zeros(8, requires_grad=True),
         (torch.randn(8, 8, 3, 3, generator=gen) * 0.1).requires_grad_(), torch.zeros(8, requires_grad=True)]
    loss = mgd_loss(s, t, *p, mask="spatial", seed=5)
    assert s.grad is None and all(q.grad is None for q in p)
    report = explain("mgd_loss", "cpu", student=s, teacher=t, gen_w1=p[0], align_w=None, mask="spatial")
    assert report.how == "measured" and set(report.ms) == {"fake_a", "fake_b", "reference"}
    assert report.ms["fake_a"] > 50 and report.choice != "fake_a"
    assert report.choice == min(report.ms, key=report.ms.get)
    loss.backward()
    ref = torch.autograd.grad(mgd_loss(s, t, *p, mask="spatial", seed=5, backend="reference"), [s])[0]
    torch.testing.assert_close(s.grad, ref, rtol=0, atol=0)  # one backward's gradient, nothing more


def test_never_measured_inside_a_compile_trace(fakes, monkeypatch):
    log = []
    monkeypatch.setattr(_auto, "measure", _forced({"fake_a": 3.0, "fake_b": 1.0, "reference": 2.0}, log))
    s, t, w = _ct(requires_grad=False)
    fn = lambda s, t: ct_loss(s, t, *w)  # noqa: E731
    torch._dynamo.reset()
    torch.compile(fn, backend="eager", fullgraph=True)(s, t)
    assert log == [] and FAKES["fake_a"].calls == 1  # traced with the static order, not timed
    fn(s, t)  # eager: measured and decided
    assert log and FAKES["fake_b"].calls == 1
    torch._dynamo.reset()
    torch.compile(fn, backend="eager", fullgraph=True)(s, t)
    assert len(log) == 1 and FAKES["fake_b"].calls == 2  # a new trace takes the decision from memory
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Every rank makes the same choice (two gloo processes; each rank's forced timings disagree)
# ---------------------------------------------------------------------------------------------
RANK_TIMINGS = [{"fake_a": 1.0, "fake_b": 2.0, "reference": 3.0},   # rank 0: fake_a is faster
                {"fake_a": 2.0, "fake_b": 1.0, "reference": 3.0}]   # rank 1: fake_b is faster


def _rank_worker(rank, world, init_file, cache_root, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _install_fakes(os.path.join(cache_root, f"rank{rank}"))
    _auto.measure = _forced(RANK_TIMINGS[rank], [])
    s, t, w = _ct()
    chosen = []
    record = lambda: chosen.append(explain("ct_loss", "cpu", **_ct_inputs(s, t, w)).choice)  # noqa: E731
    ct_loss(s, t, *w)  # call 1: measured, agreed at once
    record()
    ct_loss(s, t, *w)  # call 2 (an agreement with nothing pending)
    # call 3: a bucket only this rank meets (another batch size per rank): pending, static order
    own = _ct(n=8 if rank == 0 else 16)
    ct_loss(own[0], own[1], *own[2])
    pending = explain("ct_loss", "cpu", **_ct_inputs(*own))
    ct_loss(s, t, *w)  # call 4: agreed
    both = [explain("ct_loss", "cpu", **_ct_inputs(*_ct(n=n))) for n in (8, 16)]
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump({"first": chosen, "pending": [pending.choice, pending.how],
                   "agreed": [[e.choice, e.how, e.ms] for e in both]}, f)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_same_choice_on_every_rank(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mp.start_processes(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "cache"), str(out)),
                       nprocs=2, start_method="spawn")
    r0, r1 = (json.load(open(out / f"{r}.json")) for r in range(2))
    assert r0["first"] == r1["first"] == ["fake_a"]  # rank 0's measurement wins on both ranks
    assert r0["pending"] == r1["pending"] == ["fake_a", "static order: measured here, agreed across ranks "
                                                          "at this op's next 2^k-th call"]
    # N=8 was met by rank 0 only, N=16 by rank 1 only: each rank's own measurement, adopted by both
    assert r0["agreed"] == r1["agreed"] == [["fake_a", "rank 0", RANK_TIMINGS[0]],
                                            ["fake_b", "rank 1", RANK_TIMINGS[1]]]
    # rank 0 writes the agreed decisions; rank 1 writes nothing
    (path,) = list((tmp_path / "cache" / "rank0").iterdir())
    assert len(json.load(open(path))["entries"]) == 3
    assert not (tmp_path / "cache" / "rank1").exists()
