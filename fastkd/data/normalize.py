"""Normalisation every task's images share: ImageNet's statistics, the check of a mean/std pair, and the
uint8 -> float ``(x / 255 - mean) / std`` as one multiply-add into a preallocated buffer."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Validate per-channel mean/std on the 0-1 scale (torchvision's convention)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if any(not 0.0 <= m <= 1.0 for m in mean) or any(not 0.0 < s <= 1.0 for s in std):
        raise ValueError(f"mean/std are on the 0-1 scale (e.g. {IMAGENET_MEAN}/{IMAGENET_STD}); "
                         f"got mean={mean} std={std}")
    return mean, std


def normalize_coefficients(mean, std, device, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1,3,1,1] with ``(x_uint8 / 255 - mean) / std == x * scale + shift``."""
    mean, std = check_mean_std(mean, std)
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).to(dtype).view(1, 3, 1, 1).to(device)
    shift = (-m / s).to(dtype).view(1, 3, 1, 1).to(device)
    return scale, shift


def normalize_into(images: torch.Tensor, out: torch.Tensor, scale: torch.Tensor,
                   shift: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] (any strides) -> ``out`` (float, same shape): x * scale + shift.

    Low-precision outputs are computed in fp32 and rounded once.
    """
    if out.dtype == torch.float32:
        out.copy_(images)
        return out.mul_(scale).add_(shift)
    return out.copy_(torch.addcmul(shift, images.float(), scale))
