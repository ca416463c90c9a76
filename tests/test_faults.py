"""Faults injected on purpose, with real processes and real files: kill -9 inside a save and inside pruning,
checkpoints with missing pieces, a NaN-producing optimizer step, bad data files, a run_dir that is a file or
read-only, a full (size-limited) file system during a save, changed settings on resume. Faults of the process
group (a stopped or killed rank, rank 0 unreachable at start-up): tests/test_faults_dist.py.

The kill points are the engine's own fault-injection hook (``FASTKD_FAIL_SAVE=<point>@<step>:kill`` sends
the process SIGKILL there, see ``fastkd/engine/checkpoint.py``).
"""
import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastkd.config import ConfigError, load_config
from fastkd.engine import checkpoint as ckpt
from fastkd.engine import guard, preflight, resume
from fastkd.engine.export import student_state_dict
from tests.test_engine_deepspeed import TINY, _env, _ok, fastkd, metrics
from tests.test_engine_nets import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- checkpoint directories (real files, real processes killed with SIGKILL) ---------------------------------

def fake_checkpoint(root, step, *, world=1, complete=True):
    """A tag directory with the files a 1-process ZeRO save writes, declared complete the engine's way."""
    path = os.path.join(root, ckpt.tag_for(step))
    os.makedirs(path, exist_ok=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 *(f"fastkd_rank{r:05d}.pt" for r in range(world))):
        torch.save({"step": step, "name": name}, os.path.join(path, name))
    if complete:
        ckpt._declare_complete(path, step, world_size=world)
    return path


def test_marked_checkpoint_with_missing_pieces_is_skipped_or_refused(tmp_path):
    root = str(tmp_path / "checkpoints")
    fake_checkpoint(root, 2)
    broken = fake_checkpoint(root, 4)
    os.remove(os.path.join(broken, "fastkd_rank00000.pt"))
    assert ckpt.complete_tags(root) == ["step_00000002"]
    assert ckpt.missing_pieces(broken) == ["fastkd_rank00000.pt"]
    said = []
    assert ckpt.resolve_resume("auto", str(tmp_path), warn=said.append) == (root, "step_00000002")
    assert said == [f"skipping checkpoint {broken}: missing fastkd_rank00000.pt"]
    with pytest.raises(ConfigError, match=r"step_00000004 is incomplete: missing fastkd_rank00000.pt"):
        ckpt.resolve_resume(broken, str(tmp_path))
    # A piece of the wrong size (a torn write) counts as missing too.
    ok = os.path.join(root, "step_00000002", "mp_rank_00_model_states.pt")
    with open(ok, "ab") as f:
        f.write(b"x")
    assert ckpt.missing_pieces(os.path.join(root, "step_00000002")) == ["mp_rank_00_model_states.pt"]
    assert ckpt.resolve_resume("auto", str(tmp_path)) is None


def test_old_plain_marker_needs_model_states_and_rank_file(tmp_path):
    path = tmp_path / "step_00000003"
    path.mkdir()
    (path / ckpt.MARKER).write_text("3\n")
    assert ckpt.missing_pieces(str(path)) == ["mp_rank_00_model_states.pt", "fastkd_rank00000.pt"]
    torch.save({}, path / "mp_rank_00_model_states.pt")
    torch.save({}, path / "fastkd_rank00000.pt")
    assert ckpt.missing_pieces(str(path)) == []


def _run_checkpoint_code(code, env):
    return subprocess.run([sys.executable, "-c", code], env={**_env(), **env}, capture_output=True, text=True,
                          timeout=120)


