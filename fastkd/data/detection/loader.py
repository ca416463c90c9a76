"""Detection loaders over a COCO ``.beton`` (:mod:`fastkd.data.detection.coco`): FFCV, and a PyTorch
DataLoader that reads the very same file (for comparison and for machines without FFCV's JIT).

Both: decode the JPEG, resize keeping the aspect ratio (:func:`~fastkd.data.detection.batch.resized_hw`),
pad to the batch's bucket shape, flip per (seed, epoch, sample), scale and flip the boxes, and yield
:class:`~fastkd.data.detection.batch.DetectionBatch` with uint8 images; :func:`~fastkd.data.detection.batch.to_device`
normalises on the device.  FFCV does decode + resize + pad in one JIT-compiled parallel pass into
its preallocated buffers (libjpeg-turbo and OpenCV's INTER_AREA through libffcv); the DataLoader
does the same per sample in worker processes with OpenCV.  Boxes, order, flips and bucket shapes
are identical on both; pixels agree up to the two JPEG/resize builds (measured in the tests).

Order (:func:`~fastkd.data.detection.batch.grouped_order`), sharding and position are fastkd's:
``set_epoch``, ``skip_batches``, ``state_dict``/``load_state_dict`` resume exactly mid-epoch.
Training skips images without boxes (``skip_empty``); evaluation reads every image exactly once
over all ranks.  FFCV's buffers are reused: a batch is valid until ``batches_ahead + 2`` more are
drawn.
"""
from __future__ import annotations

import abc
import os
from typing import Iterator, List, Optional

import numpy as np
import torch

from ..base import DataPosition, KeySampler, cpu_count
from .batch import (DetectionBatch, batch_bucket, bucket_shapes, flip_draw, flip_region_, grouped_order,
                        resized_hw, transform_boxes)
from .coco import read_sidecar


class _Index:
    """Per-sample numbers every loader needs, from the .beton's metadata table (no page reads)."""

    def __init__(self, path: str):
        from ..base import ffcv_import

        ffcv_import()
        from ffcv.reader import Reader

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (write it with `fastkd data write coco`)")
        reader = Reader(path)
        names = dict(zip(reader.field_names, reader.metadata.dtype.names))
        missing = [f for f in ("image", "boxes", "labels", "iscrowd", "num_boxes", "image_id", "orig_h", "orig_w")
                   if f not in names]
        if missing:
            raise ValueError(f"{path} is not a COCO detection .beton: no field(s) {missing}")
        meta = reader.metadata
        image = meta[names["image"]]
        if np.any(image["mode"] != 0):
            raise ValueError(f"{path}: images must be stored as JPEG")
        self.names, self.reader = names, reader
        self.height, self.width = image["height"].astype(np.int64), image["width"].astype(np.int64)
        self.num_boxes = meta[names["num_boxes"]].astype(np.int64)
        self.image_id = meta[names["image_id"]].astype(np.int64)
        self.orig_h, self.orig_w = meta[names["orig_h"]].astype(np.int64), meta[names["orig_w"]].astype(np.int64)
        self.num_samples = int(reader.num_samples)


