"""FFCV operations for detection: decode + aspect-keeping resize + pad to the batch's bucket, in one pass.

``ResizePadDecoder`` replaces FFCV's image decoder for a COCO .beton (JPEG images of any size).  Per
batch it picks the bucket from the samples' orientations (all landscape, all portrait, or mixed:
:func:`fastkd.data.detection.batch_bucket`), then for each sample, in parallel (numba threads):
libjpeg-turbo decode into a scratch buffer, OpenCV INTER_AREA resize to
:func:`fastkd.data.detection.batch.resized_hw` (the same function the rest of fastkd uses, JIT-compiled)
into a second scratch buffer, copy into the top-left of the output and zero the padding.

The output slot is flat, ``Hm * Wm * 3`` bytes with (Hm, Wm) the largest bucket: a batch of bucket
(Hb, Wb) occupies the first ``Hb * Wb * 3`` bytes of each slot, so ``out[:, :Hb*Wb*3].view(n, Hb, Wb, 3)``
is the contiguous NHWC batch.  Flips are not done here: numba's generators are not seedable per
sample, and the flip decision is a function of the epoch, which compiled code does not see; the
loader mirrors the unpadded region afterwards.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Tuple

import numpy as np

from ..base import ffcv_import

ffcv_import()  # FFCV's first import would set torch's thread count to 1
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.pipeline.allocation_query import AllocationQuery  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402
from ffcv.pipeline.state import State  # noqa: E402

from .batch import bucket_shapes, resized_hw


class ResizePadDecoder(SimpleRGBImageDecoder):
    """JPEG RGBImageField -> uint8 [Hm*Wm*3] per sample: resized (shorter side ``short``, longer at
    most ``long``) and padded to the batch's bucket (see the module docstring for the layout).

    A subclass of FFCV's image decoder only so that FFCV accepts it as the field's decoder."""

    def __init__(self, short: int, long: int):
        super().__init__()
        self.short, self.long = int(short), int(long)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple[AllocationQuery, ...]]:
        if np.any(self.metadata["mode"] != IMAGE_MODES["jpg"]):  # checked here: a raise in the loop unparallelises it
            raise ValueError("ResizePadDecoder reads JPEG-stored images only (write with `fastkd data write coco`)")
        heights, widths = self.metadata["height"], self.metadata["width"]
        decoded = int(heights.max()) * int(widths.max()) * 3
        hm, wm = bucket_shapes(self.short, self.long)[2]
        flat = (hm * wm * 3,)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=flat, dtype=u8),
                (AllocationQuery(flat, u8), AllocationQuery((decoded,), u8), AllocationQuery(flat, u8)))

    def generate_code(self) -> Callable:
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        size_c = Compiler.compile(resized_hw)
        short, long = self.short, self.long
        (lh, lw), (ph, pw), (mh, mw) = bucket_shapes(short, long)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, decoded, resized = my_storage
            n = len(batch_indices)
            n_land = 0
            for k in range(n):
                f = metadata[batch_indices[k]]
                if f["width"] >= f["height"]:
                    n_land += 1
            hb, wb = (lh, lw) if n_land == n else ((ph, pw) if n_land == 0 else (mh, mw))
            for k in my_range(n):
                f = metadata[batch_indices[k]]
                h, w = np.uint32(f["height"]), np.uint32(f["width"])
                data = mem_read(f["data_ptr"], storage_state)
                src = decoded[k][:h * w * 3]
                imdecode_c(data, src, h, w, h, w, 0, 0, 1, 1, False, False)
                rh, rw = size_c(h, w, short, long)
                img = resized[k][:rh * rw * 3].reshape(rh, rw, 3)
                resize_c(src.reshape(h, w, 3), 0, h, 0, w, img)
                out = destination[k][:hb * wb * 3].reshape(hb, wb, 3)
                out[:rh, :rw] = img
                out[:rh, rw:] = 0
                out[rh:] = 0
            return destination[:n]

        decode.is_parallel = True
        return decode
