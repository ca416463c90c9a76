"""Real DeepSpeed runs on the CPU (gloo): 2 processes under the `deepspeed` launcher vs 1 plain process;
2 "nodes" x 2 processes with ZeRO-3; exact resume; a crash while saving; NaN; SIGTERM (preemption).

Runs are module-scoped and shared between tests. Tiny teacher/student (tests.test_engine_nets), MGD + CT + KD,
built-in synthetic data, 2 epochs x 4 steps of a global batch of 16; validation set of 37 (odd) images.

BatchNorm: without SyncBatchNorm (GPU only) statistics are per micro-batch of each process. The 1-process
reference therefore runs grad_accum=2 with micro-batches of 8: its micro-batch m holds exactly the samples
rank m holds in the 2-process run (engine/data.py sharding convention), so BatchNorm sees the same batches
and the MGD masks the same samples (sample_offset). Losses then agree to float32 round-off of the
different reduction order (gradient all-reduce vs accumulation): rel 1e-5.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from fastkd.engine.checkpoint import complete_tags, latest_checkpoint
from fastkd.engine.export import student_state_dict
from tests.test_engine_nets import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tests", "tiny.yaml")


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fastkd(*args, cwd, procs=1, timeout=300, env=None):
    """Run the CLI as a plain process, or under the deepspeed launcher with ``procs`` processes."""
    if procs == 1:
        cmd = [sys.executable, "-m", "fastkd.cli", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port",
               str(_port()), "--module", "fastkd.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\nSTDOUT:\n{res.stdout[-3000:]}\nSTDERR:\n{res.stderr[-5000:]}"
    return res


def metrics(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    torch.manual_seed(1)
    torch.save(tiny(width=16).state_dict(), d / "teacher.pt")
    return d


def train(work, name, *overrides, procs=1, env=None, check=True):
    res = fastkd("train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}", f"run_dir={work / name}", *overrides,
                 cwd=work, procs=procs, env=env)
    return _ok(res) if check else res


@pytest.fixture(scope="module")
def two_proc(work):
    train(work, "zero2_x2", "deepspeed.config=configs/deepspeed/zero2.json", procs=2)
    return work / "zero2_x2"


@pytest.fixture(scope="module")
def one_proc(work):
    train(work, "single", "train.grad_accum=2")
    return work / "single"


def test_two_process_zero2_matches_one_process(two_proc, one_proc):
    a, b = metrics(two_proc), metrics(one_proc)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss/total", "loss/ce", "loss/kd", "loss/mgd.layer2", "loss/ct.layer1", "lr"):
        for ra, rb in zip(a, b):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (key, ra["step"], ra[key], rb[key])
    assert a[-1]["loss/total"] < a[0]["loss/total"]  # it trains
    # alpha: auto is measured on the same global batch, averaged over processes: the same value.
    ca, cb = metrics(two_proc, "calibration")[0], metrics(one_proc, "calibration")[0]
    assert ca["alpha/mgd.layer2"] == pytest.approx(cb["alpha/mgd.layer2"], rel=1e-5)


def test_eval_counts_exact_with_odd_val_size(two_proc, one_proc):
    for run in (two_proc, one_proc):
        evals = metrics(run, "eval")
        assert [r["val/count"] for r in evals] == [37, 37]  # 37 = 19 + 18 on two ranks, none padded or dropped
        teacher = metrics(run, "teacher")[0]
        assert teacher["teacher/count"] == 37
        # whole samples counted (BatchNorm running statistics differ between the two runs, so accuracies may too)
        assert all(abs(r["val/top1"] * 37 / 100 - round(r["val/top1"] * 37 / 100)) < 1e-6 for r in evals)


def test_export_roundtrip_strict_and_same_logits(two_proc, work):
    out = work / "student.pt"
    res = _ok(fastkd("export", str(two_proc), "--out", str(out), cwd=work))
    assert "student state_dict" in res.stdout
    state = torch.load(out, map_location="cpu", weights_only=True)
    model = tiny(width=8)
    assert set(state) == set(model.state_dict())  # no teacher, no generator/transform weights
    model.load_state_dict(state, strict=True)
    # Independent path: DeepSpeed's own consolidation of the fp32 master weights of the last checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    full = get_fp32_state_dict_from_zero_checkpoint(str(two_proc / "checkpoints"), tag="step_00000008")
    ref = tiny(width=8)
    ref.load_state_dict({k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}, strict=False)
    buffers = {k: v for k, v in state.items() if "running" in k or "num_batches" in k}
    ref.load_state_dict(buffers, strict=False)  # BN buffers are not optimizer state
    model.eval(), ref.eval()
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    # `fastkd eval` of the exported file in one process == the 2-process run's last evaluation.
    res = _ok(fastkd("eval", TINY, f"teacher.checkpoint={work / 'teacher.pt'}", "--weights", str(out), cwd=work))
    last = metrics(two_proc, "eval")[-1]
    assert f"top1 {last['val/top1']:.2f}% top5 {last['val/top5']:.2f}% on 37 images" in res.stdout


def test_resume_continues_exactly(work, one_proc):
    # Stop mid-epoch (step 3 of 4), then `resume: auto` in a new process: same losses, same weights, bitwise.
    first = train(work, "resumed", "train.grad_accum=2", "train.session_steps=3")
    assert "stopped after train.session_steps at step 3" in first.stderr
    second = train(work, "resumed", "train.grad_accum=2")
    assert "resumed from" in second.stderr and "step_00000003" in second.stderr
    a, b = metrics(work / "resumed"), metrics(one_proc)
    assert [r["step"] for r in a] == list(range(1, 9))
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    sa, sb = student_state_dict(str(work / "resumed")), student_state_dict(str(one_proc))
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_compile_matches_eager(work, one_proc):
    train(work, "compiled", "train.grad_accum=2", "train.compile=true", "train.session_steps=3")
    a, b = metrics(work / "compiled"), metrics(one_proc)[:3]
    assert len(a) == 3
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/ce", "loss/kd", "loss/mgd.layer2", "loss/ct.layer1"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4), (key, ra["step"])  # inductor reorders float ops


def test_cpu_offload_preset_trains_the_same_model(work, one_proc):
    # ZeRO-3 with optimizer and parameter offload to host memory: same losses as the plain run.
    train(work, "offload", "train.grad_accum=2", "deepspeed.config=configs/deepspeed/zero3_offload.json",
          "train.session_steps=3")
    a, b = metrics(work / "offload"), metrics(one_proc)[:3]
    assert len(a) == 3
    for ra, rb in zip(a, b):
        assert ra["loss/total"] == pytest.approx(rb["loss/total"], rel=1e-5), ra["step"]


def test_checkpoints_follow_ckpt_every_and_the_run_s_end_not_every_epoch(work):
    """2 epochs of 4 steps: with train.ckpt_every=3 the checkpoints are steps 3, 6 and the end (8), not also the
    end of epoch 0 (4); without it, every epoch's end (4, 8)."""
    train(work, "cadence", "train.ckpt_every=3", "train.keep_last=10", "train.eval_every=0")
    assert complete_tags(str(work / "cadence" / "checkpoints")) == ["step_00000003", "step_00000006", "step_00000008"]
    train(work, "cadence0", "train.keep_last=10", "train.eval_every=0")
    assert complete_tags(str(work / "cadence0" / "checkpoints")) == ["step_00000004", "step_00000008"]


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(work):
    res = train(work, "nan", "optim.lr=1e30", "train.ckpt_every=1", check=False)
    assert res.returncode == 3
    assert "fastkd: error: non-finite loss at step 2 (epoch 0) in term(s): ce" in res.stderr
    assert "Traceback" not in res.stderr
    assert latest_checkpoint(str(work / "nan"))[1] == "step_00000001"


