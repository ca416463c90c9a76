"""``fastkd plot RUN_DIR``: loss terms, learning rate, accuracy and throughput curves to one PNG."""
from __future__ import annotations

import os
from typing import Optional

from ..config import ConfigError
from .metrics import read_metrics


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"no metrics.jsonl in {run_dir}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("fastkd plot needs matplotlib (pip install matplotlib)") from None
    rows = read_metrics(run_dir)
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
