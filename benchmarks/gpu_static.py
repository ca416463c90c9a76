"""`make gpu-static`: every launched Triton kernel compiled ahead of time for sm_80 and sm_90, on the CPU.

For each scenario (the fused losses' host functions, forward and backward, at the recipes' shapes, bf16 and
fp32, channels_last) the launches are captured as a GPU of that architecture would bind them
(benchmarks/aot.py), and every tile config the kernel's prune keeps there is compiled through Triton's real
pipeline: compile errors, register spills, shared memory over the architecture's limit, the tensor-core
instruction kind (wgmma / mma.sync), load pipelining (16-byte cp.async / narrower / TMA / synchronous) and
theoretical occupancy, with no GPU. Written: a Markdown table (one row per variant and architecture, the
problems, then one row per compile) and the JSON of every compile; exit status 1 if any compile fails,
spills or needs more shared memory than a block may have.

    python benchmarks/gpu_static.py                         # the audit with the installed Triton: writes
                                                            # benchmarks/results/gpu_static_triton3.8.md / .json
    python benchmarks/gpu_static.py --triton-path .cache/triton-3.6   # the GPU image's Triton 3.6, installed
                                                            # there by `make triton-3.6` (never into the venv)
    python benchmarks/gpu_static.py --arch 100 --out -      # sm_100 (Triton 3.8 builds it; not in the default
                                                            # audit: the channel-mask conv1 forward spills there)
    python benchmarks/gpu_static.py --check                 # the CI guard (tests/test_gpu_static.py)

`make gpu-static` runs the audit for both Triton versions. Compiled results are cached per compile input in
.cache/gpu_static/ (a rerun compiles only what changed). The JSON, one row per compile with its compile-input
key, is the audited table that ``--check`` holds the code to.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, the GPU's tile configs (before any kernel import)

from benchmarks import aot  # noqa: E402

ARCHS = (90, 80)
DTYPES = ("bf16", "fp32")
# name -> (op, shape): MGD (N, Cs, Ct, H, W, mask); CT (N, Cs, Ch, Ct, H, W). The recipes' shapes (METHODS.md,
# DENSE.md); the FPN level is one 64x64 level of batch 2 (the spatial-mask kernels; P3-P7 differ only in size).
SCENARIOS = {
    "MGD cls R34->R18": ("mgd", (256, 512, 512, 7, 7, "channel")),
    "MGD FPN 64x64": ("mgd", (2, 256, 256, 64, 64, "spatial")),
    "MGD cls R50->MBv1 (align)": ("mgd", (256, 1024, 2048, 7, 7, "channel")),
    "CT cls R50->MBv1": ("ct", (256, 1024, 2048, 2048, 7, 7)),
    "CT FPN 64x64": ("ct", (2, 256, 256, 256, 64, 64)),
}
CACHE = os.path.join(REPO, ".cache", "gpu_static")


def _run_mgd(shape, dtype):
    import torch

    from fastkd.ops import mgd_triton

    n, cs, ct, h, w, mask = shape
    e = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731  (contents never read: launches are recorded)
    s, t = (e(n, c, h, w).to(memory_format=torch.channels_last) for c in (cs, ct))
    w1, b1, w2, b2 = e(ct, ct, 3, 3), e(ct), e(ct, ct, 3, 3), e(ct)
    aw, ab = (e(ct, cs, 1, 1), e(ct)) if cs != ct else (None, None)
    _, a, hidden, dg = mgd_triton.mgd_forward(s, t, w1, b1, w2, b2, aw, ab, mask, 0.5, 1e-5, 1, 0, True)
    mgd_triton.mgd_backward(torch.ones(()), s, w1, w2, aw, a, hidden, dg, mask, 0.5, 1e-5, 1, 0,
                            [True, aw is not None, aw is not None, True, True, True, True])


def _run_ct(shape, dtype):
    import torch

    from fastkd.ops import ct_triton

    n, cs, ch, ct, h, w = shape
    e = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731
    s, t = (e(n, c, h, w).to(memory_format=torch.channels_last) for c in (cs, ct))
    w1, b1, w2, b2 = e(ch, cs, 1, 1), e(ch), e(ct, ch, 1, 1), e(ct)
    _, hidden, err, err_sum = ct_triton.ct_forward(s, t, w1, b1, w2, b2, 1e-5, "sum_over_batch", True)
    ct_triton.ct_backward(torch.ones(()), s, w1, w2, hidden, err, err_sum, 1e-5, "sum_over_batch", [True] * 5)


_KEEP = {0: "", 1: ", spatial mask", 2: ", channel mask"}


def role(kernel: str, c: dict) -> str:
    """What a launch is, in the maths of the op (METHODS.md), from the kernel and its constexprs."""
    if kernel == "_conv_fwd_kernel":
        if c["KSIZE"] == 1:
            return "MGD align fwd" if c["HAS_BIAS"] else "MGD align dgrad (dS)"
        return {1: "MGD conv1 fwd" + _KEEP[c["KEEP_IN"]], 2: "MGD conv2 fwd + MSE", 3: "MGD conv2 dgrad + ReLU gate",
                4: "MGD conv1 dgrad" + _KEEP[c["KEEP_OUT"]]}.get(c["EPILOGUE"], f"MGD conv epilogue {c['EPILOGUE']}")
    if kernel == "_conv_wgrad_kernel":
        return "MGD align wgrad" if c["KSIZE"] == 1 else ("MGD conv1 wgrad" + _KEEP[c["KEEP_IN"]] if c["KEEP_IN"]
                                                          else "MGD conv2 wgrad")
    if kernel == "_row_gemm_kernel":
        return {0: "CT gemm1 + ReLU", 1: "CT gemm2 + MSE", 2: "CT dP = E W2 + ReLU gate", 3: "CT dS = dP W1"}[c["EPI"]]
    if kernel == "_weight_grad_kernel":
        return "CT wgrad"
    return {"_sum_rows_kernel": "sum of partials (rows)", "_sum_all_kernel": "sum of partials (all)",
            "_keep_table_kernel": "MGD channel keep table"}.get(kernel, kernel)


def build_jobs(scenarios, archs, dtypes) -> List[Tuple[object, dict]]:
    """-> [(job, {scenarios, dtype, role})] deduplicated by compile input, in a stable order."""
    runs = {"mgd": _run_mgd, "ct": _run_ct}
    jobs: Dict[str, Tuple[object, dict]] = {}
    for arch in archs:
        for dtype in dtypes:
            for name in scenarios:
                op, shape = SCENARIOS[name]
                for launch in aot.capture(lambda: runs[op](shape, aot.device_dtype(dtype)), arch):
                    for config in aot.kept_configs(launch, arch):
                        job = aot.bind(launch, config, arch)
                        if job.key in jobs:
                            jobs[job.key][1]["scenarios"].append(name)
                        else:
                            jobs[job.key] = (job, {"scenarios": [name], "dtype": dtype,
                                                   "role": role(job.kernel, job.constexprs)})
    return list(jobs.values())


_JOBS: List[Tuple[object, dict]] = []  # the jobs of this run (forked workers inherit them)


def _compile_one(args) -> dict:
    index, cache_dir = args
    t0 = time.perf_counter()
    result = aot.compile_job(_JOBS[index][0], cache_dir)
    return {**result, "seconds": round(time.perf_counter() - t0, 2)}


def _config_text(cfg: dict) -> str:
    if not cfg:
        return "-"
    tile = "x".join(str(cfg[k]) for k in cfg if k.startswith("BLOCK"))
    return f"{tile} w{cfg['num_warps']} s{cfg['num_stages']}"


def audit(jobs, workers: int, cache_dir) -> List[dict]:
    """Compile ``jobs`` (from build_jobs) in ``workers`` processes -> one row per compile."""
    import triton

    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    _JOBS[:] = jobs
    todo = [(i, cache_dir) for i in range(len(_JOBS))]
    if workers > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("fork")  # children inherit the bound jobs; nothing runs on a GPU
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(_compile_one, todo, chunksize=1))
    else:
        results = [_compile_one(t) for t in todo]
    rows = []
    for (job, info), result in zip(_JOBS, results):
        rows.append({"kernel": job.kernel, "role": info["role"], "dtype": info["dtype"], "arch": job.arch,
                     "config": _config_text(job.config), "config_kwargs": job.config,
                     "channels": {k: v for k, v in job.constexprs.items() if k in ("CIN", "COUT", "K")},
                     "scenarios": info["scenarios"], "triton": triton.__version__, "key": job.key, **result,
                     "problems": aot.problems(result)})
    return rows


# What a fresh compile must reproduce of the audited table's row (check).
FACTS = ("regs", "spill_stores", "spill_loads", "shared", "mma", "cp_async_16", "cp_async_narrow", "tma", "ld_global")


def check(table_path: str, workers: int, budget: int) -> Tuple[List[str], str]:
    """The CI guard -> (failures, what was done). Every compile of the full audit (every scenario, both
    architectures, both dtypes, every shipped config) must be in the audited table with no problem; compiles
    not in it (a kernel, a config or the host code changed) are compiled now, up to ``budget`` of them; and a
    fresh compile of one config of every variant and architecture must reproduce the table's row (the table
    is this toolchain's output, not a stale or hand-edited file)."""
    jobs = build_jobs(list(SCENARIOS), ARCHS, DTYPES)
    try:
        with open(table_path) as f:
            table = {r["key"]: r for r in json.load(f)["rows"]}
    except (OSError, ValueError, KeyError) as exc:
        return [f"no audited table at {table_path} ({type(exc).__name__}: {exc}): run `make gpu-static`"], ""
    missing = [(j, i) for j, i in jobs if j.key not in table]
    failures = []
    if len(missing) > budget:
        failures.append(f"{len(missing)} of {len(jobs)} compiles are not in the audited table {table_path} (a kernel, "
                        f"a tile config or a launch changed: e.g. {missing[0][1]['role']} {missing[0][1]['dtype']} "
                        f"sm_{missing[0][0].arch}): run `make gpu-static` and commit the table")
        missing = []
    seen, sample = set(), []
    for job, info in jobs:  # one config (the preferred one, bf16) of every variant and architecture
        if job.key in table and (job.arch, info["role"]) not in seen:
            seen.add((job.arch, info["role"]))
            sample.append((job, info))
    rows = audit(missing + sample, workers, None)
    for row in rows[:len(missing)]:
        table[row["key"]] = row
    for row in rows[len(missing):]:
        audited = table[row["key"]]
        diff = [f"{k} {audited.get(k)} -> {row.get(k)}" for k in FACTS if audited.get(k) != row.get(k)]
        if row["problems"] or diff:
            failures.append(f"fresh compile of {row['role']} {row['dtype']} sm_{row['arch']} {row['config']}: "
                            + "; ".join(row["problems"] + (["differs from the audited table: " + ", ".join(diff)]
                                                           if diff else [])))
    for job, info in jobs:
        row = table.get(job.key)
        if row is not None and row["problems"]:
            failures.append(f"{info['role']} {info['dtype']} sm_{job.arch} {_config_text(job.config)}: "
                            + "; ".join(row["problems"]))
    done = (f"{len(jobs)} compiles bound, {len(jobs) - len(missing)} in the audited table, {len(missing)} compiled "
            f"now, {len(sample)} compiled fresh against the table")
    return failures, done


