"""Every GPU claim of the project checked in one prepared command (`make gpu-check`): environment,
correctness at real shapes, kernel benchmarks, training-step benchmark, then a summary of every target.

Each part (benchmarks/gpu_parts.py, PARTS) runs in its own process under its own time limit and records
its rows as it goes, so a part that is stopped loses nothing of the parts before it, nor the rows it had
finished. Written to --out (default: $OUT, the folder that comes back from the GPU machine):

    gpu_check.jsonl   every record, one JSON object a line (rows, checks, targets, part status)
    summary.md        part status, every target met / MISSED / not measured with its figure, every table
                      (rewritten after each part)
    gpu_check.log     the parts' output
    tuning.json       the Triton configs the kernels part chose, per kernel and key (a tuning table:
                      --merge-tuning adds it to fastkd/ops/triton_tuning.json)

Each part's process gets a fresh Triton cache shared by the parts of this run only (compiled kernels are
reused from part to part; autotuning results are not cached on disk: FASTKD_TRITON_TUNE_CACHE=0, so no
timing taken elsewhere decides a config here). Without CUDA (or with --dry-run) it is a dry run: the
kernels under TRITON_INTERPRET=1, tiny shapes, the same code path and the same files.

Time budget on an H100/H200 (an estimate until the first run's summary gives each part's seconds; assumed:
process start 5 s, one Triton 3.6 compile 1-2 s, Inductor on a reference loss 10-20 s a shape, do_bench 0.13 s):
    environment   ~8 s     start, 8192^3 bf16 matmul and 1 GiB copy (3 runs each)                 limit  15 s
    correctness   60-90 s  13 compiles in process (first call inside torch.compile), then 10 checks
                           in 8 processes, ~60 compiles of one config each, nothing timed             limit 115 s
    kernels      130-230 s 6 shapes x 3 impls; ~45 compiles (2 configs a key; the first comes from
                           correctness's cache), autotune timing ~15 s, Inductor ~6 x 15 s, timing ~15 s  limit 160 s
    step         120-180 s 2 recipes: Inductor on student+losses and on the teacher ~40-70 s each,
                           ~20 compiles, 6 timed steps and 4 teacher forwards a recipe              limit 130 s
  second window (not run by default; --parts environment,detection,segmentation,seg-kernels:
  15 + 230 + 170 + 120 = 535 s, a window of its own):
    detection    150-250 s RetinaNet-R50 <- X101-64x4d, 1333x800, batch 2: Inductor on the student's dense part
                           (backbone+FPN+head, forward+backward) ~60-90 s and on the X101 backbone+FPN ~40-60 s,
                           the MGD kernels at the 5 FPN shapes (~10 compiles, auto's trial), 4 steps, 3 teacher
                           forwards and 3 loss-only runs timed (do_bench, the steps ~0.1-0.4 s each)  limit 230 s
    segmentation 100-160 s PSPNet-R18 <- R101, 512x512, batch 8: Inductor on student+losses ~40-60 s and on the
                           teacher ~30-40 s, MGD kernels at [8,512,64,64], 4 steps + 6 single parts timed  limit 170 s
    seg-kernels   60-100 s fused MGD [8,512>2048,64x128] and CT [8,512>2048>2048,64x128] vs eager and compiled
                           references: 2 Inductor compiles, ~10 Triton compiles, 5 repetitions     limit 120 s
  Each variant's rows are recorded as soon as it is timed; kd-fused (the compiles) comes last.
If a part stops at its limit, give it a window of its own: --parts environment,correctness,kernels first,
then --parts step --limit-scale 2 (each window starts a fresh machine: 1-2 minutes of the device time).

    python benchmarks/gpu_check.py                        # on the GPU machine, writes to $OUT
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc
    python benchmarks/gpu_check.py --parts step --limit-scale 2   # a subset (e.g. a second window)
    python benchmarks/gpu_check.py --parts environment,detection,segmentation,seg-kernels  # the second window
    python benchmarks/gpu_check.py --merge-tuning results/tuning.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.gpu_records import RECORDS, Context, read_records  # noqa: E402

SUMMARY, LOG = "summary.md", "gpu_check.log"


# ----------------------------------------------------------------------------------------------- summary

def _table(columns: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in r) + " |" for r in rows])


def summary_text(records: List[dict], parts, dry: bool) -> str:
    status = {r["part"]: r for r in records if r["kind"] == "part"}
    env = {r["fields"]["item"]: r["fields"]["value"] for r in records
           if r["kind"] == "row" and r["table"] == "environment"}
    dry_note = " (DRY RUN on the CPU: Triton interpreter, tiny shapes; figures mean nothing)" if dry else ""
    out = ["# GPU check" + dry_note,
           "", ", ".join(f"{k} {env[k]}" for k in ("device", "date", "torch", "triton", "cuda") if k in env), "",
           "## Parts", "", _table(["part", "status", "seconds", "limit s"], [
               [p.name, status.get(p.name, {}).get("status", "not run"), status.get(p.name, {}).get("seconds", "-"),
                status.get(p.name, {}).get("limit_s", "-")] for p in parts])]
    measured = {r["name"]: r for r in records if r["kind"] == "target"}
    names = [t for p in parts for t in p.targets] + [n for n in measured if n not in
                                                    {t for p in parts for t in p.targets}]
    if names:
        rows = [[n, ("met" if measured[n]["met"] else "**MISSED**") if n in measured else "not measured",
                 measured[n]["figure"] if n in measured else "-"] for n in names]
        out += ["", "## Targets", "", _table(["target", "result", "figure"], rows)]
    checks = [r for r in records if r["kind"] == "check"]
    if checks:
        out += ["", "## Checks", "", _table(["part", "check", "result", "detail"], [
            [c["part"], c["name"], "ok" if c["ok"] else "**FAILED**", c["detail"]] for c in checks])]
    tables: Dict[str, List[dict]] = {}
    for r in records:
        if r["kind"] == "row" and r["table"] != "environment":
            tables.setdefault(r["table"], []).append(r["fields"])
    for name, rows in tables.items():
        cols = list(dict.fromkeys(k for row in rows for k in row))
        out += ["", f"## {name}", "", _table(cols, [[row.get(c, "") for c in cols] for row in rows])]
    if env:
        out += ["", "## Environment", "", _table(["item", "value"], [[k, v] for k, v in env.items()])]
    return "\n".join(out) + "\n"


def write_summary(out: str, parts, dry: bool) -> None:
    from fastkd.atomic import atomic_write

    with atomic_write(os.path.join(out, SUMMARY)) as f:
        f.write(summary_text(read_records(out), parts, dry))


# ---------------------------------------------------------------------------------------------- running

def _child_env(dry: bool, scratch: str, part) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=os.path.join(scratch, "triton"),
               TORCHINDUCTOR_CACHE_DIR=os.path.join(scratch, "inductor"), FASTKD_TRITON_TUNE_CACHE="0",
               TRITON_CACHE_AUTOTUNING="0")
    if dry:
        env["TRITON_INTERPRET"] = "1"
    env.update(part.env)
    return env


def _pump(stream, log) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


def run_part(part, out: str, dry: bool, scratch: str, scale: float = 1.0) -> dict:
    """Run one part in its own process group under its limit (times ``scale``); -> its status record."""
    limit = round((part.dry_limit_s if dry else part.limit_s) * scale, 1)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part.name, "--out", out]
    cmd += ["--dry-run"] if dry else []
    t0 = time.monotonic()
    with open(os.path.join(out, LOG), "a") as log:
        log.write(f"==== part {part.name} (limit {limit} s)\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=_child_env(dry, scratch, part), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=REPO)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
        pump.start()
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group
            proc.wait()
            status = f"stopped at its limit ({limit} s)"
        pump.join(timeout=10)
    return {"part": part.name, "kind": "part", "status": status, "seconds": round(time.monotonic() - t0, 1),
            "limit_s": limit}


def run_all(parts, out: str, dry: bool, scale: float = 1.0) -> int:
    os.makedirs(out, exist_ok=True)
    for name in (RECORDS, SUMMARY, LOG, "tuning.json"):  # this run's files only
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    scratch = tempfile.mkdtemp(prefix="fastkd-gpu-check-")
    try:
        write_summary(out, parts, dry)
        for part in parts:
            print(f"==== {part.name}", flush=True)
            record = run_part(part, out, dry, scratch, scale)
            with open(os.path.join(out, RECORDS), "a") as f:
                f.write(json.dumps(record) + "\n")
            write_summary(out, parts, dry)
            print(f"==== {part.name}: {record['status']} in {record['seconds']} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    records = read_records(out)
    print("\n" + summary_text(records, parts, dry).split("\n## Checks")[0])
    bad_parts = [r["part"] for r in records if r["kind"] == "part" and r["status"] != "ok"]
    bad_checks = [r["name"] for r in records if r["kind"] == "check" and not r["ok"]]
    if bad_parts or bad_checks:
        print(f"gpu_check: parts not ok: {bad_parts or 'none'}; failed checks: {bad_checks or 'none'}")
        return 1
    return 0


def run_child(name: str, out: str, dry: bool) -> int:
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    from benchmarks.gpu_parts import PARTS

    part = next(p for p in PARTS if p.name == name)
    part.run(Context(out, name, dry))
    return 0


def merge_tuning(path: str) -> int:
    """Add a run's tuning.json to the checked-in table."""
    from fastkd.ops import _tuning

    try:
        with open(path) as f:
            devices = json.load(f)["devices"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"gpu_check: --merge-tuning {path}: not a tuning file ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    for device, entries in devices.items():
        _tuning.merge_table(_tuning.TABLE_PATH, device, entries)
        print(f"merged {sum(len(v) for v in entries.values())} entries for {device} into {_tuning.TABLE_PATH}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    p.add_argument("--parts", default=None, help="comma-separated part names to run (default: all, in order)")
    p.add_argument("--dry-run", action="store_true", help="the CPU dry run (automatic without CUDA)")
    p.add_argument("--limit-scale", type=float, default=1.0,
                   help="multiply every part's time limit (e.g. 2 for a window that runs fewer parts)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--merge-tuning", metavar="FILE", help="add a run's tuning.json to fastkd/ops/triton_tuning.json")
    args = p.parse_args(argv)
    if args.merge_tuning:
        return merge_tuning(args.merge_tuning)
    if not args.out:
        print("gpu_check: no results folder: give --out DIR (or set OUT)", file=sys.stderr)
        return 2
    from benchmarks.gpu_parts import PARTS, WINDOW_2

    names = [p.name for p in PARTS]
    dry = args.dry_run
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device: dry run (Triton interpreter, tiny shapes)", flush=True)
            dry = True
    # by default the first window's parts (the dry run: every part); the second window names its parts
    default = names if dry else [p.name for p in PARTS if p.window == 1]
    wanted = default if not args.parts else [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        print(f"gpu_check: --parts: unknown part(s) {', '.join(unknown)} (known: {', '.join(names)})", file=sys.stderr)
        return 2
    if not args.parts and not dry:
        print(f"gpu_check: the first window's parts; the second window: --parts {','.join(WINDOW_2)}", flush=True)
    out = os.path.abspath(args.out)
    if args.part:
        os.makedirs(out, exist_ok=True)
        return run_child(args.part, out, dry)
    if not args.limit_scale > 0:
        print(f"gpu_check: --limit-scale {args.limit_scale}: expected a positive number", file=sys.stderr)
        return 2
    return run_all([p for p in PARTS if p.name in wanted], out, dry, args.limit_scale)


if __name__ == "__main__":
    sys.exit(main())
