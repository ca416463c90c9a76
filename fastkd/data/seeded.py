"""Per-sample augmentation draws from a counter-based generator: same (seed, epoch, sample), same draws.

Every random number of a sample's augmentation is a pure function of the run seed, the epoch, the
sample's index in the dataset and which draw it is, computed by Philox-4x32-10 (the generator of the
MGD masks, :mod:`fastkd.ops.mask`) with no generator state:

    key     = (seed mod 2^32, seed >> 32 mod 2^32)
    counter = (index mod 2^32, index >> 32, epoch, purpose << 16 | block)     purpose: CROP = 1, FLIP = 2
    u_k     = word_k * 2^-32  in [0, 1)                                        k = 0..3 of the block

So the order in which loader threads (FFCV's numba workers, DataLoader processes) handle samples does
not matter, a resumed run draws what the uninterrupted run drew, and the FFCV and PyTorch loaders crop
and flip a sample alike.  ``purpose`` is never 0, so these counters never meet the MGD masks' counters
(whose last two words are 0) even under the same key.

The functions below use Python ints masked to 32 bits and 16-bit partial products: CPython runs them as
they are (the PyTorch loader) and numba compiles them to the same results when a jitted function calls
them (``register_jitable``: the FFCV decoder).
"""
from __future__ import annotations

import math
from typing import Tuple

try:  # numba comes with FFCV; the PyTorch loader runs these functions without it
    from numba.extending import register_jitable
except ImportError:  # pragma: no cover - exercised only where numba is missing
    def register_jitable(fn):
        return fn

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
M32 = 0xFFFFFFFF
TO_UNIT = 1.0 / 4294967296.0  # 2^-32

CROP = 1
FLIP = 2
CROP_TRIES = 10  # RandomResizedCrop's attempts before the centre-crop fallback (torchvision, FFCV)


def seed_key(seed: int) -> Tuple[int, int]:
    """The Philox key words of a run seed in [0, 2^64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"augmentation seed must be an int in [0, 2**64), got {seed!r}")
    return seed & M32, (seed >> 32) & M32


@register_jitable
def mulhilo(a, x):
    """(a * x) >> 32 and (a * x) mod 2^32 for 32-bit a and x, without a product over 48 bits."""
    xh = x >> 16
    xl = x & 0xFFFF
    p = a * xh
    q = a * xl
    hi = (p + (q >> 16)) >> 16
    lo = (((p & 0xFFFF) << 16) + q) & M32
    return hi, lo


@register_jitable
def philox4x32(k0, k1, c0, c1, c2, c3):
    """Philox-4x32-10 (Salmon et al., SC'11) of the counter (c0..c3) under the key (k0, k1): 4 words."""
    for _ in range(10):
        hi_b, lo_b = mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & M32
        k1 = (k1 + PHILOX_KEY_B) & M32
    return c0, c1, c2, c3


@register_jitable
def uniforms(k0, k1, epoch, index, purpose, block):
    """The four uniforms in [0, 1) of one block of draws of sample ``index`` in ``epoch``."""
    w0, w1, w2, w3 = philox4x32(k0, k1, index & M32, (index >> 32) & M32, epoch & M32,
                                ((purpose << 16) | block) & M32)
    return w0 * TO_UNIT, w1 * TO_UNIT, w2 * TO_UNIT, w3 * TO_UNIT


@register_jitable
def round_half_even(x):
    """Python's ``round`` for floats, spelled out so that numba and CPython agree on ties."""
    f = math.floor(x)
    d = x - f
    r = int(f)
    if d > 0.5 or (d == 0.5 and r % 2 == 1):
        r += 1
    return r


@register_jitable
def crop_box(height, width, scale_lo, scale_hi, ratio_lo, ratio_hi, k0, k1, epoch, index):
    """(top, left, h, w) of sample ``index``'s RandomResizedCrop window in ``epoch``.

    torchvision's and FFCV's algorithm: up to 10 tries of (area fraction ~ U(scale), log aspect ~
    U(log ratio)), the window's position uniform among those that fit; else a centre crop clamped to
    the aspect range.  Try t uses the four uniforms of block t.
    """
    area = height * width
    log_ratio_lo, log_ratio_hi = math.log(ratio_lo), math.log(ratio_hi)
    for t in range(CROP_TRIES):
        u0, u1, u2, u3 = uniforms(k0, k1, epoch, index, CROP, t)
        target_area = area * (scale_lo + (scale_hi - scale_lo) * u0)
        aspect = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * u1)
        w = round_half_even(math.sqrt(target_area * aspect))
        h = round_half_even(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u2 * (height - h + 1)), int(u3 * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w, h = width, round_half_even(width / ratio_lo)
    elif in_ratio > ratio_hi:
        w, h = round_half_even(height * ratio_hi), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@register_jitable
def flips(k0, k1, epoch, index, prob):
    """Whether sample ``index`` is flipped horizontally in ``epoch`` (with probability ``prob``)."""
    return uniforms(k0, k1, epoch, index, FLIP, 0)[0] < prob
