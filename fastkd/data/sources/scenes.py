"""fashion-scenes: a small, deterministic detection (and segmentation) set from real Fashion-MNIST garments.

Each scene is a canvas of one of a few sizes and aspect ratios (``CANVASES``) with 1-8 garments
pasted at random scales (24-96 px by default, ``garment_sizes``) and positions, tinted with a random
colour, over a textured background.  Garments are drawn in order, each over the previous ones; a placement is refused
(and redrawn, up to ``_TRIES`` times) when it would hide more than half of an earlier garment, so
scenes overlap but every garment stays recognisable.  A garment's pixels are those whose resized
Fashion-MNIST value reaches ``GARMENT_THRESHOLD``; its *visible* pixels are those no later garment
covers.  The COCO box is tight around the visible pixels (``[x, y, w, h]`` in pixel edges: it
covers columns ``x .. x+w-1``), ``area`` counts them, and the optional label PNG (``--masks``)
holds each visible pixel's class id 1..10 (0 = background): boxes, areas and masks come from the
same instance map, so occlusion is consistent between them.

Every scene is a function of (seed, split, index) only.  Train scenes use Fashion-MNIST's training
images, val scenes its test images.  Layout of ``OUT``::

    train/000000.jpg ...   val/000000.jpg ...
    annotations/instances_train.json  annotations/instances_val.json
    masks/train/000000.png ...        (with masks=True)

The whole tree is written under a temporary name beside ``OUT`` and renamed at the end.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ...atomic import atomic_dir
from .fashion_mnist import CLASSES, load

CANVASES: Tuple[Tuple[int, int], ...] = ((192, 256), (256, 192), (224, 224), (160, 320), (320, 240))
"""(height, width) of the canvases: landscape, portrait and square."""
GARMENT_THRESHOLD = 40
"""A resized garment pixel with a grey value >= this belongs to the garment."""
GARMENT_SIZES: Tuple[int, int] = (24, 96)
"""Default smallest and largest garment side (pixels, at scale 1)."""
_MAX_HIDDEN = 0.5
_TRIES = 20
_SPLIT_KEYS = {"train": 0, "val": 1}


@dataclass(kw_only=True)
class ScenesConfig:
    """What ``write_fashion_scenes`` produces."""

    train: int = 512
    """Number of training scenes."""
    val: int = 128
    """Number of validation scenes."""
    seed: int = 0
    """Every scene is a function of (seed, split, index)."""
    max_garments: int = 8
    """Garments per scene are drawn uniformly from 1..max_garments."""
    jpeg_quality: int = 90
    """JPEG quality of the written images."""
    masks: bool = False
    """Also write per-pixel label PNGs (class id 1..10, background 0) under masks/<split>/."""
    scale: float = 1.0
    """Canvas and garment sizes times this (0.4: canvases 64x128 .. 128x96, garments 10-38 px, for runs
    on a CPU); 1.0 writes the scenes described above, unchanged."""
    garment_sizes: Tuple[int, int] = GARMENT_SIZES
    """Smallest and largest garment side in pixels, before ``scale`` (never more than the canvas's shorter
    side); larger garments on the same canvases leave less background per garment."""

    def __post_init__(self):
        if self.train < 0 or self.val < 0 or self.train + self.val == 0:
            raise ValueError(f"need a positive number of scenes, got train={self.train} val={self.val}")
        if not 1 <= self.max_garments <= 32:
            raise ValueError(f"max_garments must be in [1, 32], got {self.max_garments}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0.25 <= self.scale <= 4.0:
            raise ValueError(f"scale must be in [0.25, 4], got {self.scale}")
        lo, hi = self.garment_sizes
        if not 8 <= lo <= hi:
            raise ValueError(f"garment_sizes must be (smallest, largest) with 8 <= smallest <= largest, "
                             f"got {tuple(self.garment_sizes)}")


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour gradient plus mild noise (uint8 [h,w,3])."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, cx, cy = rng.uniform(20, 90, 3), rng.uniform(-30, 30, 3) / w, rng.uniform(-30, 30, 3) / h
    img = c0 + xx[..., None] * cx + yy[..., None] * cy + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _scaled(n: int, scale: float) -> int:
    return max(1, int(round(n * scale)))


def render_scene(garments: np.ndarray, labels: np.ndarray, *, seed: int, split: str, index: int,
                 max_garments: int = 8, scale: float = 1.0, garment_sizes: Tuple[int, int] = GARMENT_SIZES
                 ) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """One scene: (RGB uint8 [H,W,3], instance map int32 [H,W] (0 = background, k = k-th garment),
    class ids of the garments, 1..10, in drawing order). ``scale`` multiplies the canvas and garment sizes,
    ``garment_sizes`` is the range of garment sides at scale 1."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_KEYS[split], int(index)]))
    h, w = (_scaled(n, scale) for n in CANVASES[int(rng.integers(len(CANVASES)))])
    smallest, largest = (_scaled(n, scale) for n in garment_sizes)
    image = _background(rng, h, w)
    instances = np.zeros((h, w), np.int32)
    classes: List[int] = []
    for _ in range(int(rng.integers(1, max_garments + 1))):
        for _try in range(_TRIES):
            size = int(rng.integers(min(smallest, h, w), min(largest, h, w) + 1))
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            pick = int(rng.integers(len(garments)))
            grey = _resize(garments[pick], size)
            mask = grey >= GARMENT_THRESHOLD
            region = instances[top:top + size, left:left + size]
            if _hides_too_much(instances, region[mask], len(classes)) or mask.sum() < 16:
                continue
            colour = rng.uniform(0.5, 1.0, 3)
            patch = image[top:top + size, left:left + size]
            patch[mask] = np.clip(grey[mask, None] * colour, 0, 255).astype(np.uint8)
            region[mask] = len(classes) + 1
            classes.append(int(labels[pick]) + 1)
            break
    return image, instances, classes


