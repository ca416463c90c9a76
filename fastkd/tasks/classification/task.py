"""Image classification: ``(images, labels)`` batches, cross-entropy (+ label smoothing), top-1/top-5.

Models return ``logits`` or, with ``features=True``, ``(logits, {name: feature})`` (fastkd's own
models; foreign ones through ``fastkd.models.adapt``). Logit KD stacks on the features.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import KDConfig
from ..base import Features, Task
from .evaluate import evaluate, model_eval_fn
from .loaders import build_loaders


class ClassificationTask(Task):
    name = "classification"
    headline = "top1"

    def __init__(self, cfg=None, *, label_smoothing: Optional[float] = None):
        super().__init__(cfg)
        if label_smoothing is None:
            label_smoothing = cfg.distill.label_smoothing if cfg is not None else 0.0
        self.label_smoothing = float(label_smoothing)

    def build_loaders(self, *, micro, grad_accum, rank, world, seed, device, dtype, channels_last):
        return build_loaders(self.cfg.data, micro=micro, grad_accum=grad_accum, rank=rank, world=world, seed=seed,
                             device=device, dtype=dtype, channels_last=channels_last)

    def to_device(self, batch, device, dtype, channels_last):
        images, labels = batch
        return images.to(device, dtype, non_blocking=True), labels.to(device, non_blocking=True)

    def batch_size(self, batch) -> int:
        return int(batch[1].shape[0])

    def loss_names(self, student: nn.Module) -> List[str]:
        return ["ce"]

    def student_forward(self, student, batch) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor], Features]:
        images, labels = batch
        logits, feats = student(images, features=True)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"ce": ce}, logits, feats

    @torch.no_grad()
    def teacher_forward(self, teacher, batch, layers: Optional[Sequence[str]]) -> Tuple[torch.Tensor, Features]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits, feats = teacher(images.to(next(teacher.parameters()).dtype), features=True)
        return logits, feats if layers is None else {k: feats[k] for k in layers}

    def logit_loss(self, kd: Optional[KDConfig], backend: str) -> Optional[nn.Module]:
        if kd is None:
            return None
        from ...losses import LogitKD
        return LogitKD(temperature=kd.temperature, alpha=1.0 if kd.alpha == "auto" else kd.alpha, backend=backend)

    def evaluate(self, model, loader, device, dtype) -> Dict[str, float]:
        return evaluate(model_eval_fn(model), loader, device, dtype)

    def describe(self, metrics: Dict[str, float]) -> str:
        return f"top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}% on {metrics['count']} images"