def test_plot_writes_png(one_proc, work):
    res = _ok(fastkd("plot", str(one_proc), cwd=work))
    png = res.stdout.strip().splitlines()[-1]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- scale and faults ----------------------------------------------------------------------------------------

def _params(state):
    return {k: v for k, v in state.items() if "num_batches_tracked" not in k}


def test_two_nodes_by_two_processes_zero3_match_one_process(work):
    """Two launcher invocations in no-ssh mode (--node_rank 0/1) on the loopback: 4 ranks, ZeRO-3,
    micro-batch 4; the 1-process reference accumulates 4 micro-batches of 4 (same BatchNorm batches)."""
    (work / "hostfile").write_text("node0 slots=2\nnode1 slots=2\n")
    port = _port()
    args = ["train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}", f"run_dir={work / 'nodes'}",
            "deepspeed.config=configs/deepspeed/zero3.json"]
    nodes = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(work / "hostfile"),
                               "--no_ssh", "--node_rank", str(n), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), "--num_gpus", "2", "--module", "fastkd.cli", *args],
                              cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(log[-3000:] for log in logs)
    train(work, "ga4", "train.grad_accum=4")
    a, b = metrics(work / "nodes"), metrics(work / "ga4")
    assert [r["loss/total"] for r in a] == pytest.approx([r["loss/total"] for r in b], rel=1e-5)
    sa, sb = student_state_dict(str(work / "nodes")), student_state_dict(str(work / "ga4"))  # ZeRO-3 consolidated
    for k, v in _params(sb).items():
        if "running" not in k:  # running statistics: averaged over ranks vs sequential updates
            torch.testing.assert_close(sa[k], v, rtol=1e-5, atol=1e-6)


