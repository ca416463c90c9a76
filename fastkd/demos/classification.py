"""The demo: Fashion-MNIST teacher, then one student distilled four ways, one table and one picture.

    python -m fastkd.demos.classification                      (or: make demo / fastkd demo)
    python -m fastkd.demos.classification --seeds 3            (every student for seeds 0, 1, 2: mean and spread)

1. locate Fashion-MNIST (Debian package, cache, or a verified download) and write ``train.beton`` /
   ``test.beton`` (skipped when present);
2. train the teacher (``configs/demo/teacher.yaml``, no teacher of its own) and export it to
   ``OUT/teacher.pt``;
3. train the same student four ways: ``baseline`` (no distillation), ``mgd``, ``ct``, ``mgd_kd``
   (``configs/demo/*.yaml``), each reading the exported teacher, for each student seed;
4. render each run's curves (``fastkd plot``), one comparison ``OUT/compare.png`` (validation accuracy
   and task loss over steps, every student on the same axes) and print one table: top-1 of the teacher
   and of each student (mean and min-max over seeds), training images/s, wall time; also written to
   ``OUT/results.md`` / ``.json``; then where the time went.

Augmentation, data order, initialisation and masks all follow the seed, and the runs use one torch thread
(``--threads``; float sums depend on the thread count): the same command prints the same accuracies on
every run.  The defaults fit a 2-core CPU in minutes.  Every ``KEY=VALUE`` overrides all
runs, ``--teacher KEY=VALUE ...`` / ``--students KEY=VALUE ...`` one side (put these list options after
the plain overrides), e.g.

    python -m fastkd.demos.classification --device cuda --students train.epochs=10

Runs happen in this one process (one DeepSpeed process group of one, kept between runs and between calls
of :func:`main`), one after the other.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

from ..resources import configs_dir
from .common import (demo_parser, draw_compare, finished_run, group, hide_numba_finalizer_noise, load_average,
                          machine_name as machine, markdown_table, replace_run_dir, run, run_cells, run_plan,
                          seed_cells, seed_plan, seed_run_dir, seeded, select_device, threads, verdict as seed_verdict,
                          write_report)

CONFIGS = "demo"
"""The folder of the shipped configs (:mod:`fastkd.resources`) that holds this demo's configs."""


def config_dir() -> str:
    return os.path.join(configs_dir(), CONFIGS)
