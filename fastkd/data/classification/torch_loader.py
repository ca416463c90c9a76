"""Classification's PyTorch loader (the fallback of the FFCV one): a PyTorch DataLoader over an ImageFolder
tree or in-memory IDX arrays, with the same transforms and the same batch contract as the FFCV loader.

Workers decode (PIL) and crop/resize/flip (:class:`SampleTransform`) each sample to uint8 HxWx3;
the main process moves the uint8 batch to the device (pinned, non-blocking) and normalises it
there.  Crops and flips are drawn from (seed, epoch, sample index), so this loader is reproducible
down to the pixel, across worker counts and resumes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..base import EpochLoader, KeySampler, cpu_count
from ..normalize import normalize_coefficients, normalize_into
from .transforms import DEFAULT_CENTER_RATIO, DEFAULT_RATIO, DEFAULT_SCALE, SampleTransform


class _TransformedSource(Dataset):
    def __init__(self, source, transform: SampleTransform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        index, epoch, size = key
        image, label = self.source[index]
        return torch.from_numpy(self.transform(image, index, epoch, size)), int(label)


class TorchLoader(EpochLoader):
    backend = "torch"

    def __init__(self, source, *, train: bool, batch_size: int, num_workers: int, image_size: int,
                 mean, std, device="cpu", channels_last: bool = False, dtype=torch.float32,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 shuffle: Optional[bool] = None, resolution=None, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO,
                 flip: bool = True, center_ratio: float = DEFAULT_CENTER_RATIO, prefetch_factor: int = 2):
        device = torch.device(device)
        self.source = source
        self.num_workers = max(0, min(int(num_workers), cpu_count()))
        self.channels_last, self.dtype, self.image_size = channels_last, dtype, image_size
        self.scale_, self.shift_ = normalize_coefficients(mean, std, device)
        transform = SampleTransform(train=train, size=image_size, scale=tuple(scale), ratio=tuple(ratio),
                                    flip=flip, center_ratio=center_ratio, seed=seed)
        self._sampler = KeySampler()
        workers = self.num_workers
        self._loader = DataLoader(_TransformedSource(source, transform), batch_size=batch_size,
                                  sampler=self._sampler, num_workers=workers,
                                  pin_memory=device.type == "cuda", drop_last=False,
                                  persistent_workers=workers > 0,
                                  prefetch_factor=prefetch_factor if workers > 0 else None)
        super().__init__(len(source), batch_size=batch_size, shuffle=train if shuffle is None else shuffle,
                         drop_last=drop_last, seed=seed, rank=rank, world_size=world_size, device=device,
                         resolution=resolution or (lambda epoch: image_size))

    def _iterate(self, order: np.ndarray, epoch: int, resolution: int):
        self._sampler.keys = [(int(i), epoch, resolution) for i in order]
        non_blocking = self.device.type == "cuda"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in self._loader:
            images = images.to(self.device, non_blocking=non_blocking).permute(0, 3, 1, 2)
            out = torch.empty(images.shape, dtype=self.dtype, device=self.device, memory_format=fmt)
            yield (normalize_into(images, out, self.scale_, self.shift_),
                   labels.to(self.device, non_blocking=non_blocking))