def _hides_too_much(instances: np.ndarray, covered: np.ndarray, n: int) -> bool:
    """Would covering the instance ids ``covered`` leave any earlier garment less than half visible?"""
    if n == 0:
        return False
    before = np.bincount(instances.ravel(), minlength=n + 1)
    lost = np.bincount(covered.ravel(), minlength=n + 1)
    return bool(np.any(lost[1:] > _MAX_HIDDEN * before[1:]))


def scene_annotations(instances: np.ndarray, classes: List[int], *, image_id: int,
                      first_ann_id: int) -> List[dict]:
    """COCO annotations (tight boxes around each garment's visible pixels)."""
    anns = []
    for k, cls in enumerate(classes, start=1):
        ys, xs = np.nonzero(instances == k)
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": cls,
                     "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                     "area": int(len(xs)), "iscrowd": 0})
    return anns


def label_map(instances: np.ndarray, classes: List[int]) -> np.ndarray:
    """Per-pixel class id (uint8, 0 = background) from the instance map."""
    lut = np.array([0] + list(classes), np.uint8)
    return lut[instances]


def _write_split(root: str, split: str, count: int, cfg: ScenesConfig, source_dir: Optional[str]) -> str:
    import cv2

    garments, labels = load("train" if split == "train" else "test", source_dir)
    os.makedirs(os.path.join(root, split))
    if cfg.masks:
        os.makedirs(os.path.join(root, "masks", split))
    images, anns = [], []
    for i in range(count):
        image, instances, classes = render_scene(garments, labels, seed=cfg.seed, split=split, index=i,
                                                 max_garments=cfg.max_garments, scale=cfg.scale,
                                                 garment_sizes=tuple(cfg.garment_sizes))
        name = f"{i:06d}.jpg"
        ok = cv2.imwrite(os.path.join(root, split, name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                         [int(cv2.IMWRITE_JPEG_QUALITY), cfg.jpeg_quality])
        if not ok:
            raise OSError(f"could not write {os.path.join(root, split, name)}")
        if cfg.masks:
            cv2.imwrite(os.path.join(root, "masks", split, f"{i:06d}.png"), label_map(instances, classes))
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        anns += scene_annotations(instances, classes, image_id=image_id, first_ann_id=len(anns) + 1)
    doc = {"info": {"description": f"fashion-scenes {split} (seed {cfg.seed}) from Fashion-MNIST"},
           "images": images, "annotations": anns,
           "categories": [{"id": k + 1, "name": n, "supercategory": "garment"} for k, n in enumerate(CLASSES)]}
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def write_fashion_scenes(out_dir: str, cfg: Optional[ScenesConfig] = None, *, source_dir: Optional[str] = None,
                         force: bool = False) -> Dict[str, str]:
    """Write the scenes to ``out_dir``; returns {split: annotation JSON path}."""
    cfg = cfg or ScenesConfig()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists; refusing to overwrite it (use --force / force=True)")
    with atomic_dir(out_dir) as tmp:
        os.makedirs(os.path.join(tmp, "annotations"))
        for split, count in (("train", cfg.train), ("val", cfg.val)):
            if count:
                _write_split(tmp, split, count, cfg, source_dir)
    return {s: os.path.join(out_dir, "annotations", f"instances_{s}.json")
            for s, n in (("train", cfg.train), ("val", cfg.val)) if n}
