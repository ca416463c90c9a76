"""What choosing a backend costs per loss call on the CPU: ``dispatch.select`` for ``backend="auto"`` in steady
state (the memo on the call's exact signature), for ``auto`` without the memo (the bucket key and the agreed
decision, the path every call took before the memo), for a named backend, and building the bucket key alone.

Inputs: the MGD mid case of ``bench_cpu.py`` (N=32, C=64, 14x14, spatial mask), the decision taken first by a
real trial. Median of ``--rounds`` loops of ``--calls`` calls each, microseconds per call.

    python benchmarks/bench_dispatch.py --out benchmarks/results/cpu.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, write_results  # noqa: E402
from fastkd import ops  # noqa: E402
from fastkd.ops import _auto, dispatch  # noqa: E402


def mid_inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(32, 64, 14, 14, generator=g, requires_grad=True)
    t = torch.randn(32, 64, 14, 14, generator=g)
    w1, w2 = [(torch.randn(64, 64, 3, 3, generator=g) * 0.05).requires_grad_() for _ in range(2)]
    b1, b2 = [torch.zeros(64, requires_grad=True) for _ in range(2)]
    inputs = dict(student=s, teacher=t, gen_w1=w1, align_w=None, mask="spatial")
    args = dict(student=s, teacher=t, gen_w1=w1, gen_b1=b1, gen_w2=w2, gen_b2=b2, align_w=None, align_b=None,
                mask="spatial", ratio=0.65, alpha=1e-3, seed=0, sample_offset=0)
    return inputs, args


def per_call_us(fn, calls: int, rounds: int) -> float:
    fn()
    loops = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(loops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    os.environ["FASTKD_AUTO_TRIAL"] = "1"
    cache = tempfile.TemporaryDirectory(prefix="fastkd-dispatch-cache-")
    os.environ["FASTKD_CACHE_DIR"] = cache.name
    inputs, call_args = mid_inputs()
    run = ops._run_mgd
    ops.mgd_loss(*[call_args[k] for k in ("student", "teacher", "gen_w1", "gen_b1", "gen_w2", "gen_b2")],
                 mask="spatial", ratio=0.65, alpha=1e-3, seed=0)  # the trial: the bucket's decision
    choice = ops.explain("mgd_loss", "cpu", **inputs).choice

    def auto_steady():
        dispatch.select("mgd_loss", "auto", "cpu", inputs, run, call_args)

    def auto_no_memo():
        _auto._memo.clear()
        dispatch.select("mgd_loss", "auto", "cpu", inputs, run, call_args)

    def named():
        dispatch.select("mgd_loss", choice, "cpu", inputs, run, call_args)

    def bucket_key():
        _auto.bucket_key("mgd_loss", "cpu", inputs)

    rows = []
    for label, fn in (("auto, steady state (memo)", auto_steady), ("auto without the memo", auto_no_memo),
                      (f"named backend ({choice})", named), ("bucket key alone", bucket_key)):
        us = per_call_us(fn, args.calls, args.rounds)
        rows.append([label, f"{us:.1f}"])
        print(f"{label}: {us:.1f} us", flush=True)
    if args.out:
        env = environment("cpu")
        model, vector = _auto._cpu_model()
        env["device"] = f"CPU {model} [{' '.join(vector)}] x{os.cpu_count()}"
        env["load avg (1 min)"] = f"{os.getloadavg()[0]:.1f}"
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
        write_results(args.out, "CPU: the cost of choosing a backend per loss call (dispatch.select)",
                      ["path", "us per call"], rows, env,
                      "python benchmarks/bench_dispatch.py " + " ".join(sys.argv[1:]),
                      "MGD mid inputs (N=32, C=64, 14x14); median of the loops' per-call means.")


if __name__ == "__main__":
    main()
