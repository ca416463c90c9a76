"""Pieces the demos share (``fastkd.demos.classification``, ``.detection``, ``.segmentation``).

- :func:`select_device`: hide or require GPUs before torch initialises CUDA, and pick DeepSpeed's accelerator;
- :func:`machine_name` / :func:`machine`: the CPU (cores) or the GPU, for result tables (``machine`` adds
  the load average);
- :func:`hide_numba_finalizer_noise`: an ``unraisablehook`` for the harmless numba finalizer KeyError;
- :func:`run`: ``main`` then leave the process group;
- :func:`replace_run_dir`: a demo always starts a run over (``resume: auto`` would pick up an old one);
- :func:`median_rate`: the median training throughput of a run's metrics rows, start-up window left out;
- :func:`threads`: a context manager setting torch's intra-op threads for the runs and restoring them;
- :func:`finished_run`: what every demo's table reads from a finished run directory;
- :func:`earlier_run`: a finished earlier run for the table (an unfinished one left out with a note);
- :func:`write_report`: ``results.md`` / ``results.json`` in the output directory, and the printed report;
- :func:`demo_parser`: the options every demo takes (overrides, per-side overrides, out, device, only, configs,
  seeds);
- seeds: :func:`seed_plan` (the teacher once, then every student per seed), :func:`seed_run_dir`
  (``OUT/<name>``, ``OUT/<name>_seed<k>``), :func:`seeded` (the k-th further seed of a config), :func:`run_plan`
  (train the plan, earlier runs for the rest), :func:`group`, :func:`seed_mean` / :func:`seed_spread`,
  :func:`verdict` (every method above the baseline by more than the seed spread?), the table's cells
  (:func:`seed_cells`, :func:`run_cells`, :func:`markdown_table`) and :func:`draw_compare` (``compare.png``),
  each for the metric key a demo names (and its scale: box AP is stored as a fraction and shown x100).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple


def select_device(choice: str) -> Optional[str]:
    """``choice`` auto | cpu | cuda; returns an error message, or None when the choice can be honoured."""
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if choice == "cuda" else "cpu")
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        return "--device cuda but no CUDA device is visible"
    if choice != "cuda" and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return None


def machine_name() -> str:
    """``<CPU model>, N cores, no GPU`` or ``<GPU name> GPU``."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def machine() -> str:
    """:func:`machine_name` with the load average at the end (1/5/15 min)."""
    import torch

    name = machine_name()
    return name if torch.cuda.is_available() else f"{name} (load average at the end {load_average()})"