STUDENTS = ("baseline", "mgd", "ct", "mgd_kd")
DESCRIPTIONS = {
    "teacher": "teacher, trained from scratch",
    "baseline": "student, no distillation",
    "mgd": "student + MGD (stage2, stage3)",
    "ct": "student + CT (stage3)",
    "mgd_kd": "student + MGD (stage2, stage3) + logit KD",
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = demo_parser("fastkd demo cls", __doc__.split("\n")[0], runs=("teacher",) + STUDENTS, out="runs/demo",
                    config_dir=config_dir())
    p.add_argument("--data-dir", default="data/fashion-mnist",
                   help="where train.beton / test.beton are (written there when absent); with "
                        "data.source=torch, the directory of the four IDX files")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads for the runs (default 1: the table is the same on every machine "
                        "of the same CPU kind, and a loaded CPU does not stall; 0: torch's own choice)")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    return args


# ---------------------------------------------------------------------------------------------------------
# Steps


def prepare_data(cfg) -> str:
    """Write the two .beton files unless both are there (FFCV source); returns what happened, for the log."""
    from ..data.classification.writers import write_fashion_mnist_beton
    from ..data.sources.fashion_mnist import locate as locate_fashion_mnist

    data_dir = cfg.data.path
    if cfg.data.source != "ffcv":
        return f"data.source {cfg.data.source}: reading {data_dir} directly (no .beton files needed)"
    files = [os.path.join(data_dir, f"{s}.beton") for s in ("train", "test")]
    if all(os.path.isfile(f) for f in files):
        return f"Fashion-MNIST .beton files present in {data_dir}"
    source = locate_fashion_mnist()
    t0 = time.time()
    write_fashion_mnist_beton(data_dir, force=True, progress=False)
    return f"wrote {', '.join(files)} from {source} in {time.time() - t0:.0f} s"


def run_dir(args: argparse.Namespace, name: str, seed_index: int) -> str:
    """``OUT/<name>`` for the first seed, ``OUT/<name>_seed<k>`` for the k-th further one."""
    return seed_run_dir(args.out, name, seed_index)


def run_config(name: str, args: argparse.Namespace, teacher_pt: str, seed_index: int = 0):
    """The run's YAML + the demo's paths (run directory, data, the exported teacher) + the user's overrides;
    the k-th further seed adds k to the configured seed."""
    from ..config import load_config

    side = args.teacher if name == "teacher" else args.students
    uses_teacher = name not in ("teacher", "baseline")
    overrides = [f"run_dir={run_dir(args, name, seed_index)}", f"data.path={args.data_dir}",
                 *([f"teacher.checkpoint={teacher_pt}"] if uses_teacher else []), *args.overrides, *side]
    cfg = load_config(os.path.join(args.config_dir, f"{name}.yaml"), overrides)
    return seeded(cfg, seed_index)


def train_one(name: str, cfg) -> Dict[str, object]:
    """Train one run from scratch (an earlier run directory of the same name is replaced)."""
    from ..engine.plot import plot_run
    from ..engine.trainer import train

    replace_run_dir(cfg.run_dir)  # the demo always starts over: resume: auto would pick up old runs
    print(f"\n=== {name} (seed {cfg.seed}): {DESCRIPTIONS[name]} -> {cfg.run_dir}", flush=True)
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    plot = plot_run(cfg.run_dir)
    return summarize(name, cfg.run_dir, wall, plot)


def summarize(name: str, run_dir: str, wall: Optional[float] = None, plot: Optional[str] = None) -> Dict[str, object]:
    """Top-1 and throughput of a finished run from its metrics.jsonl."""
    summary, last, cfg = finished_run(name, run_dir, "val/top1", wall)
    return {**summary, "seed": cfg["seed"], "top1": last["val/top1"], "top5": last["val/top5"],
            "val_images": last["val/count"], "plot": plot or os.path.join(run_dir, "curves.png")}


# ---------------------------------------------------------------------------------------------------------
# Report


def table(results: List[Dict[str, object]]) -> str:
    runs = group(results)
    base = runs.get("baseline")
    head = ["run", "model", "seeds", "top-1 %", "min-max", "vs baseline", "train images", "images/s", "wall s",
            "run dir"]
    return markdown_table(head, [[name, rs[0]["model"],
                                  *seed_cells(rs, "top1", None if name in ("teacher", "baseline") else base),
                                  *run_cells(rs)] for name, rs in runs.items()])


def verdict(results: List[Dict[str, object]]) -> str:
    """Does every method beat the baseline in top-1 by more than the seed spread (max - min of either)?"""
    return seed_verdict(results, STUDENTS, "top1")


def report(results: List[Dict[str, object]], command: str, total_s: float, load_start: str,
           torch_threads: int) -> str:
    import torch

    alphas = "; ".join(f"{r['name']} seed {r['seed']}: " + ", ".join(f"{k} {v:.3g}" for k, v in r["alphas"].items())
                       for r in results if r["alphas"])
    seeds = max(len(rs) for rs in group(results).values())
    return "\n".join(line for line in [
        f"Fashion-MNIST demo, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {machine()}; load average {load_start} at the start, {load_average()} at the end; "
        f"torch {torch.__version__}, python {platform.python_version()}, torch threads {torch_threads}",
        f"command: `{command}`; total {total_s:.0f} s",
        f"top-1 on the {results[0]['val_images']} test images" + (
            f"; students: mean over {seeds} seeds, min-max = the spread" if seeds > 1 else "")
        + "; images/s = median training throughput (teacher forward included for distilled students); "
        "wall s = all seeds together",
        "",
        table(results),
        "",
        verdict(results),
        f"alpha: auto chose: {alphas}" if alphas else "",
    ] if line is not None)


class Timer:
    """Wall and CPU seconds per phase.  CPU / wall far below the core count means the machine was busy."""

    def __init__(self):
        self.phases: List[tuple] = []
        self._t, self._c = time.time(), time.process_time()

    def lap(self, label: str) -> None:
        t, c = time.time(), time.process_time()
        self.phases.append((label, t - self._t, c - self._c))
        self._t, self._c = t, c

    def summary(self) -> str:
        total = sum(w for _, w, _ in self.phases)
        lines = [f"where the time went (wall s, CPU s of this process; {os.cpu_count()} cores):"]
        for label, wall, cpu in self.phases:
            lines.append(f"  {label:<28} {wall:7.1f} s wall {cpu:7.1f} s CPU ({cpu / max(wall, 1e-9):.1f} cores busy)")
        lines.append(f"  {'total':<28} {total:7.1f} s")
        return "\n".join(lines)




def run_all(args: argparse.Namespace, timer: Timer) -> List[Dict[str, object]]:
    """Validate every config, write the data, train the teacher and the students; their summaries."""
    teacher_pt = os.path.join(args.out, "teacher.pt")
    plan = seed_plan(STUDENTS, args.seeds)
    chosen = [(n, k) for n, k in plan if args.only is None or n in args.only]
    configs = {(n, k): run_config(n, args, teacher_pt, k) for n, k in chosen}  # all validated before anything runs
    timer.lap("start-up, config checks")
    print(prepare_data(configs[chosen[0]]), flush=True)
    timer.lap("data (.beton files)")
    return run_plan(plan, configs, args.out, teacher_pt, train_one, summarize,
                    after=lambda name, cfg: timer.lap(f"{name} (seed {cfg.seed})"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    timer, load_start = Timer(), load_average()
    sys.unraisablehook = hide_numba_finalizer_noise
    problem = select_device(args.device)
    if problem:
        print(f"fastkd demo: {problem}", file=sys.stderr)
        return 2
    import torch

    from ..config import ConfigError

    t_start = time.time()
    try:
        with threads(args.threads or None):
            results = run_all(args, timer)
            used_threads = torch.get_num_threads()
    except ConfigError as exc:
        print(f"fastkd demo: error: {exc}", file=sys.stderr)
        return 2
    compare = draw_compare(results, os.path.join(args.out, "compare.png"), "top1", metric="val/top1",
                           title="validation top-1 (%)")
    command = "python -m fastkd.demos.classification " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(results, command.strip(), time.time() - t_start, load_start, used_threads)
    text += "\nplots: " + ", ".join([str(compare)] * bool(compare) + [str(r["plot"]) for r in results])
    timer.lap("plots, report")
    write_report(args.out, text, results, timer.summary())
    return 0


def cli() -> int:
    """``python -m fastkd.demos.classification``: main, then leave the process group."""
    return run(main)


if __name__ == "__main__":
    sys.exit(cli())
