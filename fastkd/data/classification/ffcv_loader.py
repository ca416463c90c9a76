"""FFCV loader: .beton -> normalised batches on the device.

Train pipeline: seeded RandomResizedCrop + flip decoder (decode + crop + resize + flip in one
JIT-compiled pass per image, numba threads; :mod:`fastkd.data.ffcv_seeded`) -> tensor -> device (pinned, non-blocking, on FFCV's own
CUDA stream) -> NCHW view -> normalise into a preallocated float / bf16 buffer (on CPU in float32: FFCV's
table-lookup normalisation before the tensor conversion instead).  Val: centre crop.

The order is fastkd's (:mod:`fastkd.data.order`), not FFCV's: FFCV's distributed order pads
shards with repeated samples; ours gives disjoint shards and an exact mid-epoch resume.

Output buffers are FFCV's: a batch's tensors are overwritten ``batches_ahead + 2`` batches later;
``.clone()`` what must outlive that.  Augmentation draws (crop boxes, flips) are functions of (seed,
epoch, sample index), as in the PyTorch loader: the same seed gives the same batches on every run and
after a resume.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional, Tuple

import numpy as np
import torch

from ..base import ffcv_import

ffcv_import()  # FFCV's first import would set torch's thread count to 1
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.operation import Operation  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage  # noqa: E402

from ..base import EpochLoader, cpu_count
from ..ffcv_seeded import SeededRandomResizedCrop
from ..ffcv_util import GivenOrder, TorchThreads
from ..normalize import check_mean_std, normalize_coefficients, normalize_into
from .transforms import DEFAULT_CENTER_RATIO, DEFAULT_RATIO, DEFAULT_SCALE


class NormalizeImage(Operation):
    """uint8 [N,3,H,W] (any strides, on the device) -> float [N,3,H,W] ``(x/255 - mean) / std``.

    Declares its output (shape, torch dtype, device) so FFCV preallocates one buffer per batch
    slot; with ``channels_last`` the buffer is NHWC and the result its NCHW view.
    """

    def __init__(self, mean, std, device, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        super().__init__()
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.scale, self.shift = normalize_coefficients(mean, std, self.device)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        c, h, w = previous_state.shape
        shape = (h, w, c) if self.channels_last else (c, h, w)
        return (replace(previous_state, jit_mode=False, dtype=self.dtype),
                AllocationQuery(shape, dtype=self.dtype, device=self.device))

    def generate_code(self):
        scale, shift, channels_last = self.scale, self.shift, self.channels_last

        def normalize(images, dst):
            out = dst[: images.shape[0]]
            if channels_last:
                out = out.permute(0, 3, 1, 2)
            return normalize_into(images, out, scale, shift)

        return normalize


class NormalizeImageCPU(Operation):
    """uint8 [N,H,W,3] (numpy, JIT stage) -> float32 ``(x/255 - mean) / std`` by table lookup, written
    as [N,3,H,W] (or [N,H,W,3] for channels_last) in one parallel pass."""

    def __init__(self, mean, std, channels_last: bool = False):
        super().__init__()
        mean, std = check_mean_std(mean, std)
        values = np.arange(256, dtype=np.float64)[:, None] / 255.0
        self.table = ((values - np.array(mean)) / np.array(std)).astype(np.float32)  # [256, 3]
        self.channels_last = channels_last

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        h, w, c = previous_state.shape
        shape = (h, w, c) if self.channels_last else (c, h, w)
        dtype = np.dtype("<f4")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def generate_code(self):
        table, my_range, channels_last = self.table, Compiler.get_iterator(), self.channels_last

        def normalize(images, dst):
            n, h, w = images.shape[0], images.shape[1], images.shape[2]
            for i in my_range(n):
                if channels_last:
                    for y in range(h):
                        for x in range(w):
                            for c in range(3):
                                dst[i, y, x, c] = table[images[i, y, x, c], c]
                else:  # plane by plane: contiguous writes, stride-3 reads
                    for c in range(3):
                        for y in range(h):
                            for x in range(w):
                                dst[i, c, y, x] = table[images[i, y, x, c], c]
            return dst[:n]

        normalize.is_parallel = True
        return normalize


class FFCVLoader(EpochLoader):
    backend = "ffcv"

    def __init__(self, path: str, *, train: bool, batch_size: int, num_workers: int, image_size: int,
                 mean, std, device="cpu", channels_last: bool = False, dtype=torch.float32,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 shuffle: Optional[bool] = None, resolution=None, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO,
                 flip: bool = True, center_ratio: float = DEFAULT_CENTER_RATIO,
                 os_cache: bool = True, batches_ahead: int = 3):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FFCV file {path!r} not found (write one with `fastkd data write`)")
        device = torch.device(device)
        workers = max(1, min(int(num_workers) if num_workers else cpu_count(), cpu_count()))
        if train:
            decoder = SeededRandomResizedCrop((image_size, image_size), seed=seed, scale=scale, ratio=ratio,
                                              flip_prob=0.5 if flip else 0.0)
            image_ops = [decoder]
        else:
            decoder = CenterCropRGBImageDecoder((image_size, image_size), ratio=center_ratio)
            image_ops = [decoder]
        to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
        if device.type == "cpu" and dtype == torch.float32:
            # CPU: normalise and lay out in one parallel JIT pass (several times faster than torch's
            # strided uint8 -> float copy plus two elementwise passes).
            image_ops += [NormalizeImageCPU(mean, std, channels_last), ToTensor()]
            if channels_last:
                image_ops.append(ToTorchImage(channels_last=True, convert_back_int16=False))
        else:
            image_ops += [ToTensor(), *to_device, ToTorchImage(channels_last=True, convert_back_int16=False),
                          NormalizeImage(mean, std, device, dtype, channels_last)]
        label_ops = [IntDecoder(), ToTensor(), Squeeze(), *to_device]
        self.decoder = decoder
        self._threads = TorchThreads()
        self._loader = Loader(path, batch_size=batch_size, num_workers=workers, os_cache=os_cache,
                              order=OrderOption.SEQUENTIAL, drop_last=False, batches_ahead=batches_ahead,
                              pipelines={"image": image_ops, "label": label_ops})
        self._threads.restore()
        self._loader.traversal_order = GivenOrder(self._loader)
        self.path, self.num_workers, self.image_size = path, workers, image_size
        super().__init__(self._loader.reader.num_samples, batch_size=batch_size,
                         shuffle=train if shuffle is None else shuffle, drop_last=drop_last, seed=seed,
                         rank=rank, world_size=world_size, device=device,
                         resolution=resolution or (lambda epoch: image_size))

    def _iterate(self, order: np.ndarray, epoch: int, resolution: int):
        if tuple(self.decoder.output_size) != (resolution, resolution):
            # Progressive resizing: buffers are re-declared at the new size, the pipeline recompiled.
            self.decoder.output_size = (resolution, resolution)
            self._loader.generate_code()
        self._loader.traversal_order.next_order = order
        if isinstance(self.decoder, SeededRandomResizedCrop):
            self.decoder.epoch = epoch  # read by the decoder at each batch of this epoch
        it = iter(self._loader)
        try:
            for images, labels in it:
                self._threads.restore()  # the iterator thread set it before batch 0
                yield images, labels
        finally:
            it.close()