def test_two_process_resume_is_bitwise_exact(work, two_proc):
    first = train(work, "resumed2", "train.session_steps=3", procs=2)
    assert "stopped after train.session_steps at step 3" in first.stderr + first.stdout
    train(work, "resumed2", procs=2)
    a, b = metrics(work / "resumed2"), metrics(two_proc)
    assert [r["step"] for r in a] == list(range(1, 9))
    assert [r["loss/total"] for r in a] == [r["loss/total"] for r in b]
    sa, sb = student_state_dict(str(work / "resumed2")), student_state_dict(str(two_proc))
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_crash_while_saving_keeps_previous_checkpoint(work, one_proc):
    res = train(work, "crash", "train.grad_accum=2", "train.ckpt_every=2", "train.keep_last=2", check=False,
                env={"FASTKD_FAIL_SAVE": "after_shards@4"})  # killed after the shards of step 4, before COMPLETE
    assert res.returncode == 17
    root = str(work / "crash" / "checkpoints")
    assert complete_tags(root) == ["step_00000002"] and os.path.isdir(os.path.join(root, "step_00000004"))
    resumed = train(work, "crash", "train.grad_accum=2", "train.ckpt_every=2", "train.keep_last=2")
    assert "step_00000002" in resumed.stderr
    assert complete_tags(root) == ["step_00000006", "step_00000008"]  # keep_last=2, the broken one is gone
    sa, sb = student_state_dict(str(work / "crash")), student_state_dict(str(one_proc))
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    steps = [r["step"] for r in metrics(work / "crash")]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]  # steps 3-4 redone after the crash, nothing else lost


def test_sigterm_writes_checkpoint_and_exits_cleanly(work):
    cmd = [sys.executable, "-m", "fastkd.cli", "train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}",
           f"run_dir={work / 'preempt'}", "train.epochs=500", "train.eval_every=0"]
    proc = subprocess.Popen(cmd, cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = work / "preempt" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (path.exists() and '"kind": "train"' in path.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by signal at step" in err and "Traceback" not in err
    tag = latest_checkpoint(str(work / "preempt"))[1]
    step = int(tag.split("_")[1])
    assert step == metrics(work / "preempt")[-1]["step"]
    res = train(work, "preempt", "train.epochs=500", "train.session_steps=1")
    assert f"resumed from {work / 'preempt' / 'checkpoints' / tag} at step {step}" in res.stderr
