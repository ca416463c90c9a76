"""Fused CT loss in Triton: the channel-wise transform MLP + squared error, forward and backward.

The maths, per pixel, over the M = N*H*W rows of the features read as [M, C] matrices::

    H    = relu(S W1^T + b1)                     S [M, Cs], W1 [Ch, Cs]        (kernel 1)
    Y    = H W2^T + b2                           W2 [Ct, Ch]                   (kernel 2 ...)
    loss = alpha/D * sum((Y - T)^2)              D = N ("sum_over_batch") or M*Ct ("mean")
    E    = Y - T                                 (... kernel 2's epilogue, with per-tile loss and
                                                  per-tile column sums of E)
  backward, g = dL/dloss, c = g * 2 alpha/D (an fp32 scalar):
    dY   = c E
    dW2  = c E^T H,   db2 = c sum_rows E                                       (weight-grad kernel)
    dP   = c (E W2) * [H > 0],   db1 = sum_rows dP                             (kernel 3)
    dW1  = dP^T S                                                              (weight-grad kernel)
    dS   = dP W1                                                               (kernel 4 = kernel 1's GEMM)

E, not dY, is stored: in fp16 2 alpha/D (Y - T) underflows at real alphas (1e-5 and below) before a loss
scaler's g could lift it, while E has the features' magnitude; the factor stays in fp32 and reaches the
kernels folded into c.

What is written to memory: H [M, Ch] and E [M, Ct] once in the forward (E only when a gradient is
wanted), dP [M, Ch] and dS [M, Cs] in the backward, plus small fp32 partials (one loss value per tile,
one column-sum row per row tile, one [Ct, Ch] / [Ch, Cs] block per row split). No Y, fp32
upcast or permuted copy of S or T is ever made: S, T and dS are addressed through their strides
(NCHW-contiguous and channels_last both work: row m = (n, p = h*W + w) sits at n*sN + p*sP).
Speed by layout (from the sm_90 code Triton 3.6 generates): channels_last features, and NCHW ones
whose H*W is a multiple of 16, are read with 16-byte vector loads in the software-pipelined K loop;
NCHW features with other H*W (7x7, FPN P4-P7) are read with coalesced 2-byte loads outside the
cp.async pipeline (a tile of rows may span two samples, so no wider contiguity can be proven):
prefer channels_last there.

Every reduction is deterministic: tiles write partials, summed afterwards in a fixed order; no float
atomics. All GEMMs are ``tl.dot`` with float32 accumulation (bf16/fp16 on tensor cores). float32 inputs
follow ``torch.backends.cudnn.allow_tf32``, the flag that governs the reference's 1x1 convolutions on
the same GPU (PyTorch's default: TF32 on); with it off they are multiplied in IEEE float32. Channel
counts need not be multiples of 16 (masked loads).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._custom_op import fused_loss_op
from ._tuning import all_configs, tile_configs
from ._triton_common import (INTERPRET, INTERPRETING, autotune, device_guard, dot, dot_precision, nhwc_strides,
                             parallel_target, pixel_rows, split_rows, store)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

EPI_HIDDEN, EPI_MSE, EPI_DHIDDEN, EPI_PLAIN = 0, 1, 2, 3

# Tiles (rows, columns, reduction step for 16-bit inputs, num_warps, num_stages) per architecture family, in order
# of preference; 32-bit inputs halve the reduction step (_tuning.tile_configs). Each compiles for its architecture
# without a spill and within its shared memory (benchmarks/gpu_static.py; tests/test_gpu_static.py guards it).
_ROW_TILES = {90: [(64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                   (64, 64, 64, 4, 4)],
              80: [(64, 128, 64, 4, 4), (64, 64, 64, 8, 3)]}
_WG_TILES = {90: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
             80: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)]}


def _row_configs(family, element_size):
    if INTERPRET:  # one small config: exercises several row/column tiles and masking at test shapes
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16})]
    return tile_configs(_ROW_TILES.get(family, []), element_size)


def _wg_configs(family, element_size):
    if INTERPRET:
        return [triton.Config({"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_K": 16})]
    return tile_configs(_WG_TILES.get(family, []), element_size, names=("BLOCK_A", "BLOCK_B", "BLOCK_K"))


_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in all_configs(_row_configs))
# Rows per split of the weight-gradient kernel: a multiple of this, itself a multiple of every BLOCK_K.
_WG_ROW_ALIGN = 32 if INTERPRET else 128


@triton.jit
def _row_offsets(rows, HW, s_n, s_p):
    """Memory offset of feature row m = n*HW + p (p = h*W + w), for any NCHW/NHWC-style strides."""
    return (rows // HW).to(tl.int64) * s_n + (rows % HW).to(tl.int64) * s_p


# Tuned per row-count bucket (M_KEY, a power of two: a new H x W reuses its bucket's tiles; _tuning.py)
@autotune(configs=_row_configs, key=["M_KEY", "K", "N_OUT", "EPI"], reset_to_zero=["part_ptr", "dbp_ptr"])
@triton.jit
def _row_gemm_kernel(x_ptr, sx_n, sx_p, sx_c,            # X: feature rows [M, K]
                     w_ptr, sw_k, sw_n,                  # B [K, N_OUT] (a weight, through strides)
                     bias_ptr,                           # [N_OUT] (EPI_HIDDEN, EPI_MSE)
                     out_ptr, so_n, so_p, so_c,          # out rows [M, N_OUT] (H, dY, dP or dS)
                     aux_ptr, sa_n, sa_p, sa_c,          # T (EPI_MSE) or H (EPI_DHIDDEN)
                     part_ptr,                           # fp32 loss partial per tile (EPI_MSE)
                     dbp_ptr,                            # fp32 column sums per row tile [tiles_m, N_OUT]
                     g_ptr,                              # c = dL/dloss * 2 alpha / D (EPI_DHIDDEN)
                     M, HW, N_OUT, M_KEY, K: tl.constexpr,
                     EPI: tl.constexpr, STORE_OUT: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = epilogue(X @ B) for one [BLOCK_M, BLOCK_N] tile; the column tiles of a row tile are
    neighbours in launch order, so X's rows are re-read from L2, not HBM. K (a channel count) is a
    compile-time constant: one compilation per layer width, and the loop bound is static (Triton 3.6's
    interpreter cannot take a runtime loop bound under NumPy >= 2.4)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N_OUT
    x_rows = _row_offsets(rows, HW, sx_n, sx_p)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        x = tl.load(x_ptr + x_rows[:, None] + ks[None, :] * sx_c, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :] * sw_n, mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        acc = dot(x, w, acc, DOT_PREC)

    mask = mask_m[:, None] & mask_n[None, :]
    o_off = _row_offsets(rows, HW, so_n, so_p)[:, None] + cols[None, :] * so_c
    if EPI == 0:  # hidden = relu(S W1^T + b1)
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc = tl.maximum(acc, 0.0)
    if EPI == 1:  # squared error against T, per-tile loss, E = Y - T and its column sums
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        a_off = _row_offsets(rows, HW, sa_n, sa_p)[:, None] + cols[None, :] * sa_c
        t = tl.load(aux_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, acc - t, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(d * d, axis=1), axis=0))
        acc = d
        if STORE_OUT:
            tl.store(dbp_ptr + pid_m * N_OUT + cols, tl.sum(acc, axis=0), mask=mask_n)
    if EPI == 2:  # dP = c (E W2) gated by relu'(.) = [H > 0], and its column sums (db1)
        a_off = _row_offsets(rows, HW, sa_n, sa_p)[:, None] + cols[None, :] * sa_c
        h = tl.load(aux_ptr + a_off, mask=mask, other=0.0)
        acc = tl.where(h > 0, acc * tl.load(g_ptr).to(tl.float32), 0.0)
        tl.store(dbp_ptr + pid_m * N_OUT + cols, tl.sum(acc, axis=0), mask=mask_n)
    if STORE_OUT:
        store(out_ptr + o_off, acc, mask)


@autotune(configs=_wg_configs, key=["M_KEY", "A", "B"])
@triton.jit
def _weight_grad_kernel(a_ptr, sa_n, sa_p, sa_c,         # A: feature rows [M, A]
                        b_ptr, sb_n, sb_p, sb_c,         # B: feature rows [M, B]
                        out_ptr,                         # fp32 [splits, A, B]
                        M, HW, A, B, M_KEY, rows_per_split,
                        ROWS_PER_SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split] = A[rows of split]^T @ B[rows of split]: a split-K GEMM over the rows. The rows per split,
    a multiple of every BLOCK_K, come as ``rows_per_split`` (ROWS_PER_SPLIT, the same value, is the static
    loop bound the interpreter needs; 0 on the GPU); split_rows keeps the last split more than half full,
    so few of its iterations are fully masked."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_b = tl.cdiv(B, BLOCK_B)
    offs_a = (pid // tiles_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = (pid % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < A
    mask_b = offs_b < B
    # Rows per split: a run-time value on the GPU (a new row count compiles nothing new); a static bound in
    # the interpreter (see _row_gemm_kernel)
    if INTERPRETING:
        chunk = ROWS_PER_SPLIT
    else:
        chunk = rows_per_split
    row_start = split * chunk
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for r0 in range(0, chunk, BLOCK_K):
        rows = row_start + r0 + tl.arange(0, BLOCK_K)
        mask_r = rows < M
        at = tl.load(a_ptr + offs_a[:, None] * sa_c + _row_offsets(rows, HW, sa_n, sa_p)[None, :],
                     mask=mask_a[:, None] & mask_r[None, :], other=0.0)
        bt = tl.load(b_ptr + _row_offsets(rows, HW, sb_n, sb_p)[:, None] + offs_b[None, :] * sb_c,
                     mask=mask_r[:, None] & mask_b[None, :], other=0.0)
        acc = dot(at, bt, acc, DOT_PREC)
    out = out_ptr + split.to(tl.int64) * A * B + offs_a[:, None] * B + offs_b[None, :]
    tl.store(out, acc, mask=mask_a[:, None] & mask_b[None, :])


# ----------------------------------------------------------------------------------------- host side

def _denominator(reduction: str, n: int, numel: int) -> float:
    return float(n) if reduction == "sum_over_batch" else float(numel)


def _matrix(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1])


def _k_major(b: torch.Tensor) -> torch.Tensor:
    """The GEMM operand B [K, N] with K contiguous for 4-byte inputs: a copy of the weight (TF32 tensor cores take
    K-major operands only; an N-major one reaches shared memory 4 bytes at a time). 16-bit inputs keep the
    weight as it is: their MMAs read either layout from shared memory after 16-byte copies."""
    return b.t().contiguous().t() if b.element_size() == 4 and b.stride(0) != 1 else b


def _row_gemm(x, xs, w_kn, bias, out, os_, aux, as_, part, dbp, g, m, hw, epi, store_out):
    k, n_out = w_kn.shape
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
    # Unused pointer arguments get a fresh empty tensor, never an input: the autotuner zeroes
    # part_ptr / dbp_ptr before each trial (reset_to_zero).
    unused = torch.empty((0,), device=x.device, dtype=torch.float32)
    pick = lambda t: unused if t is None else t  # noqa: E731
    _row_gemm_kernel[grid](x, *xs, w_kn, w_kn.stride(0), w_kn.stride(1), pick(bias), pick(out), *os_,
                           pick(aux), *as_, pick(part), pick(dbp),
                           pick(g), m, hw, n_out, triton.next_power_of_2(m), K=k,
                           EPI=epi, STORE_OUT=store_out, DOT_PREC=dot_precision(x))


def _splits(m: int, a: int, b: int, device: torch.device) -> int:
    """Row splits wanted for a weight gradient: about two programs per SM, >= 2048 rows each (the fp32
    partials, splits x a x b, are written and summed once more: keep them small next to the rows)."""
    if INTERPRET:
        return 2  # exercises the partial sums at test shapes
    tiles = triton.cdiv(a, 128) * triton.cdiv(b, 128)
    return max(1, min(triton.cdiv(parallel_target(device), tiles), m // 2048))


def _weight_grad(a, as_, b, bs_, m, hw, n_a, n_b) -> torch.Tensor:
    """sum over rows of a[m, :]^T b[m, :] -> fp32 [n_a, n_b], via fixed-order sum of split partials."""
    splits, rows_per_split = split_rows(m, _splits(m, n_a, n_b, a.device), _WG_ROW_ALIGN)
    part = torch.empty((splits, n_a, n_b), device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n_a, meta["BLOCK_A"]) * triton.cdiv(n_b, meta["BLOCK_B"]), splits)  # noqa: E731
    _weight_grad_kernel[grid](a, *as_, b, *bs_, part, m, hw, n_a, n_b, triton.next_power_of_2(m), rows_per_split,
                              ROWS_PER_SPLIT=rows_per_split if INTERPRET else 0,
                              DOT_PREC=dot_precision(a))
    return part[0] if splits == 1 else part.sum(0)


def ct_forward(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
               w2: torch.Tensor, b2: torch.Tensor, alpha: float, reduction: str,
               needs_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, H [M, Ch], E = Y - T [M, Ct], column sums of E [Ct] fp32); the last two empty when no
    gradient is wanted (the backward scales both by g * 2 alpha / D)."""
    n, cs, h, w = student.shape
    ct, ch, hw = teacher.shape[1], w1.shape[0], h * w
    m = n * hw
    s, ss = pixel_rows(student)
    t, ts = pixel_rows(teacher.detach())
    dev, dt = student.device, student.dtype

    hidden = torch.empty((m, ch), device=dev, dtype=dt)
    _row_gemm(s, ss, _matrix(w1).t(), b1, hidden, nhwc_strides(hw, ch), None, (0, 0, 0), None, None, None,
              m, hw, EPI_HIDDEN, True)

    tiles_m = triton.cdiv(m, _MIN_BLOCK_M)
    part = torch.zeros((tiles_m * triton.cdiv(ct, 16),), device=dev, dtype=torch.float32)
    err = torch.empty((m, ct) if needs_grad else (0,), device=dev, dtype=dt)
    ebp = torch.zeros((tiles_m, ct) if needs_grad else (0,), device=dev, dtype=torch.float32)
    _row_gemm(hidden, nhwc_strides(hw, ch), _matrix(w2).t(), b2, err, nhwc_strides(hw, ct), t, ts, part, ebp,
              None, m, hw, EPI_MSE, needs_grad)
    loss = part.sum() * (alpha / _denominator(reduction, n, m * ct))
    err_sum = ebp.sum(0) if needs_grad else ebp
    if not needs_grad:
        hidden = hidden.new_empty((0,))
    return loss, hidden, err, err_sum


