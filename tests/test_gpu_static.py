"""The Triton kernels compiled ahead of time for sm_80 and sm_90 on the CPU (benchmarks/gpu_static.py).

The guard: every launch the host code makes, with every tile config shipped for each architecture, is in the
audited table (benchmarks/results/gpu_static_triton*.json, written by `make gpu-static`) without a compile error,
a spill or a shared-memory overflow, and a fresh compile of one config of every variant reproduces the table,
for the project's Triton and for the GPU image's Triton 3.6 (installed by `make triton-3.6`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_static.py")
TRITON_36 = os.path.join(REPO, ".cache", "triton-3.6")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler
    env["PYTHONPATH"] = REPO
    return env


@pytest.mark.parametrize("version", ["project", "3.6"])
def test_every_shipped_config_compiles_clean(version):
    if version == "3.6" and not os.path.isdir(os.path.join(TRITON_36, "triton")):
        pytest.skip("the GPU image's Triton 3.6 is not installed: `make triton-3.6` installs it into .cache/triton-3.6")
    cmd = [sys.executable, SCRIPT, "--check"] + (["--triton-path", TRITON_36] if version == "3.6" else [])
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "compiled fresh against the table" in proc.stdout


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_launches_are_bound_as_on_the_gpu():
    """The captured launches are the host code's own, bound as on an H100: TF32 for float32, the pixel split
    of the weight gradients from 132 SMs, the tile configs shipped for sm_90 (not the interpreter's)."""
    out = json.loads(_run(r"""
import json, torch
from benchmarks import aot, gpu_static
from fastkd.ops import mgd_triton
launches = aot.capture(lambda: gpu_static._run_mgd((2, 256, 256, 64, 64, "spatial"), torch.float32), 90)
conv = [l for l in launches if l.kernel == "_conv_fwd_kernel"]
wgrad = [l for l in launches if l.kernel == "_conv_wgrad_kernel"]
kept = aot.kept_configs(conv[0], 90)
print(json.dumps({"prec": sorted({l.kwargs["DOT_PREC"] for l in conv + wgrad}),
                  "kernels": [l.kernel for l in launches], "p_chunk": [l.args[9] for l in wgrad],
                  "block_k": sorted({c.kwargs["BLOCK_K"] for c in kept}),
                  "untouched": type(mgd_triton._conv_fwd_kernel).__name__}))
"""))
    assert out["prec"] == ["tf32"]
    assert out["kernels"].count("_conv_fwd_kernel") == 4 and out["kernels"].count("_conv_wgrad_kernel") == 2
    # 8192 pixels, 2 * 132 programs over 9 taps x 2 x 2 channel tiles: 8 splits of 1024 pixels (the CPU's
    # parallel target, 16, would make one split of 8192)
    assert out["p_chunk"] == [1024, 1024]
    assert out["block_k"] == [32]  # float32 takes the 16-bit tiles with half the reduction step
    assert out["untouched"] == "Autotuner"  # the kernels are restored after the capture


def test_guard_sees_a_spill_and_a_shared_memory_overflow():
    """A config the tables dropped, compiled for sm_90: a 4-warp 128x128 tile over the weight gradient spills,
    a 3-stage 128x256x64 float32 tile needs more than 227 KB of shared memory."""
    out = json.loads(_run(r"""
import json, torch, triton
from benchmarks import aot, gpu_static
launches = aot.capture(lambda: gpu_static._run_mgd((2, 256, 256, 64, 64, "spatial"), torch.float32), 90)
wgrad = next(l for l in launches if l.kernel == "_conv_wgrad_kernel")
conv = next(l for l in launches if l.kernel == "_conv_fwd_kernel")
spill = aot.compile_job(aot.bind(wgrad, triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4,
                                                      num_stages=4), 90), None)
big = aot.compile_job(aot.bind(conv, triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8},
                                                   num_warps=8, num_stages=3), 90), None)
print(json.dumps([aot.problems(spill), aot.problems(big), big["shared"], big["mma"]]))
"""))
    spill, big, shared, mma = out
    assert spill and spill[0].startswith("spills"), spill
    assert any(p.startswith("shared memory") for p in big) and shared > 227 * 1024, big
    assert mma == "wgmma"


def test_audited_tables_cover_both_architectures_pipelined():
    """The committed tables: both architectures, every row clean, and 16-bit operands reach shared memory as
    16-byte cp.async (the channel mask is applied after the load, so its input is no 2-byte load)."""
    for name in ("gpu_static_triton3.8.json", "gpu_static_triton3.6.json"):
        with open(os.path.join(REPO, "benchmarks", "results", name)) as f:
            rows = json.load(f)["rows"]
        assert {r["arch"] for r in rows} == {80, 90}, name
        assert not [r for r in rows if r["problems"]], name
        for r in rows:
            if r["dtype"] == "bf16" and r["mma"] != "none":
                assert r["cp_async_16"] > 0 and r["cp_async_narrow"] == 0, (name, r["role"], r["config"])
                assert r["ld_global_widths"].get("2", 0) <= 1, (name, r["role"], r["config"])  # (a bias)
        assert {r["mma"] for r in rows if r["arch"] == 90} >= {"wgmma"}
        assert {r["mma"] for r in rows if r["arch"] == 80} >= {"mma.sync"}