def test_kill_inside_pruning_never_leaves_a_complete_directory_with_pieces_missing(tmp_path):
    root = str(tmp_path / "checkpoints")
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    fake_checkpoint(root, 5, complete=False)  # a crashed save
    (tmp_path / "checkpoints" / "latest.tmp.999999").write_text("stale\n")
    # Prune to 1 kept: the process is killed with SIGKILL right after step 2 left the step_* namespace.
    res = _run_checkpoint_code(f"from fastkd.engine import checkpoint as c; c.prune({root!r}, 1)",
                               {"FASTKD_FAIL_SAVE": "in_prune@2:kill"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    names = sorted(os.listdir(root))
    assert "step_00000002" not in names and any(n.startswith(ckpt.TRASH) for n in names)
    for tag in [n for n in names if n.startswith("step_")]:  # every directory either whole or unmarked
        path = os.path.join(root, tag)
        assert ckpt.read_marker(path) is None or ckpt.missing_pieces(path) == [], tag
    assert ckpt.complete_tags(root) == ["step_00000004", "step_00000006"]
    # The next prune finishes the job: trash, stale temporary files and the incomplete leftover go.
    ckpt.prune(root, 1)
    assert sorted(os.listdir(root)) == ["step_00000006"]


def test_marker_lists_fsynced_files_and_is_written_last(tmp_path):
    path = fake_checkpoint(str(tmp_path), 7, world=2)
    marker = ckpt.read_marker(path)
    assert marker["step"] == 7 and marker["world_size"] == 2
    assert marker["files"] == {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n != ckpt.MARKER}


# -- the non-finite guard on a real DeepSpeed engine, every ZeRO stage ----------------------------------------

def _engine(stage, lr, opt="adamw"):
    import deepspeed
    from fastkd.engine.dist import setup
    setup(60)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optim = (torch.optim.AdamW(model.parameters(), lr=lr) if opt == "adamw"
             else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
          "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim, config=ds)
    return engine


def _full_params(engine, stage):
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return [p.detach().clone() for p in params]


def _checkpoint_would_hold_nonfinite(engine, stage):
    """The oracle, independent of the guard: every float tensor of DeepSpeed's own optimizer state_dict
    (what its checkpoints hold) and of the full module."""
    found = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            found.append(obj.is_floating_point() and not bool(torch.isfinite(obj).all()))
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(engine.optimizer.state_dict())
    walk(_full_params(engine, stage))
    walk(list(engine.module.buffers()))
    return any(found)


def _step(engine, loss):
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)  # the loss never tells
    return guard.state_flag(engine, engine.module, torch.device("cpu")).item()


@pytest.mark.usefixtures("restore_environ")
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_guard_sees_nonfinite_weights_and_optimizer_state_in_every_zero_stage(stage):
    x = torch.ones(2, 4)
    engine = _engine(stage, lr=1e-3)  # a finite step: nothing flagged
    assert _step(engine, engine(x).sum()) == 0.0 and not _checkpoint_would_hold_nonfinite(engine, stage)
    # SGD with an lr at the float32 limit: the update overflows the weights to inf.
    engine = _engine(stage, lr=3e38, opt="sgd")
    assert _step(engine, (engine(x) * 1e6).sum()) == 1.0
    assert _checkpoint_would_hold_nonfinite(engine, stage)
    # AdamW with gradients of 2e25: exp_avg_sq overflows to inf while the weights stay finite (the update
    # is exp_avg / sqrt(inf) = 0): only the optimizer state is poisoned. ZeRO-1/2 skip such a step
    # (their gradient norm overflows), leaving everything finite; the guard agrees either way.
    engine = _engine(stage, lr=1e-3)
    flag = _step(engine, engine(x)[:, 0].sum() * 1e25)
    assert all(torch.isfinite(p).all() for p in _full_params(engine, stage))
    assert flag == float(_checkpoint_would_hold_nonfinite(engine, stage)) == float(engine.skipped_steps == 0)
    assert stage not in (0, 3) or flag == 1.0


# -- bad inputs: one message naming the file and the cause, before any set-up --------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(1)
    torch.save(tiny(width=16).state_dict(), d / "teacher.pt")
    return d


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    from fastkd.data.classification.writers import ArraySource, write_beton
    d = tmp_path_factory.mktemp("beton")
    images = np.random.default_rng(0).integers(0, 255, (24, 16, 16, 3), dtype=np.uint8)
    write_beton(ArraySource(images, np.arange(24) % 4), str(d / "train.beton"), write_mode="raw",
                num_workers=1, progress=False)
    good = d / "train.beton"
    data = good.read_bytes()
    (d / "truncated.beton").write_bytes(data[:len(data) * 2 // 3])
    (d / "random.beton").write_bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    return d


def test_beton_structure_check(beton):
    assert preflight.beton_problem(str(beton / "train.beton")) is None
    assert "truncated" in preflight.beton_problem(str(beton / "truncated.beton"))
    assert "not an FFCV .beton file" in preflight.beton_problem(str(beton / "random.beton"))


def _digest(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _one_message(res, *needles):
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("fastkd: error")]
    assert len(errors) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_message(work, beton):
    base = ["train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}"]
    for name, cause in (("truncated", "truncated"), ("random", "not an FFCV .beton file")):
        res = fastkd(*base, f"run_dir={work / name}", "data.source=ffcv", f"data.path={beton / f'{name}.beton'}",
                     cwd=work)
        _one_message(res, f"{beton / f'{name}.beton'}", cause)
        assert not (work / name).exists()  # nothing created
    (work / "a_file").write_text("not a directory\n")
    _one_message(fastkd(*base, f"run_dir={work / 'a_file'}", cwd=work), f"run_dir {work / 'a_file'}",
                 "not a directory")
    assert (work / "a_file").read_text() == "not a directory\n"


@contextlib.contextmanager
def read_only(path):
    """``path`` read-only for this user: permission bits for a normal user; for root (which ignores them)
    a read-only bind mount of it over itself."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount: cannot make a directory read-only")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_read_only_run_dir_exits_2(work):
    ro = work / "read_only"
    ro.mkdir()
    (ro / "metrics.jsonl").write_text("")
    with read_only(ro):
        res = train(work, "read_only", check=False)
        _one_message(res, f"run_dir {ro} is not writable")
    assert os.listdir(ro) == ["metrics.jsonl"]


# -- runs killed inside a save and inside pruning, then resumed: exact ---------------------------------------

def train(work, name, *overrides, env=None, check=True, **kw):
    res = fastkd("train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}", f"run_dir={work / name}",
                 "train.eval_teacher=false", *overrides, cwd=work, env=env, **kw)
    return _ok(res) if check else res


CKPT = ("train.ckpt_every=2", "train.keep_last=1")


@pytest.fixture(scope="module")
def reference(work):
    train(work, "reference", *CKPT)
    return work / "reference"


def _every_complete_checkpoint_loads(run_dir):
    root = str(run_dir / "checkpoints")
    for tag in os.listdir(root):
        if tag.startswith("step_") and ckpt.read_marker(os.path.join(root, tag)) is not None:
            assert ckpt.missing_pieces(os.path.join(root, tag)) == [], tag
    tags = ckpt.complete_tags(root)
    for tag in tags:
        student_state_dict(str(run_dir), tag)
        torch.load(os.path.join(root, tag, "fastkd_rank00000.pt"), weights_only=False)["rng"]
    return tags


@pytest.mark.slow
def test_kill_9_inside_pruning_and_inside_a_save_then_exact_resume(work, reference):
    run = work / "killed"
    # 1. SIGKILL inside pruning: step 4 is complete, step 2 half-way out (renamed to trash, not deleted).
    res = train(work, "killed", *CKPT, env={"FASTKD_FAIL_SAVE": "in_prune@2:kill"}, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert _every_complete_checkpoint_loads(run) == ["step_00000004"]
    # 2. Resumed, then SIGKILL inside the save of step 6 (every file written, no marker yet).
    res = train(work, "killed", *CKPT, env={"FASTKD_FAIL_SAVE": "after_shards@6:kill"}, check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "step_00000004" in res.stderr
    assert _every_complete_checkpoint_loads(run) == ["step_00000004"]
    assert os.path.isdir(run / "checkpoints" / "step_00000006")  # unmarked, ignored
    # 3. Resumed again: finishes with the uninterrupted run's weights, bit for bit.
    res = train(work, "killed", *CKPT)
    assert "step_00000004" in res.stderr
    assert _every_complete_checkpoint_loads(run) == ["step_00000008"]
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(ckpt.TRASH) or ".tmp." in n]
    a, b = student_state_dict(str(run)), student_state_dict(str(reference))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["loss/total"] for r in metrics(run)][-4:] == [r["loss/total"] for r in metrics(reference)][-4:]


@pytest.fixture(scope="module")
def saved_run(work):
    """A run stopped after step 2 with one complete checkpoint."""
    train(work, "saved", *CKPT, "train.session_steps=2")
    return work / "saved"


def _save_fails_cleanly(work, run, cause, **popen):
    before = _digest(run / "checkpoints")
    cmd = [sys.executable, "-m", "fastkd.cli", "train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}",
           f"run_dir={run}", "train.eval_teacher=false", *CKPT]
    res = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=300, **popen)
    line = _one_message(res, "cannot write checkpoint", str(run / "checkpoints" / "step_00000004"), cause)
    after = _digest(run / "checkpoints")
    assert {k: after.get(k) for k in before} == before  # the earlier checkpoint untouched
    assert _every_complete_checkpoint_loads(run) == ["step_00000002"]
    return line


@pytest.mark.slow
def test_size_limited_file_system_during_a_save_exit_2_previous_checkpoint_intact(work, saved_run):
    """RLIMIT_FSIZE: every write past 96 KiB fails with EFBIG, so the model states of the next checkpoint
    cannot be written (works without privileges)."""
    import shutil
    run = work / "fsize"
    shutil.copytree(saved_run, run)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, 96 * 1024))

    _save_fails_cleanly(work, run, "File too large", preexec_fn=limit)


@pytest.mark.slow
def test_full_disk_during_a_save_exit_2_previous_checkpoint_intact(work, saved_run):
    """A real full file system: a tmpfs just larger than the run (needs permission to mount)."""
    import shutil
    disk = work / "disk"
    disk.mkdir()
    used = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(saved_run) for f in fs)
    size = (used // 4096 + 48) * 4096  # room for the logs, not for another checkpoint
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("no permission to mount a tmpfs")
    try:
        shutil.copytree(saved_run, disk / "run")
        _save_fails_cleanly(work, disk / "run", "No space left on device")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# -- a step whose update is non-finite never becomes a checkpoint --------------------------------------------

@pytest.mark.slow
def test_nonfinite_update_with_finite_loss_is_not_checkpointed(work):
    res = train(work, "overflow", "optim.lr=3e38", "schedule.warmup_steps=0", "train.grad_clip=0", "train.ckpt_every=1",
                check=False)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "non-finite weights or optimizer state after the optimizer step of step 1" in res.stderr
    assert "Traceback" not in res.stderr
    assert ckpt.latest_checkpoint(str(work / "overflow")) is None


@pytest.mark.slow
def test_stop_message_says_how_large_the_last_good_weights_are(work):
    """lr = 1e30: step 1 is finite (weights ~1e30, checkpointed), step 2 is not. The stop message gives the
    largest weight the kept checkpoint holds: DeepSpeed's own fp32 master partition in that file."""
    res = train(work, "absurd", "optim.lr=1e30", "schedule.warmup_steps=0", "train.grad_clip=0", "train.ckpt_every=1",
                check=False)
    assert res.returncode == 3, res.stderr[-3000:]
    path = work / "absurd" / "checkpoints" / "step_00000001"
    assert ckpt.latest_checkpoint(str(work / "absurd"))[1] == "step_00000001"
    state = torch.load(path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    peak = max(float(t.detach().abs().max()) for t in state["optimizer_state_dict"]["single_partition_of_fp32_groups"])
    assert peak > 1e29
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("fastkd: error")]
    assert "non-finite loss at step 2" in line and "sane before resuming" in line, line
    assert f"its weights (step 1) reach |w| = {peak:.3g}" in line, line
    assert "Traceback" not in res.stderr, line


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "csrc"])
def test_huge_loss_weight_stops_at_the_guard_and_inf_at_load(work, backend):
    """alpha = 1e38 is a valid weight: the loss (or the update) overflows and the run stops with exit 3 and one
    message, on every CPU backend (the compiled kernels used to raise converting the loss to float32);
    alpha = inf is refused when the config loads."""
    no_kd = ["distill.kd=null"] if backend == "csrc" else []  # csrc has no logit KD op
    res = train(work, f"alpha_{backend}", f"distill.backend={backend}", "distill.pairs.0.alpha=1e38",
                "distill.pairs.1.alpha=1e38", *no_kd, check=False)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "non-finite" in res.stderr, res.stderr[-3000:]
    assert ckpt.latest_checkpoint(str(work / f"alpha_{backend}")) is None
    if backend != "reference":
        return  # refused at load: the same for every backend
    res = train(work, "alpha_inf", "distill.pairs.1.alpha=inf", check=False)
    _one_message(res, "invalid configuration")
    assert "distill.pairs.1: alpha must be a finite number" in res.stderr and "got inf" in res.stderr
    assert not (work / "alpha_inf").exists()


# -- resume with changed settings ----------------------------------------------------------------------------

def test_resume_review_applies_lr_and_refuses_what_it_cannot_honour(work):
    args = [f"teacher.checkpoint={work / 'teacher.pt'}"]
    saved = resume.to_dict(load_config(TINY, args))
    notes = resume.review(saved, load_config(TINY, [*args, "optim.lr=0.1", "train.epochs=3",
                                                    "distill.calibration_batches=2"]),
                          saved_world=1, world=1, where="x")
    assert notes == ["distill.calibration_batches 1 -> 2 is ignored on resume: alpha: auto was calibrated "
                     "when the run started",
                     "optim.lr 0.05 -> 0.1: applied (the restored schedule is rescaled to the new peak)",
                     "train.epochs 2 -> 3: applied from the new config"]
    for change, named in ((["optim.momentum=0.5"], "optim.momentum 0.9 -> 0.5"),
                          (["train.batch_size=32"], "train.batch_size 16 -> 32"),
                          (["seed=3"], "seed 0 -> 3"),
                          (["distill.pairs=[]"], "distill.pairs (added or removed)"),
                          (["student.kwargs.width=4"], "student.kwargs.width 8 -> 4")):
        with pytest.raises(ConfigError, match="cannot resume from x with changed setting") as err:
            resume.review(saved, load_config(TINY, [*args, *change]), saved_world=1, world=1, where="x")
        assert named in str(err.value)
    with pytest.raises(ConfigError, match="number of processes 2 -> 1"):
        resume.review(saved, load_config(TINY, args), saved_world=2, world=1, where="x")


@pytest.mark.slow
def test_resume_with_new_lr_applies_it_and_says_so(work, reference):
    run = work / "new_lr"
    train(work, "new_lr", "train.session_steps=3", "train.ckpt_every=0")
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.05
    refused = train(work, "new_lr", "optim.momentum=0.5", check=False)
    _one_message(refused, "optim.momentum 0.9 -> 0.5")
    assert not (run / "config.step_00000003.json").exists()  # a refused attempt leaves no config behind
    res = train(work, "new_lr", "optim.lr=0.1", "train.session_steps=1")
    assert "resume: optim.lr 0.05 -> 0.1: applied" in res.stderr
    step4 = [r for r in metrics(run) if r["step"] == 4][-1]
    ref4 = [r for r in metrics(reference) if r["step"] == 4][-1]
    assert step4["lr"] == pytest.approx(ref4["lr"] * 2, rel=1e-12)  # the same schedule, twice the peak
    assert json.loads((run / "config.step_00000003.json").read_text())["optim"]["lr"] == 0.1
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.05


@pytest.mark.slow
def test_resume_past_the_run_s_end_is_refused_and_a_finished_run_says_so(work, reference):
    import shutil
    run = work / "past_end"
    shutil.copytree(reference, run)  # finished: its last checkpoint is step 8 of 8
    before = _digest(run)
    line = _one_message(train(work, "past_end", *CKPT, "train.max_steps=4", check=False),
                        "train.max_steps=4 ends the run at step 4", "is at step 8",
                        "already past its end and nothing would be trained")
    assert "applied" not in line
    assert _digest(run) == before  # nothing written
    res = train(work, "past_end", *CKPT)
    assert "the run already ended at step 8 (its length: 8 steps): nothing to train" in res.stderr
    assert [r["step"] for r in metrics(run)] == [r["step"] for r in metrics(reference)]  # no step trained
