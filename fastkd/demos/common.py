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
- :func:`demo_parser`: the options every demo takes (overrides, per-side overrides, out, device, only, configs).
"""
from __future__ import annotations

import argparse
import contextlib
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
    return p


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
