"""The demo: Fashion-MNIST teacher, then one student distilled four ways, one table.

    python -m fastkd.demo                      (or: make demo / fastkd demo)

1. locate Fashion-MNIST (Debian package, cache, or a verified download) and write ``train.beton`` /
   ``test.beton`` (skipped when present);
2. train the teacher (``configs/demo/teacher.yaml``, no teacher of its own) and export it to
   ``OUT/teacher.pt``;
3. train the same student four ways from the same seed: ``baseline`` (no distillation), ``mgd``,
   ``ct``, ``mgd_kd`` (``configs/demo/*.yaml``), each reading the exported teacher;
4. render each run's curves (``fastkd plot``) and print one table: top-1 of the teacher and of each
   student, training images/s, wall time, run directory; also written to ``OUT/results.md`` / ``.json``.

The defaults fit a 2-core CPU in minutes. The same configs take more: every ``KEY=VALUE`` overrides all
five runs, ``--teacher KEY=VALUE ...`` / ``--students KEY=VALUE ...`` one side (put these list options
after the plain overrides), e.g.

    python -m fastkd.demo --device cuda --students train.max_steps=null train.epochs=10

Runs happen in this one process (one DeepSpeed process group of one, kept between runs and between calls
of :func:`main`), one after the other.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "demo")
STUDENTS = ("baseline", "mgd", "ct", "mgd_kd")
DESCRIPTIONS = {
    "teacher": "teacher, trained from scratch",
    "baseline": "student, no distillation",
    "mgd": "student + MGD (stage3)",
    "ct": "student + CT (stage3)",
    "mgd_kd": "student + MGD + logit KD",
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastkd demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for all five runs")
    p.add_argument("--teacher", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for the teacher run")
    p.add_argument("--students", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for the four student runs")
    p.add_argument("--data-dir", default="data/fashion-mnist",
                   help="where train.beton / test.beton are (written there when absent); with "
                        "data.source=torch, the directory of the four IDX files")
    p.add_argument("--out", default="runs/demo", help="parent of the run directories and the results files")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cpu hides GPUs; cuda requires one (default: a GPU when there is one)")
    p.add_argument("--only", nargs="+", choices=("teacher",) + STUDENTS, default=None,
                   help="run only these; the table also shows earlier runs found in their run directories")
    p.add_argument("--config-dir", default=CONFIG_DIR, help="where teacher.yaml, baseline.yaml, ... are")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# Steps


def prepare_data(cfg) -> str:
    """Write the two .beton files unless both are there (FFCV source); returns what happened, for the log."""
    from .data import locate_fashion_mnist, write_fashion_mnist_beton

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


def run_config(name: str, args: argparse.Namespace, teacher_pt: str):
    """The run's YAML + the demo's paths (run directory, data, the exported teacher) + the user's overrides."""
    from .config import load_config

    side = args.teacher if name == "teacher" else args.students
    uses_teacher = name not in ("teacher", "baseline")
    overrides = [f"run_dir={os.path.join(args.out, name)}", f"data.path={args.data_dir}",
                 *([f"teacher.checkpoint={teacher_pt}"] if uses_teacher else []), *args.overrides, *side]
    return load_config(os.path.join(args.config_dir, f"{name}.yaml"), overrides)


def train_one(name: str, cfg) -> Dict[str, object]:
    """Train one run from scratch (an earlier run directory of the same name is replaced)."""
    import shutil

    from .engine.plot import plot_run
    from .engine.trainer import train

    if os.path.isdir(cfg.run_dir):
        shutil.rmtree(cfg.run_dir)  # the demo always starts over: resume: auto would pick up old runs
    print(f"\n=== {name}: {DESCRIPTIONS[name]} -> {cfg.run_dir}", flush=True)
    t0 = time.time()
    train(cfg)
    wall = time.time() - t0
    plot = plot_run(cfg.run_dir)
    return summarize(name, cfg.run_dir, wall, plot)


