"""COCO detection: read and check an ``instances_*.json``, write it with its images to a ``.beton``.

Fields of the file (FFCV's pattern for detection, libffcv/ffcv#222: boxes padded to a fixed
maximum plus a count):

  image      RGBImageField, JPEG (``jpeg_quality``), longest side shrunk to ``max_side`` if given
  boxes      float32 [K,4] xyxy in the *original* image's pixels, rows >= num_boxes are zero
  labels     int32 [K] contiguous labels 1..C (categories sorted by COCO id), padding 0
  iscrowd    uint8 [K]
  num_boxes, image_id, orig_h, orig_w   ints (in FFCV's metadata table: cheap to read for all samples)

The sidecar ``<file>.beton.json`` holds the category map (``categories``: COCO id, name and label;
``label_to_category``: COCO id by label, index 0 unused), the annotation file, the options and what
was clipped or skipped.  Written by the writer core (:mod:`fastkd.data.writer`): the .beton and its
sidecar appear under their final names at the end (the sidecar first), a .beton is always complete and
has its map.

Checks (one :class:`CocoFormatError` naming the file and the entry): not JSON, a missing top-level
key, an entry without its keys or with wrong types, duplicate image ids, an annotation whose image or
category does not exist, a bbox that is not four finite numbers, an image file that is missing,
unreadable or whose size differs from its entry, more boxes than ``max_boxes``.  As COCO tools do
(torchvision's ``ConvertCocoPolysToMask``), boxes are clipped to their image and boxes empty after
clipping are skipped: both are counted and reported with the first annotation ids.  Images without
annotations are kept (evaluation needs them; the training loader skips them).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..writer import beton_target, page_size, write_fields

FIELDS = ("image", "boxes", "labels", "iscrowd", "num_boxes", "image_id", "orig_h", "orig_w")


class CocoFormatError(ValueError):
    """An annotation file or an image it names is not usable; the message names the file and entry."""


@dataclass
class CocoImage:
    id: int
    path: str
    height: int
    width: int
    boxes: np.ndarray      # float32 [k,4] xyxy, original pixels
    labels: np.ndarray     # int32 [k]
    iscrowd: np.ndarray    # uint8 [k]


@dataclass
class CocoIndex:
    annotations: str
    images: List[CocoImage]
    categories: List[dict]                                    # {"id", "name", "label"}, sorted by id
    clipped: List[int] = field(default_factory=list)          # annotation ids clipped to their image
    skipped: List[Tuple[int, str]] = field(default_factory=list)  # (annotation id, reason)

    @property
    def label_to_category(self) -> List[int]:
        return [0] + [c["id"] for c in self.categories]


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise CocoFormatError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(doc, dict):
        raise CocoFormatError(f"{path}: top level is a {type(doc).__name__}, expected a COCO object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise CocoFormatError(f"{path}: missing or non-list top-level key {key!r}")
    return doc


def _entry(path: str, kind: str, i: int, entry, keys: Dict[str, type]) -> dict:
    """Check that ``entry`` (the i-th of ``kind``) has ``keys`` of the given types."""
    name = f"{path}: {kind}[{i}]"
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{name} is a {type(entry).__name__}, expected an object")
    if "id" in entry:
        name += f" (id {entry['id']!r})"
    for key, typ in keys.items():
        if key not in entry:
            raise CocoFormatError(f"{name} has no {key!r}")
        if not isinstance(entry[key], typ) or isinstance(entry[key], bool):
            raise CocoFormatError(f"{name}: {key!r} is {entry[key]!r}, expected {typ.__name__}")
    return entry


def _parse_box(path: str, i: int, ann: dict, height: int, width: int):
    """-> (xyxy clipped, was clipped) or (None, reason) for a box empty after clipping."""
    bbox = ann["bbox"]
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise CocoFormatError(f"{path}: annotations[{i}] (id {ann.get('id')!r}): bbox {bbox!r} is not "
                              "four finite numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    raw = (x, y, x + w, y + h)
    box = (min(max(raw[0], 0.0), width), min(max(raw[1], 0.0), height),
           min(max(raw[2], 0.0), width), min(max(raw[3], 0.0), height))
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, "empty" if w <= 0 or h <= 0 else "outside its image"
    return box, box != raw


def load_coco(annotations: str, images_dir: str, *, check_files: bool = True) -> CocoIndex:
    """Read and check a COCO instances file; see the module docstring for what is checked."""
    doc = _load_json(annotations)
    cats = [_entry(annotations, "categories", i, c, {"id": int}) for i, c in enumerate(doc["categories"])]
    by_cat = {}
    for i, c in enumerate(cats):
        if c["id"] in by_cat:
            raise CocoFormatError(f"{annotations}: categories[{i}]: duplicate category id {c['id']}")
        by_cat[c["id"]] = c
    categories = [{"id": cid, "name": str(by_cat[cid].get("name", cid)), "label": k + 1}
                  for k, cid in enumerate(sorted(by_cat))]
    label_of = {c["id"]: c["label"] for c in categories}

    images: Dict[int, CocoImage] = {}
    for i, im in enumerate(doc["images"]):
        im = _entry(annotations, "images", i, im, {"id": int, "file_name": str, "height": int, "width": int})
        if im["id"] in images:
            raise CocoFormatError(f"{annotations}: images[{i}]: duplicate image id {im['id']}")
        if im["height"] < 1 or im["width"] < 1:
            raise CocoFormatError(f"{annotations}: images[{i}] (id {im['id']}): size {im['height']}x{im['width']}")
        images[im["id"]] = CocoImage(im["id"], os.path.join(images_dir, im["file_name"]), im["height"],
                                     im["width"], np.zeros((0, 4), np.float32), np.zeros(0, np.int32),
                                     np.zeros(0, np.uint8))

    per_image: Dict[int, list] = {k: [] for k in images}
    index = CocoIndex(annotations, list(images.values()), categories)
    for i, ann in enumerate(doc["annotations"]):
        ann = _entry(annotations, "annotations", i, ann, {"image_id": int, "category_id": int})
        if "bbox" not in ann:
            raise CocoFormatError(f"{annotations}: annotations[{i}] (id {ann.get('id')!r}) has no 'bbox'")
        if ann["image_id"] not in images:
            raise CocoFormatError(f"{annotations}: annotations[{i}] (id {ann.get('id')!r}) refers to image id "
                                  f"{ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in label_of:
            raise CocoFormatError(f"{annotations}: annotations[{i}] (id {ann.get('id')!r}) has category_id "
                                  f"{ann['category_id']}, which is not in 'categories' ({sorted(label_of)})")
        img = images[ann["image_id"]]
        box, clipped = _parse_box(annotations, i, ann, img.height, img.width)
        if box is None:
            index.skipped.append((ann.get("id", i), clipped))
            continue
        if clipped:
            index.clipped.append(ann.get("id", i))
        per_image[img.id].append((box, label_of[ann["category_id"]], 1 if ann.get("iscrowd", 0) else 0))
    for img in index.images:
        rows = per_image[img.id]
        if rows:
            img.boxes = np.array([r[0] for r in rows], np.float32)
            img.labels = np.array([r[1] for r in rows], np.int32)
            img.iscrowd = np.array([r[2] for r in rows], np.uint8)
    if check_files:
        _check_files(annotations, index.images)
    return index


def _check_files(annotations: str, images: List[CocoImage]) -> None:
    from PIL import Image, UnidentifiedImageError

    for img in images:
        name = f"{annotations}: image id {img.id} ({img.path})"
        if not os.path.isfile(img.path):
            raise CocoFormatError(f"{name}: file not found")
        try:
            with Image.open(img.path) as im:
                w, h = im.size
        except (OSError, UnidentifiedImageError) as e:
            raise CocoFormatError(f"{name}: not a readable image ({e})") from None
        if (h, w) != (img.height, img.width):
            raise CocoFormatError(f"{name}: the file is {h}x{w} but its entry says {img.height}x{img.width}")


class _Samples:
    """Writer samples: one tuple per image in field order; an image that does not decode (or not at the
    size its entry says) raises, and the writer core reports it."""

    def __init__(self, images: List[CocoImage], max_boxes: int):
        self.images, self.max_boxes = images, max_boxes

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return self.images[i].path

    def placeholder(self, i: int):
        k = self.max_boxes
        return (np.zeros((1, 1, 3), np.uint8), np.zeros((k, 4), np.float32), np.zeros(k, np.int32),
                np.zeros(k, np.uint8), 0, 0, 1, 1)

    def __getitem__(self, i: int):
        import cv2

        img = self.images[i]
        pixels = cv2.imread(img.path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if pixels is None or pixels.shape[:2] != (img.height, img.width):
            raise CocoFormatError(f"{img.path}: not decodable at {img.height}x{img.width}")
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        k = len(img.boxes)
        boxes = np.zeros((self.max_boxes, 4), np.float32)
        labels = np.zeros(self.max_boxes, np.int32)
        crowd = np.zeros(self.max_boxes, np.uint8)
        boxes[:k], labels[:k], crowd[:k] = img.boxes, img.labels, img.iscrowd
        return pixels, boxes, labels, crowd, k, img.id, img.height, img.width


@dataclass
class CocoWriteReport:
    path: str
    num_images: int
    num_boxes: int
    empty_images: int
    clipped: List[int]
    skipped: List[Tuple[int, str]]
    seconds: float


def write_coco_beton(images_dir: str, annotations: str, out_path: str, *, jpeg_quality: int = 90,
                     max_side: Optional[int] = None, max_boxes: Optional[int] = None,
                     num_workers: Optional[int] = None, force: bool = False,
                     progress: bool = True) -> CocoWriteReport:
    """COCO images + instances JSON -> ``out_path`` (.beton) and its sidecar ``out_path + '.json'``;
    ``progress``: FFCV's progress bar while writing."""
    from ..base import ffcv_import

    ffcv_import()
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_side is not None and max_side < 32:
        raise ValueError(f"max_side must be at least 32, got {max_side}")
    if os.path.exists(out_path) and not force:
        raise FileExistsError(f"{out_path} exists; refusing to overwrite it (use --force / force=True)")
    t0 = time.perf_counter()
    index = load_coco(annotations, images_dir)
    if not index.images:
        raise CocoFormatError(f"{annotations}: no images")
    most = max(len(im.boxes) for im in index.images)
    if max_boxes is None:
        max_boxes = max(1, most)
    elif most > max_boxes:
        worst = max(index.images, key=lambda im: len(im.boxes))
        raise CocoFormatError(f"{annotations}: image id {worst.id} ({worst.path}) has {most} boxes, more than "
                              f"max_boxes={max_boxes}")
    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=jpeg_quality, max_resolution=max_side),
              "boxes": NDArrayField(np.dtype("<f4"), (max_boxes, 4)),
              "labels": NDArrayField(np.dtype("<i4"), (max_boxes,)),
              "iscrowd": NDArrayField(np.dtype("<u1"), (max_boxes,)),
              "num_boxes": IntField(), "image_id": IntField(), "orig_h": IntField(), "orig_w": IntField()}
    side = max(max(im.height, im.width) for im in index.images)
    side = min(side, max_side) if max_side else side
    # a page holds the largest sample (JPEG <= raw pixels); small pages waste less
    page = page_size(side * side * 3 + max_boxes * 9 + (1 << 16))
    with beton_target(out_path, force=force) as target:
        samples = _Samples(index.images, max_boxes)
        failed = write_fields(target.tmp, fields, samples, placeholder=samples.placeholder,
                              num_workers=num_workers, page=page, chunksize=64, progress=progress)
        if failed:
            paths = [f.where for f in failed]
            raise CocoFormatError(f"{annotations}: {len(failed)} image file(s) could not be decoded: "
                                  f"{', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}")
        report = CocoWriteReport(out_path, len(index.images), sum(len(im.boxes) for im in index.images),
                                 sum(len(im.boxes) == 0 for im in index.images), index.clipped, index.skipped,
                                 time.perf_counter() - t0)
        target.sidecar = {
            "kind": "coco-detection", "annotations": os.path.abspath(annotations),
            "images_dir": os.path.abspath(images_dir), "categories": index.categories,
            "label_to_category": index.label_to_category, "max_boxes": max_boxes,
            "jpeg_quality": jpeg_quality, "max_side": max_side, "num_images": report.num_images,
            "num_boxes": report.num_boxes, "empty_images": report.empty_images,
            "clipped": index.clipped, "skipped": [list(s) for s in index.skipped]}
    return report


def read_sidecar(beton: str) -> dict:
    """The sidecar of a COCO .beton (category map, annotation file); a clear error when absent."""
    path = beton + ".json"
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CocoFormatError(f"{path}: the category map of {beton} is missing or unreadable ({e}); "
                              "write the file with `fastkd data write coco`") from None
    if meta.get("kind") != "coco-detection":
        raise CocoFormatError(f"{beton} is not a COCO detection .beton (its sidecar has kind {meta.get('kind')!r})")
    return meta
