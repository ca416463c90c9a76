"""FFCV decoder with reproducible augmentation: RandomResizedCrop + horizontal flip seeded per sample.

FFCV's own ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's
per-thread generators, which nobody seeds (libffcv/ffcv#392, #300): two runs of one seed crop
differently.  This decoder decodes, crops, resizes (the same OpenCV INTER_AREA call as FFCV) and flips
in one parallel pass per batch, with every draw taken from :mod:`fastkd.data.seeded`: a pure function of
(seed, epoch, sample index).  Which numba thread decodes which sample, and where a run was resumed,
make no difference; the PyTorch loader draws the same boxes and flips.

FFCV hands an operation its batch's sample indices but no epoch, and numba freezes the values a
compiled function captures; so the decoder reads the epoch the loader set (``decoder.epoch``) once per
batch through ``numba.objmode`` (one round trip to the interpreter, about a microsecond) instead of
recompiling the pipeline every epoch (seconds).  The loader sets it before an epoch's first batch and
does not change it while that epoch's batches are produced.
"""
from __future__ import annotations

from typing import Callable, Tuple

import numba
import numpy as np

from .base import ffcv_import

ffcv_import()  # FFCV's first import would set torch's thread count to 1
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402

from .seeded import crop_box, flips, seed_key


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """RandomResizedCrop(scale, ratio) to ``output_size`` and a flip with probability ``flip_prob``,
    drawn from (seed, ``self.epoch``, sample index); JPEG and raw images of any size."""

    def __init__(self, output_size: Tuple[int, int], *, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip_prob: float = 0.5):
        super().__init__(output_size)
        self.key = seed_key(int(seed))
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        if not (0 < self.scale[0] <= self.scale[1] and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"crop scale and ratio need 0 < low <= high, got {self.scale} and {self.ratio}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)
        self.epoch = 0

    @property
    def get_crop_generator(self):  # FFCV's abstract hook; generate_code below draws its own boxes
        return crop_box

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        current_epoch = _epoch_reader(self)
        k0, k1 = self.key
        scale_lo, scale_hi = self.scale
        ratio_lo, ratio_hi = self.ratio
        flip_prob = self.flip_prob

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = current_epoch()
            for dst_ix in my_range(len(batch_indices)):
                source_ix = np.int64(batch_indices[dst_ix])
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.int64(field["height"]), np.int64(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix]
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                i, j, h, w = crop_box(height, width, scale_lo, scale_hi, ratio_lo, ratio_hi, k0, k1, epoch,
                                      source_ix)
                out = destination[dst_ix]
                resize_crop_c(image, i, i + h, j, j + w, out)
                if flips(k0, k1, epoch, source_ix, flip_prob):
                    _flip_in_place(out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


def _epoch_reader(decoder: SeededRandomResizedCrop):
    """A jitted ``() -> decoder.epoch`` that reads the attribute when called, not when compiled."""
    def current_epoch():
        with numba.objmode(epoch="int64"):
            epoch = decoder.epoch
        return epoch

    return numba.njit(current_epoch)


@numba.njit(nogil=True)
def _flip_in_place(image):
    """Mirror an HxWxC image left-right in place."""
    height, width, channels = image.shape
    for y in range(height):
        for x in range(width // 2):
            for c in range(channels):
                left = image[y, x, c]
                image[y, x, c] = image[y, width - 1 - x, c]
                image[y, width - 1 - x, c] = left
