"""Writing ``.beton`` files (FFCV) from indexable sample sources, and reading them back raw.

A *source* is any object with ``__len__``, ``__getitem__(i) -> (HxWx3 uint8 RGB, int label)`` and
``describe(i) -> str`` (the file a sample comes from, for error messages).  Optional:
``probe(i)`` (cheap header check, raises CorruptImageError), ``max_side(i)``.

Every file holds two fields: ``image`` (RGBImageField) and ``label`` (IntField).  Files are written
through the writer core (:mod:`fastkd.data.writer`: atomically, an interrupted write never leaves a
half-written file under the final name); a ``<file>.json`` sidecar records the classes, counts,
options and the skipped files.  Fashion-MNIST's IDX files become ``train.beton`` / ``test.beton`` with
:func:`write_fashion_mnist_beton`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..sources import fashion_mnist
from ..writer import MIN_PAGE, beton_target, page_size, progress_bar, write_fields
from .imagefolder import CorruptImageError, ImageFolderIndex, load_rgb, probe, scan

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
ON_CORRUPT = ("skip", "error")
_PLACEHOLDER = (np.zeros((1, 1, 3), np.uint8), -1)  # written in place of a failing sample (then left out)


@dataclass
class WriteReport:
    path: str
    num_samples: int
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (file, reason)
    seconds: float = 0.0
    classes: Tuple[str, ...] = ()


class ImageFolderSource:
    """ImageFolder tree as a writer source (decodes with PIL, converts every mode to RGB)."""

    def __init__(self, index: ImageFolderIndex):
        self.index = index
        self.classes = index.classes

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, i: int):
        path, label = self.index.samples[i]
        return load_rgb(path), label

    def describe(self, i: int) -> str:
        return self.index.samples[i][0]

    def probe(self, i: int) -> int:
        """Header check; returns the longest side in pixels."""
        from PIL import Image

        path = self.index.samples[i][0]
        probe(path)
        with Image.open(path) as im:
            return max(im.size)


class ArraySource:
    """In-memory images ``[N,H,W]`` (grey, replicated to RGB) or ``[N,H,W,3]`` with labels ``[N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "array",
                 classes: Sequence[str] = ()):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
            raise ValueError(f"{name}: need uint8 [N,H,W(,3)] images and N labels, got "
                             f"{images.dtype}{list(images.shape)} and {len(labels)} labels")
        self.images, self.labels, self.name, self.classes = images, labels, name, tuple(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        return np.ascontiguousarray(img), int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def probe(self, i: int) -> int:
        return max(self.images.shape[1:3])


def _page_size(max_side: int, max_resolution: Optional[int]) -> int:
    side = min(max_side, max_resolution) if max_resolution else max_side
    return page_size(side * side * 3 + (1 << 16), 4 * MIN_PAGE)


class _Labelled:
    """A source as FFCV's writer reads it: (image, int label)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        img, label = self.source[i]
        return img, int(label)

    def describe(self, i: int) -> str:
        return self.source.describe(i)


def write_beton(source, out_path: str, *, write_mode: str = "proportion",
                max_resolution: Optional[int] = None, jpeg_quality: int = 90,
                compress_probability: float = 0.5, smart_threshold: Optional[int] = None,
                num_workers: Optional[int] = None, force: bool = False, on_corrupt: str = "skip",
                progress: bool = True, chunksize: int = 100) -> WriteReport:
    """Write ``source`` to ``out_path`` (.beton): fields ``image`` (RGB) and ``label`` (int).

    write_mode: 'raw' (exact pixels), 'jpg', 'smart' (JPEG when raw would exceed
    ``smart_threshold`` bytes), 'proportion' (JPEG with probability ``compress_probability``).
    max_resolution: longest side after resizing (INTER_AREA, only shrinks); None keeps sizes.
    on_corrupt: 'skip' (leave the file out, count and name it in the report) or 'error' (raise
    CorruptImageError naming the file; nothing is written under ``out_path``).
    """
    from ..base import ffcv_import

    ffcv_import()
    from ffcv.fields import IntField, RGBImageField

    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode {write_mode!r} is not one of {WRITE_MODES}")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt {on_corrupt!r} is not one of {ON_CORRUPT}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if os.path.exists(out_path) and not force:
        raise FileExistsError(f"{out_path} exists; refusing to overwrite it (use --force / force=True)")
    t0 = time.perf_counter()

    # 1. Cheap header pass: finds unreadable files before the long write, and the largest image.
    skipped: List[Tuple[str, str]] = []
    good: List[int] = []
    max_side = 1
    for i in progress_bar(range(len(source)), len(source), "checking", progress):
        try:
            max_side = max(max_side, source.probe(i) if hasattr(source, "probe") else 1)
            good.append(i)
        except CorruptImageError as e:
            if on_corrupt == "error":
                raise
            skipped.append((e.path, e.reason))
    if not good:
        raise ValueError(f"no readable samples to write to {out_path} ({len(skipped)} skipped)")

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                     smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability),
              "label": IntField()}
    with beton_target(out_path, force=force) as target:
        # 2. Full decode while writing; a file that fails here is reported (a 1x1 placeholder is written).
        # 3. Failures found in 2 -> stop (error) or write again without them (skip; rare).
        for _attempt in range(2):
            failures = write_fields(target.tmp, fields, _Labelled(source), placeholder=_PLACEHOLDER,
                                    indices=np.asarray(good), num_workers=num_workers,
                                    page=_page_size(max_side, max_resolution), chunksize=chunksize,
                                    progress=progress)
            if not failures:
                break
            if on_corrupt == "error":
                listing = "; ".join(f"{f.where} ({f.reason})" for f in failures[:5])
                more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
                err = CorruptImageError(failures[0].where, failures[0].reason)
                err.args = (f"{len(failures)} corrupt image(s): {listing}{more}",)
                raise err
            skipped.extend((f.where, f.reason) for f in failures)
            bad = {f.index for f in failures}
            good = [i for i in good if i not in bad]
            if not good:
                raise ValueError(f"no readable samples to write to {out_path}")
        else:  # pragma: no cover - the second pass decodes the same files as the first
            raise RuntimeError(f"samples kept failing while writing {out_path}")
        report = WriteReport(path=out_path, num_samples=len(good), skipped=skipped,
                             seconds=time.perf_counter() - t0, classes=tuple(getattr(source, "classes", ())))
        target.sidecar = {**asdict(report), "write_mode": write_mode, "max_resolution": max_resolution,
                          "jpeg_quality": jpeg_quality, "compress_probability": compress_probability}
    return report


def write_imagefolder_beton(root: str, out_path: str, **kwargs) -> WriteReport:
    """ImageFolder tree -> .beton (see :func:`write_beton` for the options)."""
    return write_beton(ImageFolderSource(scan(root)), out_path, **kwargs)


def num_samples(path: str) -> int:
    """Samples in a .beton file (reads the header only)."""
    from ..base import ffcv_import

    ffcv_import()
    from ffcv.reader import Reader

    return int(Reader(path).num_samples)


def read_beton(path: str) -> Iterator[Tuple[np.ndarray, int]]:
    """Every sample of a .beton as stored: (HxWx3 uint8 RGB, label), JPEGs decoded, no resizing.

    For inspection and tests; training reads through :mod:`fastkd.data.classification.ffcv_loader`.
    """
    import cv2

    from ..base import ffcv_import

    ffcv_import()
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    reader = Reader(path)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    names = dict(zip(reader.field_names, reader.metadata.dtype.names))  # stored as f0, f1, ...
    if "image" not in names or "label" not in names:
        raise ValueError(f"{path}: fields {reader.field_names}, expected 'image' and 'label'")
    for meta in reader.metadata:
        img_meta = meta[names["image"]]
        ptr = int(img_meta["data_ptr"])
        raw = np.asarray(data[ptr:ptr + sizes[ptr]])
        h, w = int(img_meta["height"]), int(img_meta["width"])
        if img_meta["mode"] == IMAGE_MODES["jpg"]:
            img = cv2.cvtColor(cv2.imdecode(raw, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            img = raw[: h * w * 3].reshape(h, w, 3).copy()
        yield img, int(meta[names["label"]])


def write_fashion_mnist_beton(out_dir: str, *, source_dir: Optional[str] = None,
                              cache_dir: Optional[str] = None, force: bool = False,
                              write_mode: str = "raw", num_workers: Optional[int] = None,
                              progress: bool = True) -> Dict[str, str]:
    """Write ``out_dir/train.beton`` and ``out_dir/test.beton``; returns {split: path}.

    Raw mode keeps every pixel exact (about 140 MB for the training split).
    """
    directory = source_dir or fashion_mnist.locate(cache_dir)
    if source_dir is None:
        fashion_mnist.verify(directory)
    os.makedirs(out_dir, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        path = os.path.join(out_dir, f"{split}.beton")
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} exists; refusing to overwrite it (use --force / force=True)")
        out[split] = path
    for split, path in out.items():
        images, labels = fashion_mnist.load(split, directory)
        write_beton(ArraySource(images, labels, name=f"fashion-mnist/{split}", classes=fashion_mnist.CLASSES), path,
                    write_mode=write_mode, num_workers=num_workers, force=force, progress=progress,
                    on_corrupt="error", chunksize=1000)
    return out
