"""Fused MGD loss in Triton: random mask + generator convolutions + squared error, forward and backward.

Maths (METHODS.md section 1; rows p = (n, h, w) run over the N*H*W pixels, channels are columns)::

    A      = S @ Wa^T + ba                 (align, 1x1 conv; A = S when Cs == Ct)
    keep   = Philox(seed, counter) >= ratio, counter = g*H*W + h*W + w (spatial) or g*C + c (channel),
             g = sample_offset + n                                       (fastkd.ops.mask contract)
    Z1[p]  = b1 + sum_{tap, ci} (A * keep)[p + off(tap), ci] W1[:, ci, tap]      (3x3, padding 1)
    H1     = relu(Z1)
    G[p]   = b2 + sum_{tap, ci} H1[p + off(tap), ci] W2[:, ci, tap]
    loss   = alpha / N * sum (G - T)^2
    D      = G - T                           (computed in the forward's epilogue, as Liger computes dX)
  backward, with g = dL_total/dloss and c = g * 2 alpha / N (an fp32 scalar), dL/dG = c D:
    dW2[co, ci, tap] = c sum_p H1[p + off(tap), ci] D[p, co]          db2 = c sum_p D[p]
    dH1[p]  = c [H1[p] > 0] sum_tap D[p - off(tap)] W2[:, :, tap]^T   (a 3x3 conv of D with flipped taps)
    dW1, db1 as dW2, db2 with (A * keep, dH1)
    dA[p]   = keep[p] sum_tap dH1[p - off(tap)] W1[:, :, tap]^T
    dS = dA @ Wa, dWa = dA^T S, dba = sum_p dA                        (or dS = dA without align)

D is stored unscaled: in fp16, 2 alpha / N (G - T) underflows at real alphas (1e-5 and below) before a loss
scaler's g could lift it, while G - T has the features' magnitude; 2 alpha / N stays in fp32, folded into c.

Two kernels do all the matrix work, as implicit GEMMs on tl.dot (bf16/fp16 on tensor cores, fp32 accumulation;
float32 inputs use TF32 when torch.backends.cudnn.allow_tf32 allows it, as PyTorch's own convolutions do,
IEEE fp32 otherwise):
  _conv_fwd_kernel    Y[p, co] = sum_{tap, ci} X[p + off(tap), ci] Wt[tap, ci, co], 1x1 or 3x3 window, one flat
                      (tap, channel-block) loop per output tile. KEEP_IN regenerates the mask while loading X
                      (dropped pixels are not even read; dropped channels are zeroed after the load, which
                      stays one 16-byte cp.async per 8 channels). Epilogues: +bias (align) / +bias, ReLU (conv1) /
                      +bias, squared error against T, the tile's loss partial and D (conv2) / ReLU gate by H1
                      times c (input gradient of conv2) / mask gate (input gradient of conv1; the channel mask
                      read from its [N, C] keep table). Flipped taps and
                      transposed weight strides make it the input gradient of a convolution (also dS = dA Wa).
  _conv_wgrad_kernel  dW[co, ci, tap] over a split of the pixels (KEEP_IN for conv1's masked input), the bias
                      gradient from the centre tap (a pass over dY after the main loop); per-split fp32
                      partials, or dW itself with one split.
  _sum_rows_kernel / _sum_all_kernel   fixed-order sums of the partials (no float atomics anywhere: the same
                      seed gives the same loss and gradients bit for bit on the same device and configuration).
Launches: forward = [align] + conv1 + conv2 + loss sum; backward = wgrad2, dgrad2, wgrad1, dgrad1, [dgrad_align,
wgrad_align] (+ partial sums where a weight gradient is split over pixels).
Written to memory: forward A (only with align), H1 and D ([N*H*W, Ct] each, channels-last, saved for the
backward; D only when a gradient is wanted); backward dH1 and dA (with align) and the gradients, and for the
channel mask its keep table (one byte per sample and channel, drawn from the seed by _keep_table_kernel).
Nothing is written for the spatial mask, the masked input, G or a scaled dL/dG. S, T and dS are addressed
through their strides (NCHW-contiguous or channels_last, no copies); weights are permuted once per call, the reduction axis
contiguous ([3, 3, Cout, Cin] for the forward, [3, 3, Cin, Cout] for the input gradients).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._custom_op import fused_loss_op
from ._target import on_gpu
from ._tuning import all_configs, tile_configs
from ._triton_common import (INTERPRET, INTERPRETING, autotune, device_guard, dot, dot_precision, nhwc_strides,
                             parallel_target, pixel_rows, split_rows, store)

KEEP_NONE, KEEP_SPATIAL, KEEP_CHANNEL = 0, 1, 2
EPI_BIAS, EPI_BIAS_RELU, EPI_MSE, EPI_RELU_GRAD, EPI_KEEP_GRAD = 0, 1, 2, 3, 4
_KEEP_MODE = {"spatial": KEEP_SPATIAL, "channel": KEEP_CHANNEL}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K for 16-bit inputs, num_warps, num_stages) per architecture family, in order of
# preference; 32-bit inputs halve BLOCK_K (_tuning.tile_configs). Each compiles for its architecture without a
# spill and within its shared memory, for every launch of the host code (benchmarks/gpu_static.py, the table in
# benchmarks/results/gpu_static_triton3.8.md; tests/test_gpu_static.py guards it).
_CONV_TILES = {90: [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)],
               80: [(128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)]}
_WGRAD_TILES = {90: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)],
                80: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3)]}

def _conv_configs(family, element_size):
    if INTERPRET:  # the interpreter is slow: one small tile, no tuning
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    return tile_configs(_CONV_TILES.get(family, []), element_size, GROUP_M=8)


def _wgrad_configs(family, element_size):
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return tile_configs(_WGRAD_TILES.get(family, []), element_size)


def _prune(rows: str, cols: str):
    """Drop tiles far larger than the problem (they only cost compile and tuning time): BLOCK_M beyond the
    rows and BLOCK_N beyond the columns, rounded up to a power of two (>= 64)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        m = max(64, triton.next_power_of_2(args[rows]))
        n = max(64, triton.next_power_of_2(args[cols]))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m and c.kwargs["BLOCK_N"] <= n]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in all_configs(_conv_configs))
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in all_configs(_conv_configs))
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in all_configs(_conv_configs))
_MAX_BLOCK_K = max(c.kwargs["BLOCK_K"] for c in all_configs(_wgrad_configs))


