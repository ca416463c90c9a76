"""Top-1 / top-5 over the whole validation set, exact under any number of processes.

Each rank counts its own samples (the loaders shard without padding or dropping); the counts are
summed across ranks, so every sample is counted exactly once.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from ...comm import all_reduce_sum


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device,
             dtype: torch.dtype = torch.float32) -> Dict[str, float]:
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, samples
    for images, labels in loader:
        images, labels = images.to(device=device, dtype=dtype), labels.to(device)
        logits = forward(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        counts[0] += hit[:, :1].sum()
        counts[1] += hit.any(dim=1).sum()
        counts[2] += labels.numel()
    counts = all_reduce_sum(counts).tolist()  # host sync: once per evaluation
    n = max(counts[2], 1)
    return {"top1": 100.0 * counts[0] / n, "top5": 100.0 * counts[1] / n, "count": int(counts[2])}


def model_eval_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(images):
        out = model(images)
        return out[0] if isinstance(out, tuple) else out
    return fn