def ct_backward(grad: torch.Tensor, student: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                hidden: torch.Tensor, err: torch.Tensor, err_sum: torch.Tensor, alpha: float, reduction: str,
                needs: List[bool]) -> List[torch.Tensor]:
    """-> [dS, dW1, db1, dW2, db2] (an empty tensor where ``needs`` says no gradient is wanted)."""
    n, cs, h, w = student.shape
    ch, ct, hw = w1.shape[0], w2.shape[0], h * w
    m = n * hw
    need_s, need_w1, need_b1, need_w2, need_b2 = needs
    # c = g * 2 alpha / D in fp32: the only place the (possibly tiny) factor meets the (possibly huge) g
    c = grad.to(device=student.device, dtype=torch.float32).reshape(()) * (2.0 * alpha / _denominator(
        reduction, n, m * ct))
    grads = [student.new_empty((0,)) for _ in range(5)]
    if need_w2:
        dw2 = _weight_grad(err, nhwc_strides(hw, ct), hidden, nhwc_strides(hw, ch), m, hw, ct, ch)
        grads[3] = (dw2 * c).to(w2.dtype).reshape(w2.shape)
    if need_b2:
        grads[4] = (err_sum * c).to(w2.dtype)
    if not (need_s or need_w1 or need_b1):
        return grads
    s, ss = pixel_rows(student)
    dp = torch.empty((m, ch), device=student.device, dtype=student.dtype)
    dbp = torch.zeros((triton.cdiv(m, _MIN_BLOCK_M), ch), device=student.device, dtype=torch.float32)
    _row_gemm(err, nhwc_strides(hw, ct), _k_major(_matrix(w2)), None, dp, nhwc_strides(hw, ch), hidden,
              nhwc_strides(hw, ch), None, dbp, c, m, hw, EPI_DHIDDEN, True)
    if need_b1:
        grads[2] = dbp.sum(0).to(w1.dtype)
    if need_w1:
        grads[1] = _weight_grad(dp, nhwc_strides(hw, ch), s, ss, m, hw, ch, cs).to(w1.dtype).reshape(w1.shape)
    if need_s:
        ds = torch.empty_like(s)  # same memory format as the student (NCHW or channels_last)
        _row_gemm(dp, nhwc_strides(hw, ch), _k_major(_matrix(w1)), None, ds, pixel_rows(ds)[1], None, (0, 0, 0),
                  None, None, None, m, hw, EPI_PLAIN, True)
        grads[0] = ds
    return grads