def _span(block_rows: int, hw: int) -> int:
    """Most samples a run of ``block_rows`` consecutive pixel rows can touch (a compile-time bound for
    the channel mask; any value > 8 selects the per-row draw, so it is capped at 9)."""
    return min((block_rows - 1) // hw + 2, 9)


# Per-step kernel arguments: typed (u64 / i64 whatever their value) and never value-specialised (== 1,
# divisible by 16), so a new seed or sample offset reuses the compiled kernel instead of recompiling mid-run.
# A seed is any uint64: the custom op carries seeds >= 2**63 as their two's complement and the host takes
# them back modulo 2**64 before the launch.
_PER_STEP = ["seed", "sample_offset"]


@triton.jit
def _spatial_keep(n, pix, HW, seed, sample_offset, ratio):
    """keep of pixel ``pix`` (= h*W + w) of sample ``n``: Philox counter g*H*W + h*W + w."""
    counter = (n.to(tl.int64) + sample_offset) * HW + pix
    return tl.rand(seed, counter) >= ratio


@triton.jit
def _channel_keep(n, cs, n_lo, C, seed, sample_offset, ratio, SPAN: tl.constexpr):
    """keep[i, j] of channel cs[j] of sample n[i] (counter g*C + c). The rows of a tile cover at most SPAN
    consecutive samples from n_lo: one Philox draw per (sample, channel), broadcast over the pixels; when a
    tile holds many small samples, one draw per (row, channel) instead."""
    if SPAN > 8:  # (see _span)
        g = n.to(tl.int64) + sample_offset
        keep = tl.rand(seed, g[:, None] * C + cs[None, :]) >= ratio
    else:
        keep = (n[:, None] < 0) & (cs[None, :] < 0)
        for j in tl.static_range(SPAN):
            g = tl.zeros_like(cs).to(tl.int64) + (n_lo + j) + sample_offset
            keep = tl.where((n == n_lo + j)[:, None], (tl.rand(seed, g * C + cs) >= ratio)[None, :], keep)
    return keep


@triton.jit(do_not_specialize=_PER_STEP)
def _keep_table_kernel(out_ptr, NC, seed: tl.uint64, sample_offset: tl.int64, C, ratio, BLOCK: tl.constexpr):
    """out[n * C + c] = keep of channel c of sample n (uint8): the channel mask of the input gradient's epilogue,
    read there like an auxiliary tensor (drawn in the epilogue, SPAN draws per column beside the whole
    accumulator, it spilled)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, idx.to(tl.int64) + sample_offset * C) >= ratio
    tl.store(out_ptr + idx, keep.to(tl.uint8), mask=idx < NC)


# Tuned per pixel-count bucket (P_KEY, a power of two: a new H x W reuses its bucket's tiles; _tuning.py)
@autotune(configs=_conv_configs, reset_to_zero=["part_ptr"], size_prune=_prune("P", "COUT"),
          key=["P_KEY", "CIN", "COUT", "KSIZE", "FLIP", "KEEP_IN", "KEEP_OUT", "EPILOGUE"])
@triton.jit(do_not_specialize=_PER_STEP)
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, aux_ptr, part_ptr, g_ptr,
    P, H, W, P_KEY, sxn, sxp, sxc, swt, swk, swn, syn, syp, syc, san, sap, sac,
    seed: tl.uint64, sample_offset: tl.int64, ratio,
    CIN: tl.constexpr, COUT: tl.constexpr, SPAN: tl.constexpr, KSIZE: tl.constexpr, FLIP: tl.constexpr,
    KEEP_IN: tl.constexpr, KEEP_OUT: tl.constexpr,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    HW = H * W
    pid = tl.program_id(0)
    grid_m = tl.cdiv(P, BLOCK_M)
    grid_n = tl.cdiv(COUT, BLOCK_N)
    group = pid // (GROUP_M * grid_n)  # grouped order: neighbouring programs share input rows in L2
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < P
    col_ok = cols < COUT
    n = rows // HW
    pix = rows % HW
    h = pix // W
    w = pix % W
    n_lo = (pid_m * BLOCK_M) // HW
    PAD: tl.constexpr = KSIZE // 2
    KB: tl.constexpr = (CIN + BLOCK_K - 1) // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat loop over (tap, channel block), so the software pipeliner sees 9 * KB iterations, not 9 short loops
    for it in range(0, KSIZE * KSIZE * KB):
        tap = it // KB
        ks = (it % KB) * BLOCK_K + tl.arange(0, BLOCK_K)
        hs = h + (tap // KSIZE - PAD)
        ws = w + (tap % KSIZE - PAD)
        ok = row_ok & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        if KEEP_IN == 1:  # dropped pixels are not even read
            ok = ok & _spatial_keep(n, hs * W + ws, HW, seed, sample_offset, ratio)
        k_ok = ks < CIN
        x_rows = n.to(tl.int64) * sxn + (hs * W + ws).to(tl.int64) * sxp
        x = tl.load(x_ptr + x_rows[:, None] + ks[None, :] * sxc, mask=ok[:, None] & k_ok[None, :], other=0.0)
        if KEEP_IN == 2:  # after the load: a per-channel load mask would split it into 2-byte loads (no cp.async)
            x = tl.where(_channel_keep(n, ks, n_lo, CIN, seed, sample_offset, ratio, SPAN), x, 0.0)
        w_tap = (KSIZE * KSIZE - 1 - tap) if FLIP else tap
        wt = tl.load(w_ptr + w_tap * swt + ks[:, None] * swk + cols[None, :] * swn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot(x, wt, acc, DOT_PREC)

    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        acc = tl.maximum(acc, 0.0)
    if EPILOGUE == 2:  # squared error against the teacher, this tile's share of the loss, and D = G - T
        t = tl.load(aux_ptr + n.to(tl.int64)[:, None] * san + pix.to(tl.int64)[:, None] * sap
                    + cols[None, :] * sac, mask=out_mask, other=0.0)
        diff = tl.where(out_mask, acc - t.to(tl.float32), 0.0)
        tl.store(part_ptr + pid_m * grid_n + pid_n, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
        acc = diff
    if EPILOGUE == 3:  # gradient through ReLU: gate by the stored activation, times c = g * 2 alpha / N
        hid = tl.load(aux_ptr + n.to(tl.int64)[:, None] * san + pix.to(tl.int64)[:, None] * sap
                      + cols[None, :] * sac, mask=out_mask, other=0.0)
        acc = tl.where(hid > 0, acc * tl.load(g_ptr).to(tl.float32), 0.0)
    if EPILOGUE == 4:  # gradient through the mask: regenerate it for the output pixels / channels
        if KEEP_OUT == 1:
            acc = tl.where(_spatial_keep(n, pix, HW, seed, sample_offset, ratio)[:, None], acc, 0.0)
        if KEEP_OUT == 2:  # the channel mask, from the keep table in aux (_keep_table_kernel)
            keep = tl.load(aux_ptr + n.to(tl.int64)[:, None] * san + cols[None, :] * sac, mask=out_mask, other=0)
            acc = tl.where(keep != 0, acc, 0.0)
    if WRITE_Y:
        y = y_ptr + n.to(tl.int64)[:, None] * syn + pix.to(tl.int64)[:, None] * syp + cols[None, :] * syc
        store(y, acc, out_mask)


@autotune(configs=_wgrad_configs, key=["P_KEY", "CIN", "COUT", "KSIZE", "KEEP_IN"],
          size_prune=_prune("COUT", "CIN"))
@triton.jit(do_not_specialize=_PER_STEP)
def _conv_wgrad_kernel(
    x_ptr, dy_ptr, part_ptr, bpart_ptr, g_ptr,
    P, H, W, P_KEY, p_chunk, sxn, sxp, sxc, sdn, sdp, sdc, seed: tl.uint64, sample_offset: tl.int64, ratio,
    CIN: tl.constexpr, COUT: tl.constexpr, SPAN: tl.constexpr, P_CHUNK: tl.constexpr,
    KSIZE: tl.constexpr, KEEP_IN: tl.constexpr, HAS_G: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[split, co, ci, tap] = sum_{p in split} dY[p, co] (X * keep)[p + off(tap), ci];
    bpart[split, co] = sum_{p in split} dY[p, co] (centre tap, first channel block only, after the main loop).
    With one split (HAS_G) part/bpart are dW/db themselves."""
    HW = H * W
    pid = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    grid_n = tl.cdiv(CIN, BLOCK_N)
    pid_m = pid // grid_n
    pid_n = pid % grid_n
    co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    ci_ok = ci < CIN
    PAD: tl.constexpr = KSIZE // 2
    dh = tap // KSIZE - PAD
    dw = tap % KSIZE - PAD
    do_bias = (tap == (KSIZE * KSIZE) // 2) & (pid_n == 0)
    # Pixels per split: a run-time value on the GPU (a new pixel count compiles nothing new); a static bound
    # in the interpreter (Triton 3.6's cannot take a run-time loop bound under NumPy >= 2.4)
    if INTERPRETING:
        chunk = P_CHUNK
    else:
        chunk = p_chunk
    p_start = split * chunk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, chunk, BLOCK_K):  # chunk is a multiple of every BLOCK_K
        ps = p_start + p0 + tl.arange(0, BLOCK_K)
        p_ok = ps < P
        n = ps // HW
        pix = ps % HW
        hs = pix // W + dh
        ws = pix % W + dw
        ok = p_ok & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        if KEEP_IN == 1:
            ok = ok & _spatial_keep(n, hs * W + ws, HW, seed, sample_offset, ratio)
        x = tl.load(x_ptr + (n.to(tl.int64) * sxn + (hs * W + ws).to(tl.int64) * sxp)[:, None]
                    + ci[None, :] * sxc, mask=ok[:, None] & ci_ok[None, :], other=0.0)
        if KEEP_IN == 2:  # after the load (see _conv_fwd_kernel)
            x = tl.where(_channel_keep(n, ci, (p_start + p0) // HW, CIN, seed, sample_offset, ratio, SPAN), x, 0.0)
        dyt = tl.load(dy_ptr + (n.to(tl.int64) * sdn + pix.to(tl.int64) * sdp)[None, :] + co[:, None] * sdc,
                      mask=p_ok[None, :] & co_ok[:, None], other=0.0)
        acc = dot(dyt, x, acc, DOT_PREC)
    g = 1.0
    if HAS_G:  # a single split writes the gradient itself: scaled by dL_total/dloss, in the weights' dtype
        g = tl.load(g_ptr).to(tl.float32)
        acc = acc * g
    n_w = COUT * CIN * KSIZE * KSIZE
    part = part_ptr + split.to(tl.int64) * n_w + (co[:, None] * CIN + ci[None, :]) * (KSIZE * KSIZE) + tap
    store(part, acc, co_ok[:, None] & ci_ok[None, :])
    if do_bias:  # a second pass over dY once the accumulator is stored (in the main loop the row sums would
        bacc = tl.zeros((BLOCK_M,), dtype=tl.float32)  # copy the dY tile from shared memory every iteration)
        for p0 in range(0, chunk, BLOCK_K):
            ps = p_start + p0 + tl.arange(0, BLOCK_K)
            p_ok = ps < P
            dyt = tl.load(dy_ptr + ((ps // HW).to(tl.int64) * sdn + (ps % HW).to(tl.int64) * sdp)[None, :]
                          + co[:, None] * sdc, mask=p_ok[None, :] & co_ok[:, None], other=0.0)
            bacc += tl.sum(dyt.to(tl.float32), axis=1)
        store(bpart_ptr + split * COUT + co, bacc * g, co_ok)


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, g_ptr, M, R: tl.constexpr, HAS_G: tl.constexpr, BLOCK: tl.constexpr):
    """out[m] = g * sum_{r < R} x[r, m], rows added in order (deterministic)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < M
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = x_ptr + cols.to(tl.int64)
    for r in range(0, R):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += M  # 64-bit pointer arithmetic: r * M may exceed 2**31
    if HAS_G:
        acc = acc * tl.load(g_ptr).to(tl.float32)
    store(out_ptr + cols, acc, ok)


@triton.jit
def _sum_all_kernel(x_ptr, out_ptr, scale, R: tl.constexpr, BLOCK: tl.constexpr):
    """out = scale * sum x[:R] in a fixed order (one program, a block-wide tree at the end)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK):
        idx = r0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < R, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


# ----------------------------------------------------------------------------------------------- host


def _conv(x, x_str, wt, w_str, bias, y, y_str, *, N, H, W, cin, cout, ksize, flip=False, keep_in=KEEP_NONE,
          keep_out=KEEP_NONE, epilogue=EPI_BIAS, aux=None, aux_str=(0, 0, 0), part=None, g=None,
          seed=0, sample_offset=0, ratio=0.0, write_y=True):
    P = N * H * W
    dummy = x
    grid = lambda meta: (triton.cdiv(P, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)  # noqa: E731
    _conv_fwd_kernel[grid](
        x, wt, bias if bias is not None else dummy, y if y is not None else dummy,
        aux if aux is not None else dummy, part if part is not None else torch.empty(1, device=x.device),
        g if g is not None else dummy, P, H, W, triton.next_power_of_2(P), *x_str, *w_str, *y_str, *aux_str,
        seed, sample_offset, ratio, CIN=cin, COUT=cout, SPAN=_span(_MAX_BLOCK_M, H * W), KSIZE=ksize,
        FLIP=flip, KEEP_IN=keep_in, KEEP_OUT=keep_out,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, WRITE_Y=write_y and y is not None,
        DOT_PREC=dot_precision(x))


def _wgrad(x, x_str, dy, dy_str, g, *, N, H, W, cin, cout, ksize, dtype, keep_in=KEEP_NONE, seed=0,
           sample_offset=0, ratio=0.0):
    """(dW [cout, cin, k, k], db [cout]) = g * (sum over pixel splits of the wgrad partials)."""
    P = N * H * W
    tiles = ksize * ksize * triton.cdiv(cout, 128) * triton.cdiv(cin, 128)
    want = max(1, min(triton.cdiv(parallel_target(x.device), tiles), triton.cdiv(P, 512 if on_gpu(x) else 64)))
    # pixels per split: a multiple of every BLOCK_K (static loop bound), the last split more than half full
    split, p_chunk = split_rows(P, want, _MAX_BLOCK_K)
    dw = torch.empty(cout, cin, ksize, ksize, device=x.device, dtype=dtype)
    db = torch.empty(cout, device=x.device, dtype=dtype)
    direct = split == 1  # no partials: the kernel writes g * dW and g * db directly
    part = dw if direct else torch.empty(split, dw.numel(), device=x.device, dtype=torch.float32)
    bpart = db if direct else torch.empty(split, cout, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(cout, meta["BLOCK_M"]) * triton.cdiv(cin, meta["BLOCK_N"]),  # noqa: E731
                         ksize * ksize, split)
    _conv_wgrad_kernel[grid](x, dy, part, bpart, g if g is not None else part, P, H, W, triton.next_power_of_2(P),
                             p_chunk, *x_str, *dy_str, seed, sample_offset, ratio, CIN=cin, COUT=cout,
                             SPAN=_span(_MAX_BLOCK_K, H * W), P_CHUNK=p_chunk if INTERPRET else 0, KSIZE=ksize,
                             KEEP_IN=keep_in,
                             HAS_G=direct and g is not None, DOT_PREC=dot_precision(x))
    if not direct:
        _sum_rows(part, dw, g)
        _sum_rows(bpart, db, g)
    return dw, db


def _keep_table(n: int, c: int, seed: int, sample_offset: int, ratio: float, device) -> torch.Tensor:
    """The channel mask's keep of every (sample, channel) as uint8 [N, C] (_keep_table_kernel)."""
    out = torch.empty(n, c, device=device, dtype=torch.uint8)
    _keep_table_kernel[(triton.cdiv(n * c, 1024),)](out, n * c, seed, sample_offset, c, ratio, BLOCK=1024)
    return out


def _sum_rows(part: torch.Tensor, out: torch.Tensor, g: Optional[torch.Tensor], block: int = 1024):
    m = out.numel()
    _sum_rows_kernel[(triton.cdiv(m, block),)](part, out, g if g is not None else part, m, R=part.shape[0],
                                                HAS_G=g is not None, BLOCK=block)


def _gen_weights(w: torch.Tensor, input_grad: bool = False):
    """-> (wt, (tap, k, n) strides): a 3x3 weight [co, ci, 3, 3] as the GEMM operand B[tap, k, n], copied once
    per call so that k, the reduction axis, is contiguous (16-byte cp.async for every dtype: TF32 tensor cores
    take K-major operands only). Forward: k = ci, n = co ([3, 3, co, ci]); input gradient (flipped taps):
    k = co, n = ci ([3, 3, ci, co])."""
    c_out, c_in = w.shape[0], w.shape[1]
    if input_grad:
        return w.permute(2, 3, 1, 0).contiguous(), (c_in * c_out, 1, c_out)
    return w.permute(2, 3, 0, 1).contiguous(), (c_in * c_out, 1, c_in)


def mgd_forward(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b, mask: str, ratio: float,
                alpha: float, seed: int, sample_offset: int, need_grad: bool):
    """-> (loss, A or empty, H1, D or empty): three fused launches (align, conv1, conv2+MSE) and a sum."""
    N, cs, H, W = student.shape
    C, P = teacher.shape[1], N * H * W
    dtype, dev = student.dtype, student.device
    student, s_str = pixel_rows(student)
    teacher, t_str = pixel_rows(teacher)
    nhwc = nhwc_strides(H * W, C)
    geo = dict(N=N, H=H, W=W)
    rng = dict(seed=seed, sample_offset=sample_offset, ratio=ratio)
    gen_b1, gen_b2 = gen_b1.contiguous(), gen_b2.contiguous()  # the kernels read biases with unit stride
    if align_w is not None:  # 1x1 GEMM + bias, written once channels-last (the generator reads it 9 times)
        a = torch.empty(P, C, device=dev, dtype=dtype)
        _conv(student, s_str, align_w, (0, align_w.stride(1), align_w.stride(0)), align_b.contiguous(), a, nhwc,
              cin=cs, cout=C, ksize=1, **geo)
        x, x_str = a, nhwc
    else:
        a, x, x_str = student.new_empty(0), student, s_str
    w1t, w1_str = _gen_weights(gen_w1)
    w2t, w2_str = _gen_weights(gen_w2)
    hidden = torch.empty(P, C, device=dev, dtype=dtype)
    _conv(x, x_str, w1t, w1_str, gen_b1, hidden, nhwc, cin=C, cout=C, ksize=3, keep_in=_KEEP_MODE[mask],
          epilogue=EPI_BIAS_RELU, **rng, **geo)
    dg = torch.empty(P, C, device=dev, dtype=dtype) if need_grad else student.new_empty(0)
    # one loss partial per tile of the finest config (power-of-two length: few variants of the sum kernel)
    part = torch.zeros(triton.next_power_of_2(triton.cdiv(P, _MIN_BLOCK_M) * triton.cdiv(C, _MIN_BLOCK_N)),
                       device=dev, dtype=torch.float32)
    _conv(hidden, nhwc, w2t, w2_str, gen_b2, dg if need_grad else None, nhwc, cin=C, cout=C, ksize=3,
          epilogue=EPI_MSE, aux=teacher, aux_str=t_str, part=part, **geo)
    loss = torch.empty((), device=dev, dtype=torch.float32)
    _sum_all_kernel[(1,)](part, loss, alpha / N, R=part.numel(), BLOCK=1024)
    return loss, a, hidden, dg


def _only_needed(grads: List[torch.Tensor], needs: List[bool]) -> List[torch.Tensor]:
    # a kernel may produce more than asked (dW with db); the op's schema promises empties for the rest
    return [g if need else g.new_empty(0) for g, need in zip(grads, needs)]


def mgd_backward(grad_loss, student, gen_w1, gen_w2, align_w, a, hidden, dg, mask: str, ratio: float,
                 alpha: float, seed: int, sample_offset: int, needs: List[bool]):
    """Gradients [dS, dWa, dba, dW1, db1, dW2, db2] (unwanted ones as empty tensors)."""
    if dg.numel() == 0:
        raise RuntimeError("mgd_loss (triton): backward called on a forward run without gradients")
    N, cs, H, W = student.shape
    C = gen_w1.shape[0]
    dtype, dev = student.dtype, student.device
    grads = [student.new_empty(0) for _ in range(7)]  # distinct: outputs of a custom op may not alias
    ds = torch.empty_like(student) if needs[0] else None  # the student's own layout
    student, s_str = pixel_rows(student)
    nhwc = nhwc_strides(H * W, C)
    geo = dict(N=N, H=H, W=W)
    rng = dict(seed=seed, sample_offset=sample_offset, ratio=ratio)
    mode = _KEEP_MODE[mask]
    # c = g * 2 alpha / N in fp32: the only place the (possibly tiny) factor meets the (possibly huge) g
    g = grad_loss.detach().to(torch.float32).reshape(()) * (2.0 * alpha / N)
    x, x_str = (a, nhwc) if align_w is not None else (student, s_str)
    if needs[5] or needs[6]:
        grads[5], grads[6] = _wgrad(hidden, nhwc, dg, nhwc, g, cin=C, cout=C, ksize=3, dtype=dtype, **geo)
    if not any(needs[:5]):
        return _only_needed(grads, needs)
    w2t, w2_str_t = _gen_weights(gen_w2, input_grad=True)
    dh = torch.empty_like(hidden)  # dL/dZ1 = g * relu'(Z1) * (conv2 input gradient)
    _conv(dg, nhwc, w2t, w2_str_t, None, dh, nhwc, cin=C, cout=C, ksize=3, flip=True,
          epilogue=EPI_RELU_GRAD, aux=hidden, aux_str=nhwc, g=g, **geo)
    if needs[3] or needs[4]:
        grads[3], grads[4] = _wgrad(x, x_str, dh, nhwc, None, cin=C, cout=C, ksize=3, dtype=dtype,
                                    keep_in=mode, **rng, **geo)
    if not any(needs[:3]):
        return _only_needed(grads, needs)
    w1t, w1_str_t = _gen_weights(gen_w1, input_grad=True)
    gate = dict(epilogue=EPI_KEEP_GRAD, keep_out=mode, **rng, **geo)
    if mode == KEEP_CHANNEL:  # the [N, C] keep table (one byte an entry), read by the epilogue as aux
        gate.update(aux=_keep_table(N, C, seed, sample_offset, ratio, dev), aux_str=(C, 0, 1))
    if align_w is None:  # dS = keep * (conv1 input gradient), written in the student's layout
        ds, ds_str = pixel_rows(ds)
        _conv(dh, nhwc, w1t, w1_str_t, None, ds, ds_str, cin=C, cout=C, ksize=3, flip=True, **gate)
        grads[0] = ds
        return _only_needed(grads, needs)
    da = torch.empty_like(hidden)
    _conv(dh, nhwc, w1t, w1_str_t, None, da, nhwc, cin=C, cout=C, ksize=3, flip=True, **gate)
    if needs[0]:
        ds, ds_str = pixel_rows(ds)
        wa = align_w.reshape(C, cs)  # B[k = c, n = cs]; K-major for 4-byte inputs (TF32, see _gen_weights)
        wa = wa.t().contiguous().t() if wa.element_size() == 4 else wa
        _conv(da, nhwc, wa, (0, wa.stride(0), wa.stride(1)), None, ds, ds_str, cin=C, cout=cs, ksize=1, **geo)
        grads[0] = ds
    if needs[1] or needs[2]:
        grads[1], grads[2] = _wgrad(student, s_str, da, nhwc, None, cin=cs, cout=C, ksize=1, dtype=dtype, **geo)
    return _only_needed(grads, needs)


def applied_keep_mask(mode: str, n: int, c: int, h: int, w: int, *, ratio: float, seed: int,
                      sample_offset: int = 0, device="cpu") -> torch.Tensor:
    """The keep-mask exactly as the kernels apply it, [N, C, H, W] float32 (a test/debug entry, not a
    fast path): the forward kernel's masked input load on an all-ones feature through an identity 1x1."""
    P, hw = n * h * w, h * w
    ones = torch.ones(P, c, device=device)
    eye = torch.eye(c, device=device)
    out = torch.empty(P, c, device=device)
    nhwc = nhwc_strides(hw, c)
    _conv(ones, nhwc, eye, (0, c, 1), None, out, nhwc, N=n, H=h, W=w, cin=c, cout=c, ksize=1,
          keep_in=_KEEP_MODE[mode], seed=seed, sample_offset=sample_offset, ratio=ratio)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ custom op and autograd
# Seeds are uint64 by contract; the op schema carries int64, so seeds >= 2**63 travel as their two's complement.
_U64 = 2**64


def _forward_op(student: torch.Tensor, teacher: torch.Tensor, gen_w1: torch.Tensor, gen_b1: torch.Tensor,
                gen_w2: torch.Tensor, gen_b2: torch.Tensor, align_w: Optional[torch.Tensor],
                align_b: Optional[torch.Tensor], mask: str, ratio: float, alpha: float, seed: int,
                sample_offset: int, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(student):
        return tuple(mgd_forward(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b, mask, ratio,
                                alpha, seed % _U64, sample_offset, need_grad))


def _forward_fake(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b, mask, ratio, alpha, seed,
                  sample_offset, need_grad):
    N, _, H, W = student.shape
    pc = (N * H * W, teacher.shape[1])
    return (student.new_empty((), dtype=torch.float32), student.new_empty(pc if align_w is not None else (0,)),
            student.new_empty(pc), student.new_empty(pc if need_grad else (0,)))


def _backward_op(grad_loss: torch.Tensor, student: torch.Tensor, gen_w1: torch.Tensor, gen_w2: torch.Tensor,
                 align_w: Optional[torch.Tensor], a: torch.Tensor, hidden: torch.Tensor, dg: torch.Tensor,
                 mask: str, ratio: float, alpha: float, seed: int, sample_offset: int,
                 needs: List[bool]) -> List[torch.Tensor]:
    with device_guard(student):
        return mgd_backward(grad_loss, student, gen_w1, gen_w2, align_w, a, hidden, dg, mask, ratio, alpha,
                            seed % _U64, sample_offset, needs)


def _backward_fake(grad_loss, student, gen_w1, gen_w2, align_w, a, hidden, dg, mask, ratio, alpha, seed,
                   sample_offset, needs):
    C = gen_w1.shape[0]
    like = [student, align_w, None if align_w is None else student.new_empty(C), gen_w1, student.new_empty(C),
            gen_w2, student.new_empty(C)]
    grads = [student.new_empty(t.shape) if need and t is not None else student.new_empty(0)  # contiguous, as real
             for t, need in zip(like, needs)]
    if needs[0]:
        grads[0] = torch.empty_like(student)  # dS keeps the student's layout
    return grads


def _save(inp: dict, out: tuple):
    tensors = (inp["student"], inp["gen_w1"], inp["gen_w2"], inp["align_w"], *out[1:])  # out: loss, A, H1, D
    return tensors, {k: inp[k] for k in ("mask", "ratio", "alpha", "seed", "sample_offset")}


_mgd_op = fused_loss_op("mgd_loss", forward=_forward_op, forward_fake=_forward_fake, backward=_backward_op,
                        backward_fake=_backward_fake, save=_save,
                        grad_inputs=("student", "align_w", "align_b", "gen_w1", "gen_b1", "gen_w2", "gen_b2"))


def refuse(student, teacher, gen_w1, align_w=None, mask="spatial", **_) -> Optional[str]:
    """Why these inputs cannot run on the Triton MGD kernels (None if they can)."""
    if student.dtype not in _DTYPES:
        return f"dtype {student.dtype} is not supported by the Triton MGD kernels (float32, bfloat16, float16)"
    n, cs, h, w = student.shape
    c = teacher.shape[1]
    if n * h * w * max(c, cs) >= 2**31 or 9 * c * c >= 2**31:
        return f"feature [{n}, {c}, {h}, {w}] is too large for 32-bit pixel/weight indexing in the kernels"
    if min(n, h, w, c, cs) == 0:
        return "empty feature map"
    return None


def mgd_loss(student, teacher, gen_w1, gen_b1, gen_w2, gen_b2, *, align_w=None, align_b=None, mask="spatial",
             ratio=0.65, alpha=2e-5, seed: int, sample_offset=0) -> torch.Tensor:
    """The fused MGD loss (0-d float32); differentiable in student, align and generator parameters."""
    params = (student, gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    seed = seed - _U64 if seed >= 2**63 else seed
    return _mgd_op(student, teacher.detach(), gen_w1, gen_b1, gen_w2, gen_b2, align_w, align_b, mask,
                   float(ratio), float(alpha), seed, int(sample_offset), need_grad)
