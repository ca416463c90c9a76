"""What every fastkd loader shares: epoch-seeded sharded order, length, the data position, the sampler.

What a batch holds is the task's (classification: ``(images, labels)``, detection: a ``DetectionBatch``,
segmentation: a ``SegBatch``).

Position: ``state_dict() == {"epoch": e, "batch": b, ...}`` says that ``b`` batches of epoch ``e``
have been handed out; ``load_state_dict`` (or ``set_epoch(e)`` + ``skip_batches(b)``) makes the
next ``iter()`` start there, reading exactly the samples an uninterrupted run would have read next.
A fully consumed epoch advances ``epoch`` by itself; ``set_epoch`` sets it explicitly.
"""
from __future__ import annotations

import abc
import os
import sys
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from .order import epoch_order, num_batches


def ffcv_import() -> None:
    """Import FFCV, keeping torch's intra-op thread count.

    FFCV's first import runs ``Compiler.set_num_threads(1)`` (module level of ``ffcv/pipeline/compiler.py``),
    which calls ``torch.set_num_threads(1)``: a process that merely reads a .beton's header, writes one or
    builds either detection loader would drop to one torch thread, whatever its ``--threads`` or
    OMP_NUM_THREADS said.  Every fastkd module imports FFCV after calling this; later calls cost a dict
    lookup.  Import errors propagate (callers that probe for FFCV catch them)."""
    if "ffcv.pipeline.compiler" in sys.modules:
        return
    count = torch.get_num_threads()
    try:
        import ffcv.pipeline.compiler  # noqa: F401 - imports the whole package
    finally:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware; FFCV refuses more threads than this)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class DataPosition:
    """The data position every loader shares: ``epoch``, batches handed out, and the settings that give a
    batch index its meaning (``position_keys``: a saved position is refused when one of them differs)."""

    position_keys: Tuple[str, ...] = ("seed", "batch_size", "world_size", "num_samples")

    def _reset_position(self) -> None:
        self.epoch, self._start_batch, self._position = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Next ``iter()`` reads epoch ``epoch`` from its start (its order depends on seed and epoch only)."""
        self.epoch, self._start_batch, self._position = int(epoch), 0, 0

    def skip_batches(self, k: int) -> None:
        """Next ``iter()`` starts at batch ``k`` of the current epoch (mid-epoch resume)."""
        if not 0 <= k <= len(self):
            raise ValueError(f"cannot skip {k} batches of an epoch of {len(self)}")
        self._start_batch = self._position = int(k)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._position, **{k: getattr(self, k) for k in self.position_keys}}

    def load_state_dict(self, state: dict) -> None:
        for key in self.position_keys:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state[key]} but this loader has "
                                 f"{key}={getattr(self, key)}: the batch position would not mean the "
                                 f"same samples (resume at an epoch boundary instead: set_epoch)")
        self.set_epoch(state["epoch"])
        self.skip_batches(state["batch"])


class EpochLoader(DataPosition, abc.ABC):
    """Base class: subclasses implement ``_iterate(order, epoch, resolution)``."""

    backend = "base"

    def __init__(self, num_samples: int, *, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 rank: int, world_size: int, device, resolution: Callable[[int], int]):
        self.num_samples = int(num_samples)
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), bool(shuffle), bool(drop_last)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.device = torch.device(device)
        self.resolution = resolution
        self._reset_position()
        if len(self) == 0:
            raise ValueError(f"{self.num_samples} samples give no batch of {self.batch_size} on rank "
                             f"{self.rank}/{self.world_size} (drop_last={self.drop_last})")

    # -- order and position -------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per full epoch on this rank."""
        return num_batches(self.num_samples, rank=self.rank, world_size=self.world_size,
                           batch_size=self.batch_size, drop_last=self.drop_last)

    def order(self, epoch: int, start_batch: int = 0) -> np.ndarray:
        """Sample indices this rank reads in ``epoch`` from batch ``start_batch`` on."""
        return epoch_order(self.num_samples, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                           rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                           drop_last=self.drop_last, start_batch=start_batch)

    def current_resolution(self, epoch: Optional[int] = None) -> int:
        return self.resolution(self.epoch if epoch is None else epoch)

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self._start_batch
        order = self.order(epoch, start)
        self._position = start
        it = self._iterate(order, epoch, self.resolution(epoch)) if len(order) else iter(())
        try:
            for batch in it:
                self._position += 1
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        # Reached only when the epoch was consumed to its end.
        self.set_epoch(epoch + 1)

    @abc.abstractmethod
    def _iterate(self, order: np.ndarray, epoch: int, resolution: int):
        """Yield this epoch's batches for the sample indices ``order`` (each loader's own pipeline)."""


class KeySampler(Sampler):
    """Yields the keys (e.g. (index, epoch, resolution)) the loader set for the coming epoch, in order
    (every task's PyTorch loader samples through it)."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)