# ------------------------------------------------------------------------- custom op and entry point

def _forward_op(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                w2: torch.Tensor, b2: torch.Tensor, alpha: float, reduction: str,
                needs_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(student):
        return ct_forward(student, teacher, w1, b1, w2, b2, alpha, reduction, needs_grad)


def _forward_fake(student, teacher, w1, b1, w2, b2, alpha, reduction, needs_grad):
    n, _, h, w = student.shape
    m, ch, ct = n * h * w, w1.shape[0], teacher.shape[1]
    loss = student.new_empty((), dtype=torch.float32)
    if not needs_grad:
        return (loss, student.new_empty((0,)), student.new_empty((0,)),
                student.new_empty((0,), dtype=torch.float32))
    return (loss, student.new_empty((m, ch)), student.new_empty((m, ct)),
            student.new_empty((ct,), dtype=torch.float32))


def _backward_op(grad: torch.Tensor, student: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 hidden: torch.Tensor, err: torch.Tensor, err_sum: torch.Tensor, alpha: float, reduction: str,
                 needs: List[bool]) -> List[torch.Tensor]:
    with device_guard(student):
        return ct_backward(grad, student, w1, w2, hidden, err, err_sum, alpha, reduction, needs)


def _backward_fake(grad, student, w1, w2, hidden, err, err_sum, alpha, reduction, needs):
    shapes = [student, w1, w1.new_empty((w1.shape[0],)), w2, w2.new_empty((w2.shape[0],))]
    out = [torch.empty_like(x) if need else student.new_empty((0,)) for x, need in zip(shapes, needs)]
    return out


_ct_op = fused_loss_op("ct_loss", forward=_forward_op, forward_fake=_forward_fake, backward=_backward_op,
                       backward_fake=_backward_fake, grad_inputs=("student", "w1", "b1", "w2", "b2"),
                       save=lambda inp, out: ((inp["student"], inp["w1"], inp["w2"], *out[1:]),
                                              {"alpha": inp["alpha"], "reduction": inp["reduction"]}))


def refuse(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
           **_) -> Optional[str]:
    """Why these inputs cannot run on the fused kernels (None if they can)."""
    if student.dtype not in SUPPORTED_DTYPES:
        return (f"dtype {student.dtype} is not supported by the fused CT kernels (float32, bfloat16, float16); "
                f"the reference backend computes it")
    if student.device.type != "cuda" and not INTERPRET:
        return f"inputs are on {student.device.type}; the fused CT kernels need CUDA (or TRITON_INTERPRET=1)"
    if student.numel() == 0 or teacher.numel() == 0 or w1.numel() == 0:
        return f"empty input (student {list(student.shape)}, teacher {list(teacher.shape)}, w1 {list(w1.shape)})"
    return None


def ct_loss(student: torch.Tensor, teacher: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, *, alpha: float = 1.0, reduction: str = "sum_over_batch") -> torch.Tensor:
    """Fused ``alpha * sum((W2 relu(W1 S + b1) + b2 - T)^2) / D`` -> 0-d float32, differentiable in
    student, w1, b1, w2, b2 (the teacher is treated as a constant)."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (student, w1, b1, w2, b2))
    return _ct_op(student, teacher.detach(), w1, b1, w2, b2, float(alpha), reduction, needs_grad)
