"""Segmentation samples: paired image / label-map folders, and their ``.beton`` form.

A *segmentation source* has ``__len__``, ``__getitem__(i) -> (HxWx3 uint8 RGB, HxW uint8 label map)``,
``describe(i)`` (the files of sample i), ``classes`` and ``num_classes``.

- :class:`SegFolderSource`: every image under ``image_dir`` whose name ends in ``image_suffix`` paired
  with the label map at the same relative path under ``label_dir`` ending in ``label_suffix`` (mmseg's
  ``img_dir`` / ``ann_dir`` convention), label values mapped through an optional 256-entry table
  (Cityscapes' labelId -> trainId). :func:`fashion_scenes` is the layout of ``fastkd data write
  fashion-scenes OUT --masks`` (``OUT/<split>/*.jpg`` + ``OUT/masks/<split>/*.png``, 0 = background).
- :func:`write_seg_beton`: a source -> ``.beton`` with fields ``image`` (the encoded image: the source
  file's PNG bytes as they are, or JPEG), ``label`` (PNG bytes of the mapped label map), ``height``,
  ``width``; written by the writer core (:mod:`fastkd.data.writer`, atomically); a ``<file>.json`` sidecar
  keeps the classes, ``num_classes`` and ``ignore_index``.
- :class:`BetonSegSource`: reads such a file back by random access (memory-mapped), in any process.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..writer import beton_target, page_size, write_fields
from .transforms import IGNORE_INDEX

FASHION_SCENES_CLASSES = ("background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class SegDataError(ValueError):
    """A dataset problem a user can fix; the message names the file."""


def decode_image(data: np.ndarray, where: str) -> np.ndarray:
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise SegDataError(f"{where}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_label(data: np.ndarray, where: str) -> np.ndarray:
    """An 8-bit single-channel PNG (grey or palette: the stored indices, as mmseg reads them)."""
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data.tobytes())) as im:
            if im.mode not in ("L", "P"):
                raise SegDataError(f"{where}: a label map must be an 8-bit single-channel PNG, got mode {im.mode}")
            return np.asarray(im, dtype=np.uint8).copy()
    except SegDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds; the file is what matters
        raise SegDataError(f"{where}: not a readable label map ({type(exc).__name__}: {exc})") from None


def _read(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def _size(path: str) -> Tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as exc:  # noqa: BLE001
        raise SegDataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


class SegFolderSource:
    """Paired image / label files (see the module docstring); checks pairing and sizes up front."""

    def __init__(self, image_dir: str, label_dir: str, *, image_suffix: str, label_suffix: str,
                 classes: Sequence[str], lut: Optional[np.ndarray] = None, check_sizes: bool = True):
        for what, d in (("image", image_dir), ("label", label_dir)):
            if not os.path.isdir(d):
                raise SegDataError(f"{what} directory not found: {d}")
        self.classes, self.num_classes = tuple(classes), len(classes)
        if lut is not None and (lut.shape != (256,) or lut.dtype != np.uint8):
            raise ValueError(f"lut must be uint8 [256], got {lut.dtype}{list(lut.shape)}")
        self.lut = lut
        self.pairs: List[Tuple[str, str]] = []
        self.max_pixels = 0
        for dirpath, _, files in sorted(os.walk(image_dir)):
            for name in sorted(files):
                if not name.endswith(image_suffix):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), image_dir)
                label = os.path.join(label_dir, rel[: len(rel) - len(image_suffix)] + label_suffix)
                if not os.path.isfile(label):
                    raise SegDataError(f"{os.path.join(image_dir, rel)}: its label map {label} does not exist")
                self.pairs.append((os.path.join(image_dir, rel), label))
        if not self.pairs:
            raise SegDataError(f"no images ending in {image_suffix!r} under {image_dir}")
        if check_sizes:
            for image, label in self.pairs:
                size = _size(image)
                if size != _size(label):
                    raise SegDataError(f"{image} is {size} (h, w) but its label map {label} is {_size(label)}")
                self.max_pixels = max(self.max_pixels, size[0] * size[1])

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, i: int) -> str:
        return f"{self.pairs[i][0]} + {self.pairs[i][1]}"

    def encoded(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image file bytes, label map) of sample i; the label mapped through the table."""
        image_path, label_path = self.pairs[i]
        label = decode_label(_read(label_path), label_path)
        return _read(image_path), (self.lut[label] if self.lut is not None else label)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        data, label = self.encoded(i)
        image = decode_image(data, self.pairs[i][0])
        if image.shape[:2] != label.shape:
            raise SegDataError(f"{self.describe(i)}: image {image.shape[:2]} and label {label.shape} sizes differ")
        return image, label


