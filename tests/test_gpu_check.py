"""`make gpu-check`: the dry run of benchmarks/gpu_check.py (the GPU command's code path on the CPU, under
TRITON_INTERPRET=1, with the GPU image's missing packages blocked), and the Triton tuning table."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from fastkd.ops import _tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The GPU image lacks these (KINDS.md): the GPU command must not import them.
_BLOCK = '''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("deepspeed", "ffcv"):
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU image)", name=name)
        return None
sys.meta_path.insert(0, _Absent())
'''


@pytest.mark.slow
def test_dry_run_writes_every_file(tmp_path):
    """The whole GPU command on the CPU: every part runs and passes its checks, every file is written,
    every target of every part is in the summary (measured, as the dry run measures all it can, or
    'not measured'), and the tuning file has the table's format."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(_BLOCK)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(block), REPO])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--dry-run",
                           "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["gpu_check.jsonl", "gpu_check.log", "summary.md", "tuning.json"]

    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    from benchmarks.gpu_parts import PARTS

    parts = {r["part"]: r["status"] for r in records if r["kind"] == "part"}
    assert parts == {p.name: "ok" for p in PARTS}
    checks = [r for r in records if r["kind"] == "check"]
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]]
    names = {c["name"] for c in checks}
    assert any(n.startswith("torch.compile(fullgraph) with the first call") for n in names)
    assert any("bit-equal" in n for n in names) and any("bit for bit" in n for n in names)
    assert {"MGD", "CT"} <= {n.split()[0] for n in names if "vs reference" in n}
    targets = {r["name"] for r in records if r["kind"] == "target"}
    assert any(t.startswith("MGD") for t in targets) and any(t.startswith("CT") for t in targets)
    assert any(t.startswith("step") for t in targets)
    tables = {r["table"] for r in records if r["kind"] == "row"}
    assert {"environment", "MGD kernels", "CT kernels", "training step", "detection step",
            "segmentation step"} <= tables
    seg_rows = {r["fields"].get("shape") for r in records if r["kind"] == "row" and r["table"] in ("MGD kernels", "CT kernels")}
    assert {"seg R101->R18", "seg R18->R101"} <= seg_rows  # the segmentation-shaped kernel rows
    for table in ("detection step", "segmentation step"):  # every variant of the dense steps has its row
        steps = {r["fields"].get("step") for r in records if r["kind"] == "row" and r["table"] == table}
        assert {"student", "kd-ref", "kd-auto"} <= steps and any(s.startswith("teacher fwd of") for s in steps), steps

    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for part in PARTS:
        for target in part.targets:
            assert f"| {target} |" in summary, target
    assert json.loads((out / "tuning.json").read_text())["devices"].keys() == {"interpreter"}


_FIRST_CALL_COMPILED = r"""
import torch
from fastkd.ops import ct_loss, mgd_loss
g = torch.Generator().manual_seed(0)
s, t = torch.randn(2, 8, 5, 6, generator=g), torch.randn(2, 8, 5, 6, generator=g)
w = [torch.randn(8, 8, 3, 3, generator=g) * 0.1, torch.zeros(8)] * 2
def f(s, seed):
    return (mgd_loss(s, t, *w, mask="spatial", ratio=0.5, seed=seed, backend="triton")
            + ct_loss(s, t, w[0][:, :, 1, 1], w[1], w[2][:, :, 1, 1], w[3], backend="triton"))
compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
assert torch.equal(compiled(s, 3), f(s, 3))
print("ok")
"""


def test_first_call_inside_compiled_region():
    """A fresh process whose first use of the Triton ops is inside torch.compile(fullgraph=True): nothing
    left to import there (importlib cannot be traced)."""
    env = dict(os.environ, PYTHONPATH=REPO, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_COMPILED], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_bad_arguments_exit_2(tmp_path):
    script = os.path.join(REPO, "benchmarks", "gpu_check.py")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, script, "--parts", "kernels,nope", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    proc = subprocess.run([sys.executable, script, "--merge-tuning", str(bad)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "bad.json" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ tuning table

@_tuning.autotune(configs=[triton.Config({"BLOCK": 4}), triton.Config({"BLOCK": 8})], key=["KEY"])
@triton.jit
def _probe(out_ptr, KEY, BLOCK: tl.constexpr):
    """Writes the BLOCK it was launched with: which config ran."""
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), BLOCK, tl.float32))


def _launch(key: int) -> int:
    out = torch.zeros(8)
    _probe[(1,)](out, key)
    return int(out[0].item())


