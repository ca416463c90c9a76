"""Joint image + label-map transforms for semantic segmentation (mmsegmentation's Cityscapes pipeline).

Training, in mmseg's order (numpy / OpenCV, on uint8 HxWx3 RGB images and HxW uint8 label maps):

1. rescale: ratio r ~ U(ratio_range); target (long, short) = int(r * img_scale); the image is scaled by
   ``min(long / max(h, w), short / min(h, w))`` keeping its aspect ratio (mmcv's ``rescale_size``,
   sizes rounded half up); image bilinear, label nearest;
2. random crop of ``crop_size``: a crop is kept as soon as it holds two classes or more and none covers
   ``cat_max_ratio`` or more of its labelled (non-ignore) pixels; after 10 refused crops an 11th is
   taken as drawn (mmseg's ``RandomCrop``);
3. horizontal flip with probability ``flip_prob``;
4. photometric distortion (mmseg's ``PhotoMetricDistortion``): brightness +-32, contrast x[0.5, 1.5]
   before or after saturation x[0.5, 1.5] and hue +-18 (OpenCV HSV), each with probability 1/2,
   rounding to uint8 after every step; the label map is untouched;
5. pad to ``crop_size`` at the bottom/right: image 0, label ``ignore_index``.

Every draw comes from ``np.random.default_rng(SeedSequence([seed, epoch, index]))``: the same sample of
the same epoch is transformed identically on every run, worker count and resume.  Normalisation
happens on the device (:func:`fastkd.data.normalize.normalize_into`).  Evaluation takes the image
and its label as stored (full resolution, no resize).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

IGNORE_INDEX = 255


def seeded_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def rescale_size(height: int, width: int, scale: Tuple[float, float]) -> Tuple[int, int]:
    """(h, w) after a keep-ratio rescale to fit ``scale`` = (long edge, short edge) (mmcv's rule)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_rescale(image: np.ndarray, label: np.ndarray, img_scale: Tuple[int, int],
                   ratio_range: Tuple[float, float], rng: np.random.Generator):
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    target = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))  # truncated, as mmseg's Resize
    h, w = rescale_size(image.shape[0], image.shape[1], target)
    if (h, w) == label.shape:
        return image, label
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def crop_box(height: int, width: int, crop: Tuple[int, int], rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) of a random ``crop`` = (h, w) window (clamped to the image)."""
    top = int(rng.integers(0, max(height - crop[0], 0) + 1))
    left = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return top, left, min(top + crop[0], height), min(left + crop[1], width)


def dominated(label: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    """True when the crop holds one class only, or one class covers >= cat_max_ratio of its labelled pixels."""
    counts = np.bincount(label.ravel(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) <= 1 or counts.max() / counts.sum() >= cat_max_ratio


def random_crop(image: np.ndarray, label: np.ndarray, crop: Tuple[int, int], cat_max_ratio: float,
                ignore_index: int, rng: np.random.Generator):
    box = crop_box(label.shape[0], label.shape[1], crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            t, l, b, r = box
            if not dominated(label[t:b, l:r], cat_max_ratio, ignore_index):
                break
            box = crop_box(label.shape[0], label.shape[1], crop, rng)
    t, l, b, r = box
    return image[t:b, l:r], label[t:b, l:r]


def _scale_shift(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, *, brightness: int = 32,
                           contrast: Tuple[float, float] = (0.5, 1.5),
                           saturation: Tuple[float, float] = (0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an RGB uint8 image (every draw from ``rng``)."""
    if rng.integers(2):
        image = _scale_shift(image, beta=rng.uniform(-brightness, brightness))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = _scale_shift(image, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _scale_shift(hsv[:, :, 1], alpha=rng.uniform(*saturation))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + int(rng.integers(-hue, hue))) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first and rng.integers(2):
        image = _scale_shift(image, alpha=rng.uniform(*contrast))
    return image


def pad_to(image: np.ndarray, label: np.ndarray, size: Tuple[int, int], ignore_index: int):
    """Pad at the bottom / right to at least ``size`` = (h, w): image 0, label ``ignore_index``."""
    ph, pw = max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0)
    if ph == 0 and pw == 0:
        return image, label
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    return image, label


@dataclass(frozen=True)
class SegTrainTransform:
    """The training pipeline above; ``transform(image, label, index, epoch) -> (image, label)``.

    Output: image uint8 [crop_h, crop_w, 3] RGB, label uint8 [crop_h, crop_w], both contiguous.
    """

    crop_size: Tuple[int, int] = (512, 512)
    """(h, w) of the training crop."""
    img_scale: Optional[Tuple[int, int]] = (2048, 1024)
    """(long, short) edge the ratios are relative to; None: each image's own size."""
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    """Range of the random rescale ratio."""
    cat_max_ratio: float = 0.75
    """A crop is redrawn (up to 10 times) while one class covers at least this share of it (1: off)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip."""
    photometric: bool = True
    """Apply mmseg's photometric distortion."""
    ignore_index: int = IGNORE_INDEX
    """Label of ignored pixels (padding too)."""
    seed: int = 0
    """Base of every random draw."""

    def __post_init__(self):
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be (h, w) >= 1, got {self.crop_size}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1 or not 0 <= self.flip_prob <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1] and flip_prob in [0, 1], got "
                             f"{self.cat_max_ratio} and {self.flip_prob}")

    def __call__(self, image: np.ndarray, label: np.ndarray, index: int, epoch: int):
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ (sample {index})")
        rng = seeded_rng(self.seed, epoch, index)
        scale = self.img_scale or (max(label.shape), min(label.shape))
        image, label = random_rescale(image, label, scale, self.ratio_range, rng)
        image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio, self.ignore_index, rng)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        image, label = pad_to(image, label, self.crop_size, self.ignore_index)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)
