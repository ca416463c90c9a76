"""Classification's image transforms, shared by its FFCV and PyTorch loaders (numpy only).

Crop geometry follows FFCV's decoders (which follow torchvision): RandomResizedCrop draws up to 10
(area, log-aspect) pairs, then falls back to a centre crop clamped to the aspect range
(:func:`fastkd.data.seeded.crop_box`, seeded per sample); the centre crop for evaluation takes
``ratio * min(H, W)`` square pixels.  Crops are resized with OpenCV's
INTER_AREA like FFCV's ``resize_crop`` (PIL's antialiased bilinear when OpenCV is absent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .. import seeded

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
DEFAULT_CENTER_RATIO = 224 / 256

try:  # OpenCV comes with FFCV's dependencies; the fallback must work without it
    import cv2
except ImportError:  # pragma: no cover - exercised only where OpenCV is missing
    cv2 = None


def center_crop_box(height: int, width: int, ratio: float = DEFAULT_CENTER_RATIO) -> Tuple[int, int, int, int]:
    """(top, left, c, c) of the evaluation centre crop, ``c = ratio * min(H, W)`` (as FFCV)."""
    c = max(1, int(ratio * min(height, width)))
    return (height - c) // 2, (width - c) // 2, c, c


def crop_resize(image: np.ndarray, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` out of HxWx3 uint8 ``image`` and resize it to ``size`` x ``size``."""
    i, j, h, w = box
    crop = image[i:i + h, j:j + w]
    if crop.shape[0] == size and crop.shape[1] == size:
        return np.ascontiguousarray(crop)
    if cv2 is not None:
        return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))


@dataclass(frozen=True)
class SampleTransform:
    """Per-sample train / eval transform of the fallback loader: HxWx3 uint8 -> SxSx3 uint8.

    Crop and flip are drawn by :mod:`fastkd.data.seeded` from (seed, epoch, sample index), exactly as
    the FFCV decoder draws them: reproducible across workers, resumes and the two loaders.
    """

    train: bool
    size: int
    scale: Tuple[float, float] = DEFAULT_SCALE
    ratio: Tuple[float, float] = DEFAULT_RATIO
    flip: bool = True
    center_ratio: float = DEFAULT_CENTER_RATIO
    seed: int = 0

    def __call__(self, image: np.ndarray, index: int, epoch: int, size: Optional[int] = None) -> np.ndarray:
        size = size or self.size
        h, w = image.shape[:2]
        if not self.train:
            return crop_resize(image, center_crop_box(h, w, self.center_ratio), size)
        k0, k1 = seeded.seed_key(self.seed)
        box = seeded.crop_box(h, w, *self.scale, *self.ratio, k0, k1, int(epoch), int(index))
        out = crop_resize(image, box, size)
        if self.flip and seeded.flips(k0, k1, int(epoch), int(index), 0.5):
            out = np.ascontiguousarray(out[:, ::-1])
        return out


@dataclass(frozen=True)
class ResolutionSchedule:
    """Progressive resizing (FFCV's ImageNet recipe): ``min_res`` up to ``start_ramp``, then a linear
    ramp rounded to multiples of ``step``, ``max_res`` from ``end_ramp`` on.  Epochs count from 0."""

    min_res: int
    max_res: int
    start_ramp: int
    end_ramp: int
    step: int = 32

    def __post_init__(self):
        if not 0 < self.min_res <= self.max_res:
            raise ValueError(f"resolution schedule needs 0 < min_res <= max_res, got {self.min_res}, {self.max_res}")
        if self.end_ramp <= self.start_ramp:
            raise ValueError(f"resolution schedule needs end_ramp > start_ramp, got {self.start_ramp}, {self.end_ramp}")

    def __call__(self, epoch: int) -> int:
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        res = np.interp(epoch, [self.start_ramp, self.end_ramp], [self.min_res, self.max_res])
        return int(max(self.step, round(res / self.step) * self.step))

    @classmethod
    def from_any(cls, spec) -> Optional["ResolutionSchedule"]:
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        return cls(*spec)