class DetectionLoader(DataPosition, abc.ABC):
    """Shared order, position and batch assembly; subclasses decode (``_iterate``)."""

    backend = "base"
    position_keys = ("seed", "batch_size", "world_size", "grad_accum", "num_samples")

    def __init__(self, path: str, *, train: bool, batch_size: int, min_size: int = 800, max_size: int = 1333,
                 flip_prob: Optional[float] = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: Optional[bool] = None, drop_last: Optional[bool] = None,
                 skip_empty: Optional[bool] = None, grad_accum: int = 1):
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size} and {max_size}")
        self.path, self.meta, self.index = path, read_sidecar(path), _Index(path)
        self.label_to_category: List[int] = self.meta["label_to_category"]
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.flip_prob = (0.5 if train else 0.0) if flip_prob is None else float(flip_prob)
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.grad_accum = int(grad_accum)
        self.shuffle = train if shuffle is None else bool(shuffle)
        self.drop_last = train if drop_last is None else bool(drop_last)
        idx = self.index
        self.landscape = idx.width >= idx.height
        self.sizes = [resized_hw(int(h), int(w), self.min_size, self.max_size) for h, w in zip(idx.height, idx.width)]
        empty_ok = not (train if skip_empty is None else skip_empty)
        self.candidates = np.arange(idx.num_samples) if empty_ok else np.nonzero(idx.num_boxes > 0)[0]
        self.num_samples = len(self.candidates)
        self._reset_position()
        self._len = -(-len(self.order(0)) // self.batch_size)
        if self._len == 0:
            raise ValueError(f"{path}: {self.num_samples} images give no batch of {batch_size} on rank "
                             f"{rank}/{world_size} (drop_last={self.drop_last})")

    @property
    def buckets(self):
        """(landscape, portrait, mixed) padded (H, W) shapes this loader produces."""
        return bucket_shapes(self.min_size, self.max_size)

    # -- order (the position: fastkd.data.base.DataPosition) ---------------------------------
    def __len__(self) -> int:
        return self._len

    def order(self, epoch: int) -> np.ndarray:
        return grouped_order(self.landscape, self.candidates, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                             rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                             drop_last=self.drop_last, grad_accum=self.grad_accum)

    def __iter__(self) -> Iterator[DetectionBatch]:
        epoch, start = self.epoch, self._start_batch
        order = self.order(epoch)[start * self.batch_size:]
        self._position = start
        it = self._iterate(order)
        try:
            for k, (images, boxes, labels, crowd) in enumerate(it):
                picks = order[k * self.batch_size:(k + 1) * self.batch_size]
                self._position += 1
                yield self._finish(images, picks, boxes, labels, crowd, epoch)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self.set_epoch(epoch + 1)

    def bucket_of(self, picks: np.ndarray):
        return batch_bucket(self.landscape[picks], self.min_size, self.max_size)

    def _finish(self, images: torch.Tensor, picks: np.ndarray, boxes, labels, crowd, epoch: int) -> DetectionBatch:
        """uint8 [n,Hb,Wb,3] images + per-sample stored boxes -> flipped images, targets."""
        idx, targets = self.index, []
        for i, s in enumerate(picks.tolist()):
            k, size, orig = int(idx.num_boxes[s]), self.sizes[s], (int(idx.orig_h[s]), int(idx.orig_w[s]))
            flipped = flip_draw(self.seed, epoch, s, self.flip_prob)
            if flipped:
                flip_region_(images, i, size)
            targets.append({
                "boxes": torch.from_numpy(transform_boxes(np.asarray(boxes[i])[:k], orig, size, flipped)),
                "labels": torch.from_numpy(np.asarray(labels[i])[:k].astype(np.int64)),
                "iscrowd": torch.from_numpy(np.array(crowd[i][:k], dtype=np.uint8)),
                "image_id": int(idx.image_id[s]), "orig_size": orig, "size": size,
                "scale": min(self.min_size / min(orig), self.max_size / max(orig)), "flipped": flipped})
        return DetectionBatch(images=images.permute(0, 3, 1, 2), targets=targets)

    @abc.abstractmethod
    def _iterate(self, order: np.ndarray):
        """Yield (uint8 [n,Hb,Wb,3] tensor, boxes, labels, iscrowd) per batch of ``order`` (stored values)."""


class FFCVDetectionLoader(DetectionLoader):
    backend = "ffcv"

    def __init__(self, path: str, *, num_workers: Optional[int] = None, os_cache: bool = True,
                 batches_ahead: int = 2, **kwargs):
        from ..base import ffcv_import

        ffcv_import()
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import ToTensor

        from ..ffcv_util import GivenOrder, TorchThreads
        from .ffcv_decoder import ResizePadDecoder

        super().__init__(path, **kwargs)
        workers = max(1, min(int(num_workers) if num_workers else cpu_count(), cpu_count()))
        pipelines = {"image": [ResizePadDecoder(self.min_size, self.max_size), ToTensor()],
                     "boxes": [NDArrayDecoder()], "labels": [NDArrayDecoder()], "iscrowd": [NDArrayDecoder()],
                     "num_boxes": None, "image_id": None, "orig_h": None, "orig_w": None}
        self._threads = TorchThreads()
        self._loader = Loader(path, batch_size=self.batch_size, num_workers=workers, os_cache=os_cache,
                              order=OrderOption.SEQUENTIAL, drop_last=False, batches_ahead=batches_ahead,
                              pipelines=pipelines)
        self._threads.restore()
        self._loader.traversal_order = GivenOrder(self._loader)
        self.num_workers = workers

    def _iterate(self, order: np.ndarray):
        self._loader.traversal_order.next_order = order.astype(np.uint64)
        it = iter(self._loader)
        try:
            for k, (flat, boxes, labels, crowd) in enumerate(it):
                self._threads.restore()  # the iterator thread set it before batch 0
                n = flat.shape[0]
                hb, wb = self.bucket_of(order[k * self.batch_size:k * self.batch_size + n])
                yield flat[:, :hb * wb * 3].view(n, hb, wb, 3), boxes, labels, crowd
        finally:
            it.close()


class _BetonSamples(torch.utils.data.Dataset):
    """Sample ``i`` of a COCO .beton decoded, resized and padded to ``bucket`` by OpenCV (in a worker)."""

    def __init__(self, path: str, index: _Index, sizes):
        self.path, self.sizes = path, sizes
        n = index.names
        meta = index.reader.metadata
        self.ptrs = {f: (meta[n[f]]["data_ptr"] if f == "image" else meta[n[f]]).astype(np.int64)
                     for f in ("image", "boxes", "labels", "iscrowd")}
        table = index.reader.alloc_table
        self.nbytes = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self.shapes = {"boxes": (np.float32, 4), "labels": (np.int32, 1), "iscrowd": (np.uint8, 1)}
        self.k = index.num_boxes
        self._data = None

    def __len__(self) -> int:
        return len(self.k)

    def _read(self, field: str, i: int) -> np.ndarray:
        ptr = int(self.ptrs[field][i])
        if field == "image":
            return np.asarray(self._data[ptr:ptr + self.nbytes[ptr]])
        dtype, cols = self.shapes[field]
        k = int(self.k[i])
        raw = np.frombuffer(self._data[ptr:ptr + k * cols * np.dtype(dtype).itemsize].tobytes(), dtype)
        return raw.reshape(k, 4) if cols == 4 else raw

    def __getitem__(self, key):
        import cv2

        i, bucket = key
        if self._data is None:  # opened in each worker process
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        bgr = cv2.imdecode(self._read("image", i), cv2.IMREAD_COLOR)
        rh, rw = self.sizes[i]
        out = np.zeros((bucket[0], bucket[1], 3), np.uint8)
        out[:rh, :rw] = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (rw, rh), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(out), self._read("boxes", i), self._read("labels", i), self._read("iscrowd", i)


def _collate(samples):
    images, boxes, labels, crowd = zip(*samples)
    return torch.stack(images), list(boxes), list(labels), list(crowd)




class TorchDetectionLoader(DetectionLoader):
    backend = "torch"

    def __init__(self, path: str, *, num_workers: int = 0, prefetch_factor: int = 2, **kwargs):
        super().__init__(path, **kwargs)
        self.num_workers = max(0, min(int(num_workers), cpu_count()))
        self._sampler = KeySampler()
        workers = self.num_workers
        self._loader = torch.utils.data.DataLoader(
            _BetonSamples(path, self.index, self.sizes), batch_size=self.batch_size, sampler=self._sampler,
            num_workers=workers, collate_fn=_collate, persistent_workers=workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None)

    def _iterate(self, order: np.ndarray):
        b = self.batch_size
        buckets = [self.bucket_of(order[k:k + b]) for k in range(0, len(order), b)]
        self._sampler.keys = [(int(s), buckets[j // b]) for j, s in enumerate(order)]
        yield from self._loader


def make_loader(path: str, *, source: str = "ffcv", **kwargs) -> DetectionLoader:
    """'ffcv' or 'torch' loader over the COCO .beton ``path`` (see :class:`DetectionLoader` for options)."""
    if source == "ffcv":
        return FFCVDetectionLoader(path, **kwargs)
    if source == "torch":
        kwargs.pop("os_cache", None)
        kwargs.pop("batches_ahead", None)
        return TorchDetectionLoader(path, **kwargs)
    raise ValueError(f"detection loader source {source!r} is not 'ffcv' or 'torch'")


OPTIONS = ("min_size", "max_size", "flip_prob")
"""The keys of ``data.kwargs`` the loaders read (the task reads others: ``val_batch_size``, ``max_dets``, ...)."""
VAL_BATCH_SIZE = None  # the train batch


def build_loader(data, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu", grad_accum: int = 1, dtype=None, channels_last: bool = False) -> DetectionLoader:
    """The ``split`` loader of this rank (``fastkd.data.build_loader``'s signature) from ``data``: ``source``
    'ffcv' or 'torch', ``path`` / ``val_path`` COCO .beton files, ``num_workers``, ``kwargs`` :data:`OPTIONS`.
    Train: shuffled, flipped (``flip_prob``, default 0.5), grouped by orientation, empty images skipped,
    drop_last; other splits: file order, no flip, every image once over all ranks. Images stay uint8 on the
    CPU (``device``, ``dtype``: :func:`fastkd.data.detection.batch.to_device` on the task's side)."""
    train = split == "train"
    path = data.path if train else (data.val_path or data.path)
    if path is None:
        raise ValueError("data.path: the detection loaders need a COCO .beton (fastkd data write coco)")
    kw = data.kwargs or {}
    common = dict(source=data.source, min_size=kw.get("min_size", 800), max_size=kw.get("max_size", 1333),
                  seed=seed, rank=rank, world_size=world_size, num_workers=data.num_workers)
    if train:
        return make_loader(path, train=True, batch_size=batch_size, flip_prob=kw.get("flip_prob", 0.5),
                           grad_accum=grad_accum, **common)
    return make_loader(path, train=False, batch_size=batch_size, **common)
