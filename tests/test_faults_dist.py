"""Faults of the process group, with real processes: a rank stopped (SIGSTOP) or killed while training, under
the ``deepspeed`` launcher, whichever rank it is (rank 0 hosts the rendezvous store the failure path uses);
a rank that cannot reach rank 0 at start-up. Every surviving process exits within ``train.dist_timeout_s``
+ a margin with status 4 and one line naming the failed rank; the launcher then ends a stopped rank.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_engine_deepspeed import TINY, _env, _port
from tests.test_engine_nets import tiny

# After dist_timeout_s a survivor spends up to 7 s hearing from the others (explain_comm_failure), then exits.
SURVIVOR_MARGIN_S = 15
# The deepspeed launcher then SIGTERMs the stopped rank and SIGKILLs it after a 30 s grace.
LAUNCHER_GRACE_S = 30


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_dist")
    torch.manual_seed(1)
    torch.save(tiny(width=16).state_dict(), d / "teacher.pt")
    return d


def _rank_pids(launcher_pid, world):
    import psutil
    deadline = time.time() + 120
    while time.time() < deadline:
        found = {}
        for p in psutil.Process(launcher_pid).children(recursive=True):
            try:
                env = p.environ()
            except psutil.Error:
                continue
            if "RANK" in env and "fastkd.cli" in " ".join(p.cmdline()):
                found[int(env["RANK"])] = p.pid
        if len(found) == world:
            return found
        time.sleep(0.5)
    raise AssertionError("ranks not found")


def _gone(pid) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _error_lines(out):
    return [line for line in out.splitlines() if line.startswith("fastkd: error")]


@pytest.mark.slow
@pytest.mark.parametrize("how,victim", [("SIGSTOP", 0), ("SIGSTOP", 1), ("SIGKILL", 1)])
def test_stopped_or_killed_rank_brings_everyone_down_within_the_timeout(work, how, victim):
    timeout_s = 10
    # the launcher's grace for a stopped rank is its own, the same whichever rank: timed with rank 0 stopped
    wait_for_launcher = (how, victim) != ("SIGSTOP", 1)
    run = work / f"{how}_{victim}"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()),
           "--module", "fastkd.cli", "train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}", f"run_dir={run}",
           "train.epochs=500", "train.eval_every=0", "train.eval_teacher=false", f"train.dist_timeout_s={timeout_s}"]
    proc = subprocess.Popen(cmd, cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, elapsed = "", None
    try:
        ranks = _rank_pids(proc.pid, 2)
        survivor = ranks[1 - victim]
        path = run / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (path.exists() and '"kind": "train"' in path.read_text()):
            time.sleep(0.2)
        os.kill(ranks[victim], getattr(signal, how))
        t0 = time.time()
        while not _gone(survivor) and time.time() - t0 < timeout_s + 120:
            time.sleep(0.1)
        survivor_s = time.time() - t0
        if wait_for_launcher:
            out, _ = proc.communicate(timeout=timeout_s + 120)
            elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # never leave a stopped process behind
            out += proc.communicate()[0]
    # Killed: the connection closes at once. Stopped: gloo gives up after dist_timeout_s; the survivor names
    # the rank (after up to 7 s for the others to report, bounded also when the stopped rank hosts the
    # store); the launcher then terminates a stopped rank (SIGKILL after its grace: SIGTERM waits).
    assert survivor_s < (timeout_s + SURVIVOR_MARGIN_S if how == "SIGSTOP" else 20), (survivor_s, out[-4000:])
    lines = _error_lines(out)
    assert len(lines) == 1 and f"rank {victim} failed first" in lines[0], out[-4000:]
    assert lines[0].startswith(f"fastkd: error{' [rank 1]' if victim == 0 else ''}: "), lines[0]
    assert "Traceback" not in out, out[-4000:]
    if wait_for_launcher:
        # The launcher exits with the status of the process it saw fail first: the survivor's 4 where the
        # victim was stopped, the victim's own where it was killed.
        assert proc.returncode == (4 if how == "SIGSTOP" else 256 - signal.SIGKILL), out[-4000:]
        assert elapsed < survivor_s + (LAUNCHER_GRACE_S + 10 if how == "SIGSTOP" else 10), (elapsed, out[-4000:])


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_group_that_does_not_form_at_start_up_is_one_line_and_exit_4(work, rank):
    """Rank 1 started without a rank 0 (none listens on MASTER_PORT), and rank 0 without the other rank:
    each gives up after dist_timeout_s with one line (no c10d retry logs, no traceback), status 4."""
    timeout_s = 3
    port = _port()
    env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    t0 = time.time()
    cmd = [sys.executable, "-m", "fastkd.cli", "train", TINY, f"teacher.checkpoint={work / 'teacher.pt'}",
           f"run_dir={work / f'alone_{rank}'}", f"train.dist_timeout_s={timeout_s}"]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 4, res.stderr[-3000:]
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "frame #" not in res.stderr, res.stderr[-3000:]
    if rank == 1:
        assert f"rank 1 of 2 cannot reach rank 0 at 127.0.0.1:{port} within train.dist_timeout_s=3 s" in lines[0]
    else:
        assert "the process group" in lines[0] and "did not form within train.dist_timeout_s=3 s" in lines[0]
    assert time.time() - t0 < 90