# -------------------------------------------------------------------------------------------- reporting

def _kb(b) -> str:
    return f"{b / 1024:.0f}"


def _loads(r: dict) -> str:
    parts = []
    if r["cp_async_16"]:
        parts.append(f"cp.async16 x{r['cp_async_16']}")
    if r["cp_async_narrow"]:
        parts.append(f"cp.async{'/'.join(str(b) for b in r['cp_async_narrow_bytes'])} x{r['cp_async_narrow']}")
    if r["tma"]:
        parts.append(f"TMA x{r['tma']}")
    if r["ld_global"]:
        parts.append("sync " + " ".join(f"{w}B x{n}" for w, n in r["ld_global_widths"].items()))
    return ", ".join(parts) or "-"


def summary_rows(rows: List[dict]) -> List[list]:
    """One row per (variant, dtype, architecture): configs compiled / clean, worst registers, spills and
    shared memory, the MMA kind, the main loop's loads of the largest config, occupancy range."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["role"], r["dtype"]), []).append(r)
    out = []
    for (arch, role_, dtype), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
        ok = [r for r in rs if not r.get("error")]
        clean = [r for r in ok if not r["problems"]]
        worst = max(ok, key=lambda r: (r["spill_stores"] + r["spill_loads"], r["shared"]), default=None)
        out.append([f"sm_{arch}", role_, dtype, f"{len(clean)}/{len(rs)}",
                    max((r["regs"] for r in ok), default="-"),
                    f"{worst['spill_stores']}/{worst['spill_loads']}" if worst else "-",
                    f"{_kb(max(r['shared'] for r in ok))}/{_kb(ok[0]['shared_limit'])}" if ok else "-",
                    "/".join(sorted({r["mma"] for r in ok})) or "-",
                    _loads(max(ok, key=lambda r: r["shared"])) if ok else "-",
                    f"{min(r['warps_per_sm'] for r in ok)}-{max(r['warps_per_sm'] for r in ok)}" if ok else "-"])
    return out


SUMMARY_COLUMNS = ["arch", "variant", "dtype", "clean/configs", "max regs", "worst spill st/ld B",
                   "max shared KB/limit", "mma", "loads (largest tile)", "warps/SM"]
DETAIL_COLUMNS = ["arch", "variant", "dtype", "config", "channels", "regs", "spill st/ld B", "shared KB",
                  "mma", "loads", "sass", "warps/SM", "problems"]


def detail_row(r: dict) -> list:
    if r.get("error"):
        return [f"sm_{r['arch']}", r["role"], r["dtype"], r["config"], _channels(r), "-", "-", "-", "-", "-", "-", "-",
                r["error"]]
    return [f"sm_{r['arch']}", r["role"], r["dtype"], r["config"], _channels(r), r["regs"],
            f"{r['spill_stores']}/{r['spill_loads']}", _kb(r["shared"]), r["mma"], _loads(r), r["sass"],
            r["warps_per_sm"], "; ".join(r["problems"]) or "ok"]


def _channels(r: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in r["channels"].items()) or "-"


def report(rows: List[dict], title: str, command: str) -> str:
    from benchmarks.common import markdown_table

    import triton

    bad = [r for r in rows if r["problems"]]
    head = (f"## {title}\n\ntriton {triton.__version__}, date {datetime.date.today().isoformat()}, "
            f"compiled on the CPU (no GPU)\n\nCommand: `{command}`\n\n"
            f"{len(rows)} compiles, {len({(r['arch'], r['role'], r['dtype']) for r in rows})} variants x "
            f"architectures: {sum(1 for r in rows if r.get('error'))} compile errors, "
            f"{sum(1 for r in rows if not r.get('error') and (r['spill_stores'] or r['spill_loads']))} spilling, "
            f"{sum(1 for r in rows if not r.get('error') and r['shared'] > r['shared_limit'])} over the shared-memory "
            f"limit.\n")
    text = [head, markdown_table(SUMMARY_COLUMNS, summary_rows(rows))]
    if bad:
        text += ["\n### Problems\n", markdown_table(DETAIL_COLUMNS, [detail_row(r) for r in bad])]
    text += ["\n### Every compile\n", markdown_table(DETAIL_COLUMNS, [detail_row(r) for r in rows])]
    return "\n".join(text) + "\n"


# -------------------------------------------------------------------------------------------------- main

def _other_triton(path: str, argv: List[str]) -> int:
    """Run this audit in a subprocess whose Triton is the one installed in ``path`` (first on the path)."""
    if not os.path.isdir(os.path.join(path, "triton")):
        print(f"gpu_static: no triton in {path}: install it with `make triton-3.6`", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(path), REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env).returncode


def table_path(out: str, version: str) -> str:
    """OUT_tritonX.Y (+ .md / .json): one audited table per Triton version."""
    return f"{out}_triton{'.'.join(version.split('.')[:2])}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=",".join(str(a) for a in ARCHS), help="compute capabilities (default 90,80)")
    p.add_argument("--dtype", default=",".join(DTYPES))
    p.add_argument("--scenario", action="append", help="only these scenarios (repeatable)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-cache", action="store_true", help=f"compile everything (no results cache in {CACHE})")
    p.add_argument("--triton-path", help="run with the Triton installed in this folder (e.g. .cache/triton-3.6)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "gpu_static"),
                   help="write OUT_tritonX.Y.md / .json (default benchmarks/results/gpu_static; '-' for none)")
    p.add_argument("--check", action="store_true", help="the CI guard against the audited table (see check())")
    p.add_argument("--budget", type=int, default=24, help="--check: most compiles missing from the table to do now")
    args = p.parse_args(argv)
    if args.triton_path:
        i = argv.index("--triton-path")
        return _other_triton(args.triton_path, argv[:i] + argv[i + 2:])
    import triton

    t0 = time.monotonic()
    if args.check:
        failures, done = check(table_path(args.out, triton.__version__) + ".json", args.workers, args.budget)
        print(f"gpu_static --check (triton {triton.__version__}): {done} in {time.monotonic() - t0:.0f} s")
        for failure in failures:
            print(f"  FAIL {failure}")
        return 1 if failures else 0
    try:
        archs = [int(a) for a in args.arch.split(",")]
        dtypes = args.dtype.split(",")
        scenarios = args.scenario or list(SCENARIOS)
        unknown = [s for s in scenarios if s not in SCENARIOS] + [d for d in dtypes if d not in DTYPES + ("fp16",)]
        if unknown:
            raise ValueError(f"unknown scenario or dtype: {', '.join(unknown)} (scenarios: {', '.join(SCENARIOS)})")
    except ValueError as exc:
        print(f"gpu_static: {exc}", file=sys.stderr)
        return 2
    cache = None if args.no_cache else os.path.join(CACHE, f"{triton.__version__}-facts{aot.FACTS_VERSION}")
    rows = audit(build_jobs(scenarios, archs, dtypes), args.workers, cache)
    seconds = time.monotonic() - t0
    title = f"Triton {triton.__version__}: {', '.join(f'sm_{a}' for a in archs)}"
    where = os.path.dirname(os.path.dirname(os.path.abspath(triton.__file__)))
    other = f" --triton-path {os.path.relpath(where, REPO)}" if where.startswith(REPO + os.sep) else ""
    text = report(rows, title, " ".join(["python benchmarks/gpu_static.py" + other] + argv))
    print(text.split("\n### Every compile")[0])
    cached = sum(1 for r in rows if r.pop("cached", False))
    print(f"gpu_static: {len(rows)} compiles ({cached} of them from the cache {cache}) in {seconds:.0f} s "
          f"({args.workers} workers)")
    if args.out != "-":
        path = table_path(args.out, triton.__version__)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".md", "w") as f:
            f.write(f"# Ahead-of-time compilation audit\n\n{__doc__.split(chr(10) + chr(10))[1]}\n\n{text}")
        with open(path + ".json", "w") as f:  # one row a line: the audited table tests/test_gpu_static.py reads
            f.write('{"triton": "%s", "rows": [\n' % triton.__version__)
            f.write(",\n".join(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
                                for r in rows) + "\n]}\n")
        print(f"gpu_static: wrote {path}.md / .json")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