def summarize(name: str, run_dir: str, wall: Optional[float] = None, plot: Optional[str] = None) -> Dict[str, object]:
    """Top-1 and throughput of a finished run from its metrics.jsonl."""
    from .config import ConfigError
    from .engine.metrics import read_metrics

    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise ConfigError(f"no finished {name} run in {run_dir}")
    rows = read_metrics(run_dir)
    evals = [r for r in rows if r.get("kind") == "eval"]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    if not evals:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no evaluation: the {name} run did not finish")
    # The first logging window holds start-up (allocation, first-iteration set-up): left out when there are more.
    rates = [r["images_per_s"] for r in train_rows[1:] or train_rows]
    if wall is None:
        wall = rows[-1]["time"] - rows[0]["time"]
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    return {"name": name, "model": cfg["student"]["name"], "top1": evals[-1]["val/top1"],
            "top5": evals[-1]["val/top5"], "val_images": evals[-1]["val/count"], "steps": evals[-1]["step"],
            "images": evals[-1]["step"] * cfg["train"]["batch_size"], "images_per_s": statistics.median(rates),
            "wall_s": wall, "run_dir": run_dir,
            "plot": plot or os.path.join(run_dir, "curves.png"),
            "alphas": {k[len("alpha/"):]: v for r in rows if r.get("kind") == "calibration"
                       for k, v in r.items() if k.startswith("alpha/")}}


# ---------------------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{cpu}, {os.cpu_count()} cores, no GPU (load average at the end {load})"


def table(results: List[Dict[str, object]]) -> str:
    base = next((r for r in results if r["name"] == "baseline"), None)
    head = ["run", "model", "top-1 %", "vs baseline", "train images", "images/s", "wall s", "run dir"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        delta = "" if base is None or r["name"] in ("teacher", "baseline") else f"{r['top1'] - base['top1']:+.2f}"
        lines.append(f"| {r['name']} | {r['model']} | {r['top1']:.2f} | {delta} | {r['images']} | "
                     f"{r['images_per_s']:.0f} | {r['wall_s']:.0f} | {r['run_dir']} |")
    return "\n".join(lines)


def report(results: List[Dict[str, object]], command: str, total_s: float) -> str:
    import torch

    alphas = "; ".join(f"{r['name']}: " + ", ".join(f"{k} {v:.3g}" for k, v in r["alphas"].items())
                       for r in results if r["alphas"])
    return "\n".join([
        f"Fashion-MNIST demo, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {machine()}; torch {torch.__version__}, python {platform.python_version()}",
        f"command: `{command}`; total {total_s:.0f} s",
        f"top-1 on the {results[0]['val_images']} test images; images/s = median training throughput "
        "(teacher forward included for distilled students)",
        "",
        table(results),
        "",
        f"alpha: auto chose: {alphas}" if alphas else "",
        "plots: " + ", ".join(str(r["plot"]) for r in results),
    ])


def _hide_numba_finalizer_noise(unraisable) -> None:
    """Each FFCV loader compiles its pipeline with numba; when a finished run's loaders are freed, numba's
    dispatcher finalizer can raise a harmless KeyError that Python prints as "Exception ignored in ...".
    Hide exactly that one (innermost frame in numba/core/dispatcher.py); report everything else."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename if tb is not None else ""
    if isinstance(unraisable.exc_value, KeyError) and where.endswith(os.path.join("numba", "core", "dispatcher.py")):
        return
    sys.__unraisablehook__(unraisable)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    sys.unraisablehook = _hide_numba_finalizer_noise
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastkd demo: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.device != "cuda" and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from .config import ConfigError
    from .engine.export import export_student

    t_start = time.time()
    teacher_pt = os.path.join(args.out, "teacher.pt")
    names = [n for n in ("teacher",) + STUDENTS if args.only is None or n in args.only]
    try:
        configs = {n: run_config(n, args, teacher_pt) for n in names}  # all validated before anything runs
        print(prepare_data(configs[names[0]]), flush=True)
        results = []
        for name in ("teacher",) + STUDENTS:
            if name in configs:
                results.append(train_one(name, configs[name]))
                if name == "teacher":
                    export_student(configs[name].run_dir, teacher_pt)
                    print(f"exported the teacher to {teacher_pt}", flush=True)
            elif os.path.isfile(os.path.join(args.out, name, "metrics.jsonl")):  # an earlier run: into the table
                results.append(summarize(name, os.path.join(args.out, name)))
    except ConfigError as exc:
        print(f"fastkd demo: error: {exc}", file=sys.stderr)
        return 2
    command = "python -m fastkd.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(results, command.strip(), time.time() - t_start)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n" + text + f"\n(also in {os.path.join(args.out, 'results.md')})", flush=True)
    return 0


def cli() -> int:
    """``python -m fastkd.demo``: main, then leave the process group (DeepSpeed keeps it between runs)."""
    from .engine.dist import teardown

    try:
        return main()
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(cli())
