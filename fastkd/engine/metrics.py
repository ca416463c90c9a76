"""Rank-0 logging: progress bar (images/s, each loss term, lr), JSON-lines file, TensorBoard if installed."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional


class MetricsLogger:
    """Writes ``RUN_DIR/metrics.jsonl`` (one JSON object per line, appended across resumes)."""

    def __init__(self, run_dir: str, *, enabled: bool, progress: bool, total_steps: int, initial_step: int = 0):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
        except ImportError:  # TensorBoard is optional
            self.tb = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def log(self, step: int, record: Dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        line = {"kind": kind, "step": step, "time": time.time(), **record}
        self.file.write(json.dumps(line) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.bar is not None and kind == "train":
            short = {k.split("/")[-1]: f"{v:.4g}" for k, v in record.items() if k.startswith("loss/")}
            short["img/s"] = f"{record.get('images_per_s', 0):.0f}"
            short["lr"] = f"{record.get('lr', 0):.3g}"
            self.bar.set_postfix(short, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
