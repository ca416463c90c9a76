"""What fastkd's FFCV loaders share: the order fastkd chose handed to FFCV's ``Loader``, and torch's thread
count kept from FFCV's changes. Imports FFCV: import this module only where FFCV is used."""
from __future__ import annotations

import numpy as np
import torch

from .base import ffcv_import

ffcv_import()  # FFCV's first import would set torch's thread count to 1
from ffcv.loader import Loader  # noqa: E402
from ffcv.traversal_order.base import TraversalOrder  # noqa: E402


class GivenOrder(TraversalOrder):
    """Hands FFCV the indices fastkd chose for the coming epoch."""

    def __init__(self, loader: Loader):
        super().__init__(loader)
        self.next_order = np.arange(len(self.indices), dtype=np.uint64)

    def sample_order(self, epoch: int):
        return self.next_order


class TorchThreads:
    """FFCV sets torch's intra-op thread count to its worker count (``Compiler.set_num_threads``,
    ffcv/pipeline/compiler.py) when a Loader is built and again in its epoch iterator's thread before the first
    batch: a run's own count (``--threads``, OMP_NUM_THREADS) would silently become ``num_workers``. Captured
    before the Loader is built; :meth:`restore` after the build and at each batch gives the process its count back."""

    def __init__(self):
        self.count = torch.get_num_threads()

    def restore(self) -> None:
        if torch.get_num_threads() != self.count:
            torch.set_num_threads(self.count)
