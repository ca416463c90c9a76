"""Which samples a rank reads, in which order, for one epoch (shared by every loader).

The order is a pure function of (num_samples, seed, epoch, rank, world_size, batch_size,
drop_last): same inputs -> same order, on every backend, so that a run resumes exactly.

- shuffle: one permutation of the whole set per epoch, drawn from ``SeedSequence([seed, epoch])``;
  every rank draws the same permutation.
- drop_last (train): the permutation is cut into global batches of ``world_size * batch_size``
  samples and rank r reads the r-th contiguous chunk of each. A global batch is therefore the same
  set of samples in the same order however it is split over processes, and the sample at position i
  of rank r's batch sits at ``r * batch_size + i`` of it: exactly what the engine passes as MGD's
  ``sample_offset``, so masks follow the samples. All ranks run the same number of steps
  (data-parallel collectives never hang); the up-to ``world_size * batch_size - 1`` samples left
  over change from epoch to epoch.
- no drop_last (eval): each rank takes a strided slice; the shards are disjoint and cover the set exactly once; their sizes differ by
  at most one sample, so reduce metrics once after the loop, not per batch.
"""
from __future__ import annotations

import numpy as np


def _check(num_samples: int, rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")


def shard_size(num_samples: int, *, rank: int = 0, world_size: int = 1, batch_size: int = 1,
               drop_last: bool = False) -> int:
    """Samples rank ``rank`` reads per epoch."""
    _check(num_samples, rank, world_size, batch_size)
    if drop_last:
        return num_samples // (world_size * batch_size) * batch_size
    return len(range(rank, num_samples, world_size))


def num_batches(num_samples: int, *, rank: int = 0, world_size: int = 1, batch_size: int = 1,
                drop_last: bool = False) -> int:
    """Batches rank ``rank`` reads per epoch."""
    n = shard_size(num_samples, rank=rank, world_size=world_size, batch_size=batch_size,
                   drop_last=drop_last)
    return -(-n // batch_size)


def epoch_order(num_samples: int, *, seed: int, epoch: int, shuffle: bool, rank: int = 0,
                world_size: int = 1, batch_size: int = 1, drop_last: bool = False,
                start_batch: int = 0) -> np.ndarray:
    """Sample indices (uint64) rank ``rank`` reads in epoch ``epoch``, from batch ``start_batch`` on."""
    _check(num_samples, rank, world_size, batch_size)
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
        perm = rng.permutation(num_samples)
    else:
        perm = np.arange(num_samples)
    n = shard_size(num_samples, rank=rank, world_size=world_size, batch_size=batch_size,
                   drop_last=drop_last)
    if drop_last:
        groups = n // batch_size
        shard = perm[:groups * world_size * batch_size].reshape(groups, world_size, batch_size)[:, rank].reshape(-1)
    else:
        shard = perm[rank::world_size]
    return np.ascontiguousarray(shard[start_batch * batch_size:], dtype=np.uint64)