def test_table_entry_decides_the_config(tmp_path, monkeypatch):
    """A table hit for this device and key is the only config run (nothing is timed); a miss in 'few'
    mode takes the first configs in order; the key is Triton's (key arguments, then tensor dtypes)."""
    table = tmp_path / "table.json"
    _tuning.merge_table(str(table), "interpreter", {"_probe": {"64,torch.float32": {
        "kwargs": {"BLOCK": 8}, "num_warps": 4, "num_stages": 3}}})
    monkeypatch.setenv("FASTKD_TRITON_TUNING", str(table))
    monkeypatch.setenv("FASTKD_TRITON_TUNE", "few")
    monkeypatch.setenv("FASTKD_TRITON_TUNE_FEW", "1")
    assert _launch(64) == 8  # from the table
    assert _launch(128) == 4  # not in the table: the first config
    chosen = _tuning.table_entries()["_probe"]
    assert chosen["64,torch.float32"]["kwargs"] == {"BLOCK": 8}
    assert chosen["128,torch.float32"]["kwargs"] == {"BLOCK": 4}


def test_modes_and_table_errors(tmp_path, monkeypatch):
    configs = [triton.Config({"BLOCK": b}) for b in (1, 2, 4)]
    prune = _tuning._Prune("k", ["x_ptr", "N"], ["N"], None)
    x = torch.zeros(1)
    table = tmp_path / "t.json"
    _tuning.merge_table(str(table), "interpreter", {"k": {"5,torch.float32": {"kwargs": {"BLOCK": 2},
                                                                              "num_warps": 4, "num_stages": 3},
                                                          "7,torch.float32": {"kwargs": {"BLOCK": 2},
                                                                              "num_warps": 2, "num_stages": 1}}})
    monkeypatch.setenv("FASTKD_TRITON_TUNING", str(table))
    # n = 7: the entry is no config the kernel ships (num_warps 2): ignored, as an unaudited config
    for mode, few, n, want in (("table", "2", 5, [2]), ("table", "2", 6, [1, 2, 4]), ("few", "2", 6, [1, 2]),
                               ("few", "2", 5, [2]), ("full", "2", 5, [1, 2, 4]), ("table", "2", 7, [1, 2, 4])):
        monkeypatch.setenv("FASTKD_TRITON_TUNE", mode)
        monkeypatch.setenv("FASTKD_TRITON_TUNE_FEW", few)
        assert [c.kwargs["BLOCK"] for c in prune(configs, {"x_ptr": x, "N": n})] == want, (mode, n)
    monkeypatch.setenv("FASTKD_TRITON_TUNE", "fast")
    with pytest.raises(ValueError, match="FASTKD_TRITON_TUNE='fast'"):
        prune(configs, {"x_ptr": x, "N": 5})
    monkeypatch.setenv("FASTKD_TRITON_TUNE", "table")
    broken = tmp_path / "broken.json"
    broken.write_text('{"devices": {"interpreter": {"k": {"5,torch.float32": {"kwargs": {}}}}}}')
    monkeypatch.setenv("FASTKD_TRITON_TUNING", str(broken))
    with pytest.raises(ValueError, match="broken.json: k"):
        prune(configs, {"x_ptr": x, "N": 5})


def test_checked_in_table_is_valid():
    with open(_tuning.TABLE_PATH) as f:
        devices = json.load(f)["devices"]
    for device, kernels in devices.items():
        for kernel, entries in kernels.items():
            for key, entry in entries.items():
                _tuning.config_from_dict(entry, f"{device}: {kernel}: {key}")


def test_make_gpu_check_prefers_the_project_environment(tmp_path):
    """`make gpu-check` runs with .venv/bin/python where the project's environment exists (a fresh CPU
    machine's python3 has no torch), python3 where it does not (the GPU image), PY when given."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    shutil.copy(os.path.join(REPO, "Makefile"), tmp_path / "Makefile")

    def python_of(*args, env=None):
        out = subprocess.run(["make", "-n", "gpu-check", *args], cwd=tmp_path, capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if k != "PY"}, **(env or {})}, check=True)
        (line,) = [x for x in out.stdout.splitlines() if "benchmarks/gpu_check.py" in x]
        return line.split("benchmarks/gpu_check.py")[0].split()[-1]

    assert python_of() == "python3"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").write_text("")
    assert python_of() == ".venv/bin/python"
    assert python_of("PY=/usr/bin/python3") == "/usr/bin/python3"
    assert python_of(env={"PY": "python3.12"}) == "python3.12"
