"""Shared timing, memory and reporting helpers for the benchmarks in this folder.

GPU: ``triton.testing.do_bench`` (median and 20/80 % quantiles, L2 flushed between runs).
CPU: repeated wall-clock runs, median and quantiles (machines are shared and noisy: report spread).
Every benchmark compares in one run: fused vs reference eager vs torch.compile(reference).
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# Dense peaks used for "fraction of peak" columns (vendor numbers, SXM parts).
PEAKS = {
    "H100": {"bf16_tflops": 989.0, "hbm_tbps": 3.35},
    "H200": {"bf16_tflops": 989.0, "hbm_tbps": 4.8},
}


def device_peaks(device: torch.device | str) -> Optional[dict]:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device, *, warmup: int = 3, rep: int = 10,
          min_time_s: float = 0.0) -> Dict[str, float]:
    """Time ``fn`` -> {"ms": median, "p20": ..., "p80": ...} in milliseconds."""
    if torch.device(device).type == "cuda":
        import triton.testing

        ms, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": ms, "p20": p20, "p80": p80}
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < rep or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "p20": q(0.2), "p80": q(0.8)}


def peak_memory_bytes(fn: Callable[[], object], device) -> Optional[int]:
    """Peak extra memory allocated while running ``fn`` once (beyond what was allocated before).

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation records replayed in
    order (every allocation and free by the ATen CPU allocator, temporaries inside an op included),
    which also sees the compiled extension's ATen tensors; memory that oneDNN/MKL allocate outside
    the ATen allocator is not seen.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Replay every allocation and free of the ATen CPU allocator in time order (kineto "[memory]"
    # records, one per allocation/free, including temporaries inside fused or compiled ops).
    records = _kineto_memory_records(prof)
    if records is None:
        # Older profilers: each event's own (self) allocations minus frees, replayed by start time;
        # temporaries allocated and freed inside one leaf op are missed.
        records = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                         if e.self_cpu_memory_usage)
    if not records:
        return None
    cur = peak = 0
    for _, delta in records:
        cur += delta
        peak = max(peak, cur)
    return peak


def _kineto_memory_records(prof):
    """[(time ns, +bytes allocated / -bytes freed)] sorted by time, or None if not exposed."""
    try:
        events = prof.profiler.kineto_results.events()
        return sorted((e.start_ns(), e.nbytes()) for e in events
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:
        return None


def environment(device) -> Dict[str, str]:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "-"
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} " \
                         f"(torch threads {torch.get_num_threads()})"
    return info


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


# Appended to a results file's notes when the run was on the CPU.
CPU_NOTE = (" CPU: Triton kernels run under TRITON_INTERPRET=1 (a functional smoke test, not a speed "
            "measurement); eager/compiled are the CPU reference.")


def results_path(name: str, device: torch.device | str, out: str) -> str:
    """Where a benchmark writes its table: ``out`` itself, or for ``out == "auto"``
    results/<name>_<device>.md beside this file (device: h100, h200, cpu, or the GPU's name as a slug)."""
    if out != "auto":
        return out
    if torch.device(device).type != "cuda":
        slug = "cpu"
    else:
        gpu = torch.cuda.get_device_name(device)
        slug = next((k.lower() for k in PEAKS if k in gpu), re.sub(r"\W+", "_", gpu).lower())
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}_{slug}.md")


def write_results(path: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                  env: Dict[str, str], command: str, notes: str = "") -> str:
    """Append one run's table (with device, date, versions and the command) to a results file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    text = f"\n## {title}\n\n{head}\n\nCommand: `{command}`\n\n{markdown_table(columns, rows)}\n"
    if notes:
        text += f"\n{notes}\n"
    with open(path, "a") as f:
        f.write(text)
    return text


def report_kernel_run(name: str, label: str, device, out: str, args, columns: Sequence[str],
                      rows: Sequence[Sequence[object]], env: Dict[str, str], notes: str) -> str:
    """Write a fused-loss benchmark's table (bench_ct / bench_mgd): file from ``results_path``, title from the
    dtype / layout / size flags in ``args``, the command as run, and the CPU note when on the CPU."""
    import sys

    if torch.device(device).type == "cpu":
        notes += CPU_NOTE
    title = f"{label} loss, {args.dtype}, {'NCHW' if args.nchw else 'channels_last'}{', tiny' if args.tiny else ''}"
    cmd = f"python benchmarks/bench_{name}.py " + " ".join(sys.argv[1:])
    return write_results(results_path(name, device, out), title, columns, rows, env, cmd, notes)
