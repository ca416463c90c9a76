"""Scale and faults on real DeepSpeed processes (CPU, gloo): 2 "nodes" x 2 processes with ZeRO-3, exact
resume with 2 processes, a crash in the middle of a checkpoint write, SIGTERM (preemption)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_engine_deepspeed import TINY, _env, _port, metrics, one_proc, train, two_proc, work  # noqa: F401
from tests.test_engine_nets import tiny
from fastkd.engine.checkpoint import complete_tags, latest_checkpoint
from fastkd.engine.export import student_state_dict


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
