"""Classification's loaders: fastkd.data (FFCV / torch), a built-in synthetic source, or a user factory.

They follow the engine's sharding convention (``fastkd/engine/data.py``): micro-step m of rank r takes
chunk ``m * world + r`` of each global batch.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

from ...config import ConfigError, DataConfig, import_factory


class SyntheticSource:
    """A learnable in-memory dataset: class prototypes + noise, identical on every rank for a seed."""

    def __init__(self, size: int, *, channels: int, image_size: int, num_classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        protos = torch.randn(num_classes, channels, image_size, image_size, generator=g)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)
        self.images = protos[self.labels] + 0.8 * torch.randn(size, channels, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)


class TrainLoader:
    """Micro-batches of one rank in global-batch order; ``set_epoch``, ``state_dict`` for exact resume."""

    def __init__(self, source: SyntheticSource, *, micro: int, grad_accum: int, rank: int, world: int, seed: int,
                 device: torch.device):
        self.src, self.micro, self.gas, self.rank, self.world = source, micro, grad_accum, rank, world
        self.seed, self.device, self.epoch, self.position = seed, device, 0, 0
        self.global_batch = micro * grad_accum * world
        self.steps = len(source) // self.global_batch  # drop_last: every step sees a full global batch
        if self.steps == 0:
            raise ConfigError(f"the training set has {len(source)} samples, fewer than one global batch "
                              f"({self.global_batch})")

    def __len__(self) -> int:
        return self.steps * self.gas

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.src), generator=torch.Generator().manual_seed(self.seed * 1000003 + self.epoch))
        while self.position < len(self):
            step, m = divmod(self.position, self.gas)
            start = step * self.global_batch + (m * self.world + self.rank) * self.micro
            idx = perm[start:start + self.micro]
            self.position += 1
            yield self.src.images[idx].to(self.device), self.src.labels[idx].to(self.device)


class ValLoader:
    """Rank r takes samples r, r + world, ...: every sample exactly once, no padding, none dropped."""

    def __init__(self, source: SyntheticSource, *, batch: int, rank: int, world: int, device: torch.device):
        self.idx = torch.arange(rank, len(source), world)
        self.src, self.batch, self.device = source, batch, device

    def __len__(self) -> int:
        return (len(self.idx) + self.batch - 1) // self.batch

    def __iter__(self):
        for i in range(0, len(self.idx), self.batch):
            j = self.idx[i:i + self.batch]
            yield self.src.images[j].to(self.device), self.src.labels[j].to(self.device)


def build_loaders(cfg: DataConfig, *, micro: int, grad_accum: int, rank: int, world: int, seed: int,
                  device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False):
    """(train, val) loaders for this rank."""
    if cfg.source == "synthetic":
        kw = dict(channels=cfg.channels, image_size=cfg.image_size, num_classes=cfg.num_classes)
        train = SyntheticSource(cfg.train_size, seed=seed, **kw)
        val = SyntheticSource(cfg.val_size, seed=seed + 1, **kw)
        return (TrainLoader(train, micro=micro, grad_accum=grad_accum, rank=rank, world=world, seed=seed, device=device),
                ValLoader(val, batch=micro, rank=rank, world=world, device=device))
    if ":" in cfg.source:  # a user factory: fastkd.data.classification's make_loader signature
        factory = import_factory(cfg.source, "data.source")
        common = dict(batch_size=micro, num_workers=cfg.num_workers, image_size=cfg.image_size, mean=cfg.mean,
                      std=cfg.std, device=device, channels_last=channels_last, dtype=dtype, distributed=world > 1,
                      rank=rank, world_size=world, seed=seed, **cfg.kwargs)
        train = factory("train", path=cfg.path, drop_last=True, **common)
        val = factory("val", path=cfg.val_path or cfg.path, drop_last=False, **common)
        return train, val
    try:
        from ...data import build_loaders as data_loaders
    except ImportError as exc:
        raise ConfigError(f"data.source {cfg.source!r} needs fastkd.data ({exc})") from None
    try:
        return data_loaders("classification", cfg, batch_size=micro, rank=rank, world_size=world,
                            seed=seed, device=device, grad_accum=grad_accum, dtype=dtype, channels_last=channels_last)
    except ConfigError:
        raise
    except ValueError as exc:  # a missing path, an unknown option, train and val normalised differently
        raise ConfigError(f"data: {exc}") from None
