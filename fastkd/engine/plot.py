"""``fastkd plot RUN_DIR``: loss terms, learning rate, accuracy and throughput curves to one PNG;
``plot_compare``: several runs (and seeds of each) on the same axes."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

from ..config import ConfigError
from .metrics import read_metrics


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("fastkd plot needs matplotlib (pip install matplotlib)") from None
    return plt


def _rows(run_dir: str) -> list:
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise ConfigError(f"no metrics.jsonl in {run_dir}")
    return read_metrics(run_dir)


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    rows = _rows(run_dir)
    plt = _pyplot()
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
        pts = [(r["step"], r[key]) for r in train if key in r]
        ax.plot(*zip(*pts), label=key[5:])
    ax.set(title="losses", xlabel="step", yscale="log")
    ax.legend(fontsize=8)
    _curve(axes[0][1], train, "lr", "learning rate")
    ax = axes[1][0]
    for key in ("val/top1", "val/top5"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=key)
    teacher = [r for r in rows if r.get("kind") == "teacher"]
    if teacher:
        ax.axhline(teacher[-1]["teacher/top1"], ls="--", c="gray", label="teacher top1")
    ax.set(title="validation accuracy (%)", xlabel="step")
    ax.legend(fontsize=8)
    _curve(axes[1][1], train, "images_per_s", "throughput (images/s)")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _curve(ax, rows, key, title):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
        ax.plot(*zip(*pts))
    ax.set(title=title, xlabel="step")


def plot_compare(runs: Dict[str, Sequence[str]], out: str, *, teacher: Optional[float] = None,
                 metric: str = "val/top1", title: str = "validation top-1 (%)", scale: float = 1.0,
                 loss: Union[str, Sequence[str]] = "loss/ce") -> str:
    """The validation ``metric`` (times ``scale``, e.g. 100 for box AP stored as a fraction) and the task loss
    over steps, one line per label (its runs' mean over seeds, with the min-max band when there are several),
    all on the same two axes; ``teacher`` (already scaled) as a dashed line. ``loss``: a training row's key, or
    several summed (detection's classification + box regression)."""
    plt = _pyplot()
    losses = [loss] if isinstance(loss, str) else list(loss)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for label, dirs in runs.items():
        rows = [_rows(d) for d in dirs]
        seeds = f" ({len(dirs)} seeds)" if len(dirs) > 1 else ""
        for ax, kind, keys, factor, marker in ((acc_ax, "eval", [metric], scale, "o"),
                                               (loss_ax, "train", losses, 1.0, None)):
            steps, values = _aligned([[(r["step"], factor * sum(r[k] for k in keys)) for r in rs
                                       if r.get("kind") == kind and all(k in r for k in keys)] for rs in rows])
            if not steps:
                continue
            mean = [sum(v) / len(v) for v in values]
            line, = ax.plot(steps, mean, marker=marker, ms=3, label=label + seeds)
            if len(dirs) > 1:
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2,
                                color=line.get_color(), lw=0)
    if teacher is not None:
        acc_ax.axhline(teacher, ls="--", c="gray", label="teacher")
    acc_ax.set(title=title, xlabel="step")
    loss_ax.set(title=f"task loss ({' + '.join(k.split('/')[-1] for k in losses)}, training)", xlabel="step",
                yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if any(len(dirs) > 1 for dirs in runs.values()):
        fig.suptitle("lines: mean over seeds; bands: min-max over seeds", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _aligned(curves: List[List[tuple]]):
    """Steps present in every curve, and the values of each curve there."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    lookup = [dict(c) for c in curves]
    return steps, [[d[s] for d in lookup] for s in steps]
