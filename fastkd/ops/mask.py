"""The MGD random-mask contract, in pure PyTorch (any device, no per-element Python loops).

Every backend draws the *same* mask for the same seed:

    counter(n, ...) = flat index of the mask entry, counted from the global sample g = sample_offset + n
        spatial mask [N, 1, H, W]:  counter = g*H*W + h*W + w
        channel mask [N, C, 1, 1]:  counter = g*C + c
    (c0, c1, c2, c3) = Philox-4x32-10(key = (seed_lo, seed_hi), counter = (ctr_lo, ctr_hi, 0, 0))
    u = uint_to_uniform_float(c0)     # exactly triton.language.rand's mapping
    dropped  <=>  u < ratio           # keep-mask value 0, else 1 (no rescaling of kept values)

``uint_to_uniform_float`` bit-casts the word to int32, folds negatives (x < 0 -> -x - 1), converts
to float32 (round to nearest even) and multiplies by 4.6566127342e-10 in float32.
"""
from __future__ import annotations

import torch

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10
_M32 = 0xFFFFFFFF
SEED_MAX = 2**64


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * x) >> 32 and (a * x) mod 2^32 for a 32-bit constant a and int64 tensor x in [0, 2^32).

    Works in int64 without overflow by splitting x into 16-bit halves.
    """
    xh = x >> 16
    xl = x & 0xFFFF
    p = a * xh  # < 2^48
    q = a * xl  # < 2^48
    hi = (p + (q >> 16)) >> 16
    lo = (((p & 0xFFFF) << 16) + q) & _M32
    return hi, lo


def philox4x32(seed: int, counter: torch.Tensor, rounds: int = PHILOX_ROUNDS) -> torch.Tensor:
    """First output word of Philox-4x32-``rounds`` for 64-bit ``seed`` and int64 ``counter`` tensor.

    Returns an int64 tensor holding the uint32 word. Matches ``triton.language.randint``.
    """
    if counter.dtype != torch.int64:
        raise TypeError(f"counter must be int64, got {counter.dtype}")
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0


def uint_to_uniform_float(word: torch.Tensor) -> torch.Tensor:
    """Map uint32 words (held in int64) to float32 in [0, 1) exactly as ``tl.rand`` does."""
    x = torch.where(word >= 2**31, word - 2**32, word)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def philox_uniform(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, counter)`` in PyTorch: float32 uniforms in [0, 1)."""
    check_seed(seed)
    return uint_to_uniform_float(philox4x32(seed, counter))


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int in [0, 2**64), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")


def mask_counters(mode: str, n: int, c: int, h: int, w: int, sample_offset: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The int64 Philox counters of every mask entry, shaped like the mask."""
    if mode == "spatial":
        per_sample = h * w
        idx = torch.arange(per_sample, dtype=torch.int64, device=device).view(1, 1, h, w)
        g = torch.arange(n, dtype=torch.int64, device=device).view(n, 1, 1, 1) + sample_offset
    elif mode == "channel":
        per_sample = c
        idx = torch.arange(per_sample, dtype=torch.int64, device=device).view(1, c, 1, 1)
        g = torch.arange(n, dtype=torch.int64, device=device).view(n, 1, 1, 1) + sample_offset
    else:
        raise ValueError(f"mask must be 'spatial' or 'channel', got {mode!r}")
    return g * per_sample + idx


def mgd_keep_mask(mode: str, n: int, c: int, h: int, w: int, *, ratio: float, seed: int,
                  sample_offset: int = 0, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The MGD keep-mask: [N,1,H,W] (spatial) or [N,C,1,1] (channel), 0 where dropped, 1 where kept."""
    u = philox_uniform(seed, mask_counters(mode, n, c, h, w, sample_offset, device))
    return (u >= ratio).to(dtype)
