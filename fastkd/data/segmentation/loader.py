"""Segmentation loaders: ``SegBatch`` es of images and label maps, sharded, seeded, resumable.

``for batch in loader``: ``batch.images`` uint8 [N, 3, H, W] (pinned on a CUDA run; normalised on the
device by the task's ``to_device``), ``batch.labels`` uint8 [N, H, W] (255 = ignored), ``batch.sizes``
int64 [N, 2] (each image's own H, W).  Training: every sample through
:class:`fastkd.data.segmentation.transforms.SegTrainTransform` (the crop size fixes H, W); eval: images and
labels as stored, a batch padded at the bottom/right to its largest image (image 0, label 255); evaluation runs
each image at its own size (:meth:`fastkd.tasks.segmentation.SegmentationTask.area_counts`).

Order, sharding, ``set_epoch``, ``len``, ``state_dict`` / ``load_state_dict`` are the classification
loaders' (:class:`fastkd.data.base.EpochLoader`): the same seed gives the same samples, crops, flips
and colours on every run, any worker count, and after a resume.  Decoding and augmentation run in
PyTorch DataLoader workers; ``.beton`` files are read by random access (:class:`BetonSegSource`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..base import EpochLoader, KeySampler, cpu_count
from ..format import resolve_beton
from .transforms import IGNORE_INDEX, SegTrainTransform


@dataclass
class SegBatch:
    images: torch.Tensor
    """uint8 [N, 3, H, W] from the loader; float, normalised, on the device after ``to_device``."""
    labels: torch.Tensor
    """uint8 [N, H, W] from the loader (int64 after ``to_device``); 255 = ignored."""
    sizes: Optional[torch.Tensor] = None
    """int64 [N, 2], on the CPU: each image's own (H, W) at the top left of the padded batch (None: all
    fill it)."""

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> "SegBatch":
        return SegBatch(self.images.pin_memory(), self.labels.pin_memory(), self.sizes)

    def same_size_groups(self) -> List[Tuple[Tuple[int, int], List[int]]]:
        """[((h, w), indices)]: the images of each size, in the order sizes first appear."""
        full = (int(self.images.shape[-2]), int(self.images.shape[-1]))
        if self.sizes is None:
            return [(full, list(range(len(self))))]
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, (h, w) in enumerate(self.sizes.tolist()):
            groups.setdefault((h, w), []).append(i)
        return list(groups.items())


class _Samples(Dataset):
    def __init__(self, source, transform: Optional[SegTrainTransform]):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, epoch = key
        image, label = self.source[index]
        if self.transform is not None:
            image, label = self.transform(image, label, index, epoch)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label))


def collate(samples, ignore_index: int = IGNORE_INDEX) -> SegBatch:
    """Stack (HxWx3, HxW) pairs into a SegBatch, padding to the largest H and W (image 0, label ignore)."""
    h = max(s[1].shape[0] for s in samples)
    w = max(s[1].shape[1] for s in samples)
    images = torch.zeros(len(samples), 3, h, w, dtype=torch.uint8)
    labels = torch.full((len(samples), h, w), ignore_index, dtype=torch.uint8)
    for i, (image, label) in enumerate(samples):
        images[i, :, :image.shape[0], :image.shape[1]] = image.permute(2, 0, 1)
        labels[i, :label.shape[0], :label.shape[1]] = label
    sizes = torch.tensor([list(s[1].shape[:2]) for s in samples], dtype=torch.int64)
    return SegBatch(images, labels, sizes)


class SegLoader(EpochLoader):
    """A segmentation source through the train transform (``transform``) or as stored (None)."""

    backend = "torch"

    def __init__(self, source, *, transform: Optional[SegTrainTransform], batch_size: int, num_workers: int = 2,
                 device="cpu", seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 shuffle: Optional[bool] = None, prefetch_factor: int = 2):
        device = torch.device(device)
        self.source, self.transform = source, transform
        self.num_classes, self.classes = source.num_classes, tuple(source.classes)
        self._sampler = KeySampler()
        workers = max(0, min(int(num_workers), cpu_count()))
        self._loader = DataLoader(_Samples(source, transform), batch_size=batch_size, sampler=self._sampler,
                                  num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                                  drop_last=False, persistent_workers=workers > 0,
                                  prefetch_factor=prefetch_factor if workers > 0 else None)
        train = transform is not None
        super().__init__(len(source), batch_size=batch_size, shuffle=train if shuffle is None else shuffle,
                         drop_last=drop_last, seed=seed, rank=rank, world_size=world_size, device=device,
                         resolution=lambda epoch: 0)

    def _iterate(self, order: np.ndarray, epoch: int, resolution: int):
        self._sampler.keys = [(int(i), epoch) for i in order]
        yield from self._loader


def make_source(kind: str, path: str, split: str):
    """``kind``: 'ffcv' (.beton written by fastkd), 'cityscapes' (a Cityscapes tree), 'fashion-scenes'."""
    if kind == "ffcv":
        from .sources import BetonSegSource

        return BetonSegSource(resolve_beton(path, split, "segmentation "))
    if kind == "cityscapes":
        from . import cityscapes

        return cityscapes.source(path, split)
    if kind == "fashion-scenes":
        from .sources import fashion_scenes

        return fashion_scenes(path, split)
    raise ValueError(f"segmentation data source {kind!r} is not one of 'ffcv', 'cityscapes', 'fashion-scenes'")


TRANSFORM_KEYS = ("crop_size", "img_scale", "ratio_range", "cat_max_ratio", "flip_prob", "photometric")


VAL_BATCH_SIZE = 1  # evaluation runs each image at its own size: one image a batch unless asked


def train_transform(options: Dict[str, Any], seed: int) -> SegTrainTransform:
    """The train transform from ``data.kwargs`` (the SegTrainTransform fields :data:`TRANSFORM_KEYS`; an unknown
    key is an error naming it)."""
    options = {k: v for k, v in options.items() if k != "val_batch_size"}
    unknown = sorted(set(options) - set(TRANSFORM_KEYS))
    if unknown:
        raise ValueError(f"unknown segmentation data option(s) {unknown}; known: {list(TRANSFORM_KEYS)}")
    for key in ("crop_size", "img_scale", "ratio_range"):
        if isinstance(options.get(key), Sequence):
            options[key] = tuple(options[key])
    return SegTrainTransform(seed=seed, **options)


def build_loader(data, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu", grad_accum: int = 1, dtype=None, channels_last: bool = False) -> SegLoader:
    """The ``split`` loader of this rank (``fastkd.data.build_loader``'s signature) from ``data``: ``source``
    (:func:`make_source`'s kinds), ``path`` / ``val_path``, ``num_workers``, ``kwargs`` the train transform's
    fields (``crop_size`` defaults to ``image_size`` square). Train: through the seeded transform, shuffled,
    drop_last; other splits: as stored, every image once over all ranks. Images stay uint8 (the task
    normalises on the device)."""
    options = dict(data.kwargs or {})
    options.setdefault("crop_size", (data.image_size, data.image_size))
    transform = train_transform(options, seed)  # checked for the val split too: a typo fails either way
    train = split == "train"
    path = data.path if train else (data.val_path or data.path)
    if path is None:
        raise ValueError("data.path is not set (a folder of train/val .beton, a Cityscapes root or a "
                         "fashion-scenes root)")
    return SegLoader(make_source(data.source, path, "train" if train else "val"),
                     transform=transform if train else None, batch_size=batch_size, drop_last=train,
                     num_workers=data.num_workers, device=device, seed=seed, rank=rank, world_size=world_size)
