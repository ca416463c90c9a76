"""mIoU as mmsegmentation computes it (``mmseg/core/evaluation/metrics.py``), exact under any number of processes.

Per image, pixels labelled ``ignore_index`` are dropped; the areas of intersection (prediction ==
label), prediction and label are histogrammed over the K classes and summed over the whole validation
set (and over processes: one all_reduce of a [4, K] float64 tensor). Then, per class,

    IoU_c = I_c / (P_c + L_c - I_c)        Acc_c = I_c / L_c

(NaN for a class that never occurs in labels nor predictions), mIoU / mAcc = the NaN-ignoring mean over
classes, aAcc = sum I / sum L (pixel accuracy). Values are percentages.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from ...comm import all_reduce_sum


def area_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """[4, K] float64: intersection, union, prediction and label areas of one batch (ignored pixels dropped).

    pred, label: integer tensors of the same shape. Labels outside [0, K) other than ``ignore_index``
    count in no label area (mmseg's histogram range), their pixels' predictions still count.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {list(pred.shape)} and label {list(label.shape)} shapes differ")
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    k = num_classes

    def hist(x: torch.Tensor) -> torch.Tensor:
        x = x[(x >= 0) & (x < k)]
        return torch.bincount(x, minlength=k).to(torch.float64)

    inter = hist(pred[pred == label])
    area_pred, area_label = hist(pred), hist(label)
    return torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])


def summarize(counts: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Metrics from summed [4, K] area counts: mIoU, mAcc, aAcc, ``pixels`` (labelled pixels scored) and
    ``IoU.<class>`` (percentages; '/' and spaces in class names become '_')."""
    inter, union, _, area_label = counts.double().cpu().unbind(0)
    iou = inter / union
    acc = inter / area_label

    def nanmean(t: torch.Tensor) -> float:
        t = t[~torch.isnan(t)]
        return float(t.mean()) * 100 if t.numel() else math.nan

    names = [n.replace("/", "_").replace(" ", "_") for n in class_names] if class_names else \
        [str(i) for i in range(counts.shape[1])]  # metric keys: no '/' (a TensorBoard tag level) or spaces
    out = {"mIoU": nanmean(iou), "mAcc": nanmean(acc),
           "aAcc": float(inter.sum() / area_label.sum()) * 100 if area_label.sum() > 0 else math.nan,
           "pixels": float(area_label.sum())}
    out.update({f"IoU.{n}": float(v) * 100 for n, v in zip(names, iou.tolist())})
    return out


class MIoU:
    """Running area counts: ``update(pred, label)`` per batch, ``compute()`` once (all_reduce, host sync)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device="cpu",
                 class_names: Optional[Sequence[str]] = None):
        self.num_classes, self.ignore_index, self.class_names = int(num_classes), int(ignore_index), class_names
        self.counts = torch.zeros(4, self.num_classes, dtype=torch.float64, device=device)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        self.counts += area_counts(pred, label, self.num_classes, self.ignore_index).to(self.counts.device)

    def compute(self) -> Dict[str, float]:
        return summarize(all_reduce_sum(self.counts), self.class_names)  # dist: sums every rank's areas