def fashion_scenes(root: str, split: str) -> SegFolderSource:
    """The fashion-scenes layout: ``root/<split>/NNNNNN.jpg`` + ``root/masks/<split>/NNNNNN.png``."""
    masks = os.path.join(root, "masks", split)
    if not os.path.isdir(masks):
        raise SegDataError(f"{root} has no label maps for split {split!r} ({masks} is missing: write the "
                           f"scenes with --masks)")
    return SegFolderSource(os.path.join(root, split), masks, image_suffix=".jpg", label_suffix=".png",
                           classes=FASHION_SCENES_CLASSES)


# ---------------------------------------------------------------------------------------------------------
# .beton


class _Encoded:
    """The writer core's view of a source: (image bytes, label PNG bytes, h, w); a failing sample raises
    and is reported by the core, naming its files."""

    placeholder = (np.zeros(1, np.uint8), np.zeros(1, np.uint8), 0, 0)

    def __init__(self, source, image_format: str, jpeg_quality: int):
        self.source, self.image_format, self.quality = source, image_format, jpeg_quality

    def __len__(self) -> int:
        return len(self.source)

    def describe(self, i: int) -> str:
        return self.source.describe(i)

    def __getitem__(self, i: int):
        data, label = self.source.encoded(i)
        is_png = data[:8].tobytes() == b"\x89PNG\r\n\x1a\n"
        if self.image_format == "jpg" or not is_png:  # re-encode (PNG files pass through untouched)
            image = decode_image(data, self.source.describe(i))
            if image.shape[:2] != label.shape:
                raise SegDataError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
            ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, self.quality]) if self.image_format == "jpg" \
                else (".png", [])
            data = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)[1].ravel()
        png = cv2.imencode(".png", label)[1].ravel()
        return data, png, label.shape[0], label.shape[1]


def write_seg_beton(source, out_path: str, *, image_format: str = "png", jpeg_quality: int = 95,
                    num_workers: Optional[int] = None, force: bool = False, progress: bool = True) -> int:
    """Write ``source`` to ``out_path``; returns the number of samples. ``image_format``: 'png' (PNG files
    kept byte for byte, other files re-encoded losslessly) or 'jpg' (re-encoded at ``jpeg_quality``);
    ``progress``: FFCV's progress bar while writing."""
    from ..base import ffcv_import

    ffcv_import()
    from ffcv.fields import BytesField, IntField

    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    # FFCV page (a sample must fit in one): room for a raw RGB image and its label map, at least 8 MiB
    page = page_size(getattr(source, "max_pixels", 0) * 4 + (1 << 16), 1 << 23)
    fields = {"image": BytesField(), "label": BytesField(), "height": IntField(), "width": IntField()}
    with beton_target(out_path, force=force) as target:
        failures = write_fields(target.tmp, fields, _Encoded(source, image_format, jpeg_quality),
                                placeholder=_Encoded.placeholder, num_workers=num_workers, page=page,
                                chunksize=16, progress=progress)
        if failures:
            listed = [f"{f.where}: {f.reason}" for f in failures[:3]]
            more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
            raise SegDataError(f"cannot write {out_path}: " + "; ".join(listed) + more)
        target.sidecar = {"task": "segmentation", "num_samples": len(source), "classes": list(source.classes),
                          "num_classes": source.num_classes, "ignore_index": IGNORE_INDEX,
                          "image_format": image_format}
    return len(source)


class BetonSegSource:
    """Random access to a segmentation ``.beton`` (memory-mapped; opened lazily in each process)."""

    def __init__(self, path: str):
        from ..base import ffcv_import

        ffcv_import()
        from ffcv.reader import Reader

        if not os.path.isfile(path):
            raise FileNotFoundError(f"segmentation .beton {path!r} not found (write one with `fastkd data write`)")
        reader = Reader(path)
        names = dict(zip(reader.field_names, reader.metadata.dtype.names))
        if "image" not in names or "label" not in names:
            raise SegDataError(f"{path}: fields {reader.field_names}, expected 'image' and 'label' "
                               "(written by `fastkd data write cityscapes|seg-folder`)")
        self.path = path
        self.image_meta = np.asarray(reader.metadata[names["image"]]).copy()
        self.label_meta = np.asarray(reader.metadata[names["label"]]).copy()
        try:
            with open(path + ".json") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
        self.classes = tuple(meta.get("classes", ()))
        self.num_classes = int(meta.get("num_classes", len(self.classes)))
        self._data = None

    def __len__(self) -> int:
        return len(self.image_meta)

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    def describe(self, i: int) -> str:
        return f"{self.path}[{i}]"

    def _bytes(self, meta, i: int) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        ptr, size = int(meta[i]["ptr"]), int(meta[i]["size"])
        return np.asarray(self._data[ptr:ptr + size])

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        where = self.describe(i)
        image = decode_image(self._bytes(self.image_meta, i), where)
        label = decode_label(self._bytes(self.label_meta, i), where)
        if image.shape[:2] != label.shape:
            raise SegDataError(f"{where}: image {image.shape[:2]} and label {label.shape} sizes differ")
        return image, label