def hide_numba_finalizer_noise(unraisable) -> None:
    """FFCV loaders compile their pipelines with numba; freeing a finished run's loaders can make numba's
    dispatcher finalizer raise a harmless KeyError that Python prints as "Exception ignored in ...".
    Hide exactly that one (innermost frame in numba/core/dispatcher.py); report everything else."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    if isinstance(unraisable.exc_value, KeyError) and where.endswith(os.path.join("numba", "core", "dispatcher.py")):
        return
    sys.__unraisablehook__(unraisable)


def run(main: Callable[[], int]) -> int:
    """``python -m fastkd.demos.*``: ``main()``, then leave the process group (DeepSpeed keeps it between runs).
    A run whose loss became non-finite ends the demo with the trainer's one-line message and exit status 3
    (as ``fastkd train``), not a traceback."""
    from ..engine.dist import teardown
    from ..errors import EXIT_NONFINITE, NonFiniteLossError

    try:
        return main()
    except NonFiniteLossError as exc:
        print(f"fastkd demo: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    finally:
        teardown()


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as ``a/b/c`` (``?`` where the platform has none)."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def replace_run_dir(run_dir: str) -> None:
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)


def median_rate(train_rows: List[Dict[str, object]]) -> float:
    """Median ``images_per_s`` of the training rows; the first window (start-up) is left out when there are more."""
    rates = [r["images_per_s"] for r in train_rows[1:] or train_rows]
    return statistics.median(rates) if rates else float("nan")


@contextlib.contextmanager
def threads(count: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (None: left alone) inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def demo_parser(prog: str, description: str, *, runs: Sequence[str], out: str,
                config_dir: str) -> argparse.ArgumentParser:
    """The options every demo takes: ``KEY=VALUE`` overrides for all runs, ``--teacher`` / ``--students`` for one
    side, ``--out``, ``--device``, ``--only`` (one of ``runs``), ``--config-dir``; each demo adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for all runs")
    p.add_argument("--teacher", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for the teacher run")
    p.add_argument("--students", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for the student runs")
    p.add_argument("--out", default=out, help=f"parent of the run directories and the results (default {out})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu hides GPUs; cuda requires one (default: a GPU when there is one)")
    p.add_argument("--only", nargs="+", choices=tuple(runs), default=None,
                   help="run only these; the table also shows earlier runs found in their run directories")
    p.add_argument("--config-dir", default=config_dir, help="where teacher.yaml, baseline.yaml, ... are")
    p.add_argument("--seeds", type=_positive, default=1, metavar="N",
                   help="train every student for N seeds (the config's seed, +1, ...; same teacher); the table "
                        "shows the mean and the min-max spread")
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def finished_run(name: str, run_dir: str, metric: str, wall: Optional[float] = None) -> Tuple[dict, dict, dict]:
    """``(summary, last evaluation row, config)`` of a finished run: the summary holds what every demo's table
    shows (name, model, steps, images, images/s, wall s, run dir, the alphas ``alpha: auto`` chose); the wall
    time is the span of the metrics log unless given. A run without an evaluation that has ``metric`` did not
    finish: a ConfigError naming the file."""
    from ..config import ConfigError
    from ..engine.metrics import read_metrics

    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise ConfigError(f"no finished {name} run in {run_dir}")
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r.get("kind") == "eval" and metric in r]
    if not evals:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no evaluation ({metric}): the {name} run did not finish")
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    last = evals[-1]
    summary = {"name": name, "model": cfg["student"]["name"], "steps": last["step"],
               "images": last["step"] * cfg["train"]["batch_size"],
               "images_per_s": median_rate([r for r in rows if r.get("kind") == "train"]),
               "wall_s": wall if wall is not None else rows[-1]["time"] - rows[0]["time"], "run_dir": run_dir,
               "alphas": {k[len("alpha/"):]: v for r in rows if r.get("kind") == "calibration"
                          for k, v in r.items() if k.startswith("alpha/")}}
    return summary, last, cfg


def earlier_run(summarize: Callable[[str, str], dict], name: str, path: str) -> Optional[dict]:
    """``summarize(name, path)`` of a finished earlier run, for the table; None when there is none, and for an
    unfinished one (interrupted, or still running in another process), with a note, instead of ending the demo
    after the runs it trained."""
    from ..config import ConfigError

    if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return None
    try:
        return summarize(name, path)
    except ConfigError as exc:
        print(f"(not in the table: {exc})", flush=True)
        return None


def write_report(out: str, text: str, results: List[dict], tail: str = "") -> None:
    """``out/results.md`` (``text`` and ``tail``), ``out/results.json`` (``results``), and print them."""
    os.makedirs(out, exist_ok=True)
    md = os.path.join(out, "results.md")
    with open(md, "w") as f:
        f.write(text + "\n" + (f"\n{tail}\n" if tail else ""))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n" + text + f"\n(also in {md})" + (f"\n\n{tail}" if tail else ""), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Seeds: the plan, run directories, mean and spread, the verdict, the table's cells, compare.png

Result = Dict[str, object]


def seed_plan(students: Sequence[str], seeds: int) -> List[Tuple[str, int]]:
    """``(name, seed index)`` in the order of the runs and the table: the teacher once, then every student for
    seed index 0, then 1, ..."""
    return [("teacher", 0)] + [(n, k) for k in range(seeds) for n in students]


def seed_run_dir(out: str, name: str, seed_index: int) -> str:
    """``OUT/<name>`` for the first seed, ``OUT/<name>_seed<k>`` for the k-th further one."""
    return os.path.join(out, name if seed_index == 0 else f"{name}_seed{seed_index}")


def seeded(cfg, seed_index: int):
    """The config of the ``seed_index``-th further seed: its seed plus ``seed_index`` (the same config for 0)."""
    return dataclasses.replace(cfg, seed=cfg.seed + seed_index) if seed_index else cfg


def run_plan(plan: Sequence[Tuple[str, int]], configs: Dict[Tuple[str, int], object], out: str, teacher_pt: str,
             train_one: Callable[[str, object], Result], summarize: Callable[[str, str], Result],
             after: Optional[Callable[[str, object], None]] = None) -> List[Result]:
    """Train every run of ``plan`` that ``configs`` holds, in order (the teacher then exported to ``teacher_pt``;
    ``after(name, cfg)`` after each); the others come from a finished earlier run in :func:`seed_run_dir`
    (:func:`earlier_run`: an unfinished one is left out with a note). Returns the summaries in plan order."""
    from ..engine.export import export_student

    results = []
    for name, k in plan:
        cfg = configs.get((name, k))
        if cfg is not None:
            results.append(train_one(name, cfg))
            if name == "teacher":
                export_student(cfg.run_dir, teacher_pt)
                print(f"exported the teacher to {teacher_pt}", flush=True)
            if after is not None:
                after(name, cfg)
        elif (earlier := earlier_run(summarize, name, seed_run_dir(out, name, k))) is not None:
            results.append(earlier)
    return results


def group(results: List[Result]) -> Dict[str, List[Result]]:
    """Runs by name, in the order of the table (first appearance)."""
    out: Dict[str, List[Result]] = {}
    for r in results:
        out.setdefault(r["name"], []).append(r)
    return out


def seed_mean(runs: List[Result], key: str, scale: float = 1.0) -> float:
    """The mean of ``key`` (times ``scale``) over the seeds."""
    return statistics.fmean(r[key] * scale for r in runs)


def seed_spread(runs: List[Result], key: str, scale: float = 1.0) -> float:
    """max - min of ``key`` (times ``scale``) over the seeds (0 for one seed)."""
    values = [r[key] * scale for r in runs]
    return max(values) - min(values)


def verdict(results: List[Result], methods: Sequence[str], key: str, scale: float = 1.0) -> str:
    """Is every method of ``methods`` that ran above ``baseline`` in ``key`` by more than the seed spread (the
    larger max - min of the two)? One line; empty without a baseline, a method, or two seeds of each."""
    runs = group(results)
    base = runs.get("baseline")
    methods = [n for n in methods if n in runs and n != "baseline"]
    if base is None or not methods or min(len(base), *(len(runs[n]) for n in methods)) < 2:
        return ""
    parts, ok = [], True
    for name in methods:
        gain = seed_mean(runs[name], key, scale) - seed_mean(base, key, scale)
        noise = max(seed_spread(runs[name], key, scale), seed_spread(base, key, scale))
        ok &= gain > noise
        parts.append(f"{name} {gain:+.2f} vs spread {noise:.2f}")
    return (f"every method above the baseline by more than the seed spread: {'yes' if ok else 'NO'} "
            f"({'; '.join(parts)})")


def seed_cells(runs: List[Result], key: str, base: Optional[List[Result]] = None, scale: float = 1.0) -> List[str]:
    """The table's seed columns for one run name: seeds, mean of ``key``, min-max (several seeds), and the gain
    of the mean over ``base``'s (empty without one), all ``.2f`` after ``scale``."""
    values = [r[key] * scale for r in runs]
    mean = seed_mean(runs, key, scale)
    return [",".join(str(r["seed"]) for r in runs), f"{mean:.2f}",
            f"{min(values):.2f}-{max(values):.2f}" if len(runs) > 1 else "",
            "" if base is None else f"{mean - seed_mean(base, key, scale):+.2f}"]


def run_cells(runs: List[Result], rate_digits: int = 0) -> List[str]:
    """The table's run columns: training images (of one seed), median images/s, wall s of all seeds together,
    the first run directory (+ how many more)."""
    rate = statistics.median(r["images_per_s"] for r in runs)
    return [str(runs[0]["images"]), f"{rate:.{rate_digits}f}", f"{sum(r['wall_s'] for r in runs):.0f}",
            runs[0]["run_dir"] + (f" (+{len(runs) - 1})" if len(runs) > 1 else "")]


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def draw_compare(results: List[Result], out: str, key: str, *, metric: str, title: str, scale: float = 1.0,
                 loss="loss/ce") -> Optional[str]:
    """``out``: every student's ``metric`` and task ``loss`` over steps (mean and min-max band over its seeds),
    the teacher's ``key`` as a dashed line (:func:`fastkd.engine.plot.plot_compare`); None without a student."""
    from ..engine.plot import plot_compare

    students = {n: [r["run_dir"] for r in rs] for n, rs in group(results).items() if n != "teacher"}
    if not students:
        return None
    teacher = next((r for r in results if r["name"] == "teacher"), None)
    return plot_compare(students, out, teacher=teacher[key] * scale if teacher else None, metric=metric,
                        title=title, scale=scale, loss=loss)
