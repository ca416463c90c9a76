"""ImageFolder trees (``root/<class>/<image>``): scanning and decoding to RGB uint8.

Classes are the sorted sub-directory names, labels their positions (torchvision's convention, so a
model trained here keeps the same class indices elsewhere).  Every PIL mode is converted to RGB:
grey (L, I;16), palette (P), CMYK, RGBA/LA (alpha dropped).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp")


class CorruptImageError(ValueError):
    """An image file could not be decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"corrupt or unreadable image {path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageFolderIndex:
    root: str
    classes: Tuple[str, ...]
    samples: Tuple[Tuple[str, int], ...]  # (path, label)

    def __len__(self) -> int:
        return len(self.samples)


def scan(root: str, extensions: Sequence[str] = IMG_EXTENSIONS) -> ImageFolderIndex:
    """List ``root/<class>/**/<file>`` with an image extension, in a stable (sorted) order."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder root {root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"ImageFolder root {root!r} has no class sub-directories")
    exts = tuple(e.lower() for e in extensions)
    samples: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames.sort()
            samples.extend((os.path.join(dirpath, f), label) for f in sorted(filenames)
                           if f.lower().endswith(exts) and not f.startswith("."))
    if not samples:
        raise ValueError(f"ImageFolder root {root!r} has no images with extensions {exts}")
    return ImageFolderIndex(root=root, classes=tuple(classes), samples=tuple(samples))


def probe(path: str) -> None:
    """Cheap check (header only): raise CorruptImageError when PIL cannot even identify ``path``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - identification happens in open(); size must be known
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e


def load_rgb(path: str) -> np.ndarray:
    """Decode ``path`` fully -> HxWx3 uint8 RGB; CorruptImageError names the file on failure."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # full decode: truncated files fail here, not later in a worker
            if im.mode == "I;16" or im.mode == "I":  # 16/32-bit grey: scale to 8 bits
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode == "I;16" else max(float(arr.max()), 1.0)
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CorruptImageError(path, f"decoded to an unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)
