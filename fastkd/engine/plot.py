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
    fig = _compare_figure(plt, runs, teacher=teacher, metric=metric, title=title, scale=scale, loss=loss)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _compare_figure(plt, runs, *, teacher, metric, title, scale, loss):
    """:func:`plot_compare`'s figure: the metric panel (lines over steps, or one column per run when every
    run was evaluated once) and the loss panel."""
    losses = [loss] if isinstance(loss, str) else list(loss)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 5))
    evals, names = {}, {}  # label -> (steps, per-step values over seeds) of the metric; label -> legend name
    for i, (label, dirs) in enumerate(runs.items()):
        rows = [_rows(d) for d in dirs]
        names[label] = label + (f" ({len(dirs)} seeds)" if len(dirs) > 1 else "")
        evals[label] = _aligned([[(r["step"], scale * r[metric]) for r in rs
                                  if r.get("kind") == "eval" and metric in r] for rs in rows])
        steps, values = _aligned([[(r["step"], sum(r[k] for k in losses)) for r in rs
                                   if r.get("kind") == "train" and all(k in r for k in losses)] for rs in rows])
        if steps:
            _band(loss_ax, steps, values, names[label], None, len(dirs) > 1, f"C{i}")
    if all(len(steps) <= 1 for steps, _ in evals.values()):
        _final_points(acc_ax, evals)  # evaluated once, at the end: one column per run, every seed a dot
        title += f" at step {max((s[0] for s, _ in evals.values() if s), default=0)}"
    else:
        for i, (label, (steps, values)) in enumerate(evals.items()):
            if steps:
                _band(acc_ax, steps, values, names[label], "o", len(runs[label]) > 1, f"C{i}")
        acc_ax.set(xlabel="step")
    if teacher is not None:
        acc_ax.axhline(teacher, ls="--", c="gray", label=f"teacher: {teacher:.2f}")
    acc_ax.set(title=title)
    loss_ax.set(title=f"task loss ({' + '.join(k.split('/')[-1] for k in losses)}, training)", xlabel="step",
                yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if any(len(dirs) > 1 for dirs in runs.values()):
        fig.suptitle("lines: mean over seeds; bands and error bars: min-max over seeds", fontsize=10)
    fig.tight_layout()
    return fig


def _band(ax, steps, values, label, marker, band: bool, color: str) -> None:
    """The mean over seeds at each step, and the min-max band when there are several seeds."""
    ax.plot(steps, [sum(v) / len(v) for v in values], marker=marker, ms=3, label=label, color=color)
    if band:
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=color, lw=0)


def _final_points(ax, evals) -> None:
    """One column per run (coloured as its loss line): each seed's final value as a small dot, the mean as a
    large one with the min-max range as an error bar."""
    for i, (label, (steps, values)) in enumerate(evals.items()):
        color = f"C{i}"
        if not steps:
            continue
        v = values[-1]
        mean = sum(v) / len(v)
        ax.errorbar([i], [mean], yerr=[[mean - min(v)], [max(v) - mean]], fmt="o", ms=7, capsize=6, color=color,
                    label=f"{label}: {mean:.2f}" + (f" ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else ""))
        if len(v) > 1:
            ax.scatter([i + 0.12] * len(v), v, s=12, color=color, alpha=0.6)
    ax.set_xticks(range(len(evals)), list(evals))
    ax.set_xlim(-0.6, len(evals) - 0.4)


def _aligned(curves: List[List[tuple]]):
    """Steps present in every curve, and the values of each curve there."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    lookup = [dict(c) for c in curves]
    return steps, [[d[s] for d in lookup] for s in steps]
