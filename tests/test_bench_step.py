"""benchmarks/bench_step.py keeps working: its CPU smoke mode, shrunk further (timings are not checked)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_bench_step_smoke(tmp_path):
    out = tmp_path / "step.md"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_step.py"), "--device", "cpu",
                          "--tiny", "--size", "32", "--recipes", "r50_mbv1_ct", "--no-compile", "--warmup", "1",
                          "--rep", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    for row in ("| r50_mbv1_ct | student |", "| r50_mbv1_ct | kd-ref |", "| r50_mbv1_ct | kd-fused-eager |",
                "teacher fwd of kd-ref (eager)"):
        assert row in text
    assert "target >= 1.2x" in res.stdout
