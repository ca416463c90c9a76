// fastkd._C: CT loss (channel-wise transform), forward and backward, on the CPU.
//
//   S' = relu(S W1^T + b1) W2^T + b2     per pixel, S as rows [M = N*H*W, Cs]
//   loss = alpha * sum((S' - T)^2) / N   ('sum_over_batch')  or  / (N*Ct*H*W)  ('mean')
//
// The two 1x1 convolutions are GEMMs over the rows; the layout of the student decides how it is read:
//  * NCHW student (no copy of it is made): forward h_n = relu(S_n^T W1^T + b1) one sgemm per sample
//    (S_n [Cs, HW] read in place; bias + ReLU while the sample's rows are in cache), and backward
//    dW1^T = sum_n S_n dh_n by per-sample sgemms accumulating into one partial per sample range.
//  * channels_last student: its rows are a view; h through oneDNN (below) with bias + ReLU fused.
// GEMMs against a weight ([out, in] or its transpose: S' = h W2^T, dH = dS' W2, dS = dH W1) go through
// oneDNN's matmul (mkldnn::_linear_pointwise, the op behind torch's fused linear; on this AVX-512 CPU
// 10-20 % faster than MKL's sgemm through at::mm). dW2 = dS'^T h: one sequential sgemm per row range
// and thread, partials added in range order. The sgemm is the BLAS that libtorch exports (MKL);
// without it, without oneDNN, or with FASTKD_CT_PLAIN_GEMM=1, every GEMM is at::mm on rows.
// After the GEMMs one fused pass: squared error + fixed-order reduction + dL/dS' (in place of S') +
// dL/db2, reading the teacher in its own layout. Saved for backward: the hidden rows and dL/dS'.
// Backward: dW2 and dH by GEMM, one pass for ReLU gating * incoming gradient + dL/db1, then dW1 and
// dS by GEMM (dS comes back channels_last, a view of its rows).
// Determinism: the loss and the bias gradients do not depend on the thread count (fixed-unit passes;
// each GEMM output element that feeds them is computed the same way); the weight gradients of the
// range-split GEMMs are added in an order that depends on the thread count, as MKL's own splits do.
#include "fastkd.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <tuple>

namespace fastkd {

namespace {

// FASTKD_CT_PLAIN_GEMM=1: at::mm for every GEMM (the path taken without oneDNN or a BLAS sgemm); for
// tests of that path and for comparisons. Read on every call (a getenv, ~50 ns).
inline bool plain_gemm() {
  const char* e = std::getenv("FASTKD_CT_PLAIN_GEMM");
  return e != nullptr && e[0] == '1';
}

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>);

// mkldnn::_linear_pointwise(X [M, K], W [O, K], B?, attr) = attr(X W^T + B); nullopt without oneDNN.
const std::optional<c10::TypedOperatorHandle<LinearFn>>& onednn_linear() {
  static const std::optional<c10::TypedOperatorHandle<LinearFn>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearFn>> {
    if (!at::hasMKLDNN()) return std::nullopt;
    auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return handle->typed<LinearFn>();
  }();
  return op;
}

// x [M, K] @ w^T, w [O, K] (any strides); relu: max(. + b, 0) (b contiguous [O]).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* b, bool relu) {
  const auto& op = onednn_linear();
  if (op && !plain_gemm()) {
    std::optional<at::Tensor> bias;
    if (b != nullptr) bias = *b;
    return op->call(x, w, bias, relu ? "relu" : "none", c10::List<std::optional<at::Scalar>>(),
                    std::nullopt);
  }
  at::Tensor y = at::mm(x, w.t());
  if (relu) bias_relu_(y.data_ptr<float>(), b->data_ptr<float>(), y.size(0), y.size(1));
  return y;
}

// The element-wise passes below are compiled for AVX-512, AVX2 and the baseline, picked at load time
// (the extension itself is built for baseline x86-64). Floating-point contraction stays off (ISO
// C++), so every variant computes bit-identical results.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTKD_SIMD __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTKD_SIMD
#endif

constexpr int64_t kTile = 16;

// dst[p * C + c] = src[c * sc + p] for p in [p0, p1), c in [c0, c1)
FASTKD_SIMD void transpose_tile(const float* __restrict src, int64_t sc, float* __restrict dst, int64_t C,
                                int64_t p0, int64_t p1, int64_t c0, int64_t c1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* d = dst + p * C;
    for (int64_t c = c0; c < c1; ++c) d[c] = src[c * sc + p];
  }
}

// Rows [N*H*W, C] of a mergeable [N, C, H, W] feature: a view when it is channels_last, else a copy
// made by 16x16 tiles.
at::Tensor ct_rows_of(const at::Tensor& t) {
  const Feat f = feat_of(t);
  if (f.sp != 1 || f.p == 1) return nchw_as_rows(t);  // channels_last (or 1x1): a view
  at::Tensor rows = at::empty({f.n * f.p, f.c}, t.options());
  float* out = rows.data_ptr<float>();
  const int64_t C = f.c, P = f.p, cb = (C + kTile - 1) / kTile;
  at::parallel_for(0, f.n * cb, std::max<int64_t>(1, kGrainElems / (kTile * P)), [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / cb, c0 = (task % cb) * kTile, c1 = std::min(C, c0 + kTile);
      for (int64_t p0 = 0; p0 < P; p0 += kTile)
        transpose_tile(f.ptr + n * f.sn, f.sc, out + n * P * C, C, p0, std::min(P, p0 + kTile), c0, c1);
    }
  });
  return rows;
}

// One unit of the squared-error pass: np pixel rows of C channels; target rows with stride ts.
FASTKD_SIMD void sq_unit(float* __restrict rows, const float* __restrict bias, const float* __restrict tgt,
                         int64_t ts, int64_t np, int64_t C, float scale, float* __restrict sq,
                         float* __restrict col) {
  for (int64_t j = 0; j < C; ++j) sq[j] = col[j] = 0.f;
  for (int64_t p = 0; p < np; ++p) {
    float* __restrict r = rows + p * C;
    const float* __restrict tp = tgt + p * ts;
    for (int64_t j = 0; j < C; ++j) {
      const float d = (r[j] + bias[j]) - tp[j];
      sq[j] += d * d;
      col[j] += d;
      r[j] = scale * d;
    }
  }
}

// d = rows + bias - target; returns sum(d^2) (fixed order, double); rows <- scale * d;
// bias_grad[c] = scale * sum_m d (fixed order).
double ct_sq_error(float* rows, const float* bias, const Feat& target, float scale, float* bias_grad) {
  const int64_t C = target.c, HW = target.p;
  const Units units(target.n, HW);
  std::vector<double> loss_part(units.count, 0.0);
  std::vector<double> col_part(units.count * C, 0.0);
  for_units(units, C, [&](int64_t u) {
    const int64_t n = units.sample(u), p0 = units.p0(u), p1 = units.p1(u);
    const float* t = target.ptr + n * target.sn;
    std::vector<float> buf(3 * C + (target.sc != 1 ? (p1 - p0) * C : 0));
    float *sq = buf.data(), *colf = sq + C, *tile = colf + C;
    const float* tg = t + p0 * target.sp;
    int64_t ts = target.sp;
    if (target.sc != 1) {  // NCHW teacher: the unit's tile as rows first (stays in L1)
      for (int64_t c0 = 0; c0 < C; c0 += kTile)
        transpose_tile(t + p0, target.sc, tile, C, 0, p1 - p0, c0, std::min(C, c0 + kTile));
      tg = tile;
      ts = C;
    }
    sq_unit(rows + (n * HW + p0) * C, bias, tg, ts, p1 - p0, C, scale, sq, colf);
    double acc = 0.0;
    for (int64_t j = 0; j < C; ++j) acc += sq[j];
    loss_part[u] = acc;
    for (int64_t j = 0; j < C; ++j) col_part[u * C + j] = colf[j];
  });
  ordered_colsum(col_part, units.count, C, scale, bias_grad);
  double total = 0.0;
  for (double v : loss_part) total += v;
  return total;
}

FASTKD_SIMD void gate_unit(float* __restrict gr, const float* __restrict a, int64_t np, int64_t c, float go,
                           float* __restrict col) {
  for (int64_t j = 0; j < c; ++j) col[j] = 0.f;
  for (int64_t p = 0; p < np; ++p) {
    float* __restrict g = gr + p * c;
    const float* __restrict x = a + p * c;
    for (int64_t j = 0; j < c; ++j) {
      const float scaled = go * g[j];
      const float v = x[j] > 0.f ? scaled : 0.f;
      g[j] = v;
      col[j] += v;
    }
  }
}

// grad_rows <- go * grad_rows * (act > 0) in place; bias_grad[c] = sum_m of the result (fixed order).
void ct_relu_gate(float* grad_rows, const float* act, int64_t n, int64_t hw, int64_t c, float go,
                  float* bias_grad) {
  const Units units(n, hw);
  std::vector<double> col_part(units.count * c, 0.0);
  for_units(units, c, [&](int64_t u) {
    const int64_t s = units.sample(u), p0 = units.p0(u), p1 = units.p1(u);
    std::vector<float> colf(c);
    const int64_t m = s * hw + p0;
    gate_unit(grad_rows + m * c, act + m * c, p1 - p0, c, go, colf.data());
    for (int64_t j = 0; j < c; ++j) col_part[u * c + j] = colf[j];
  });
  if (bias_grad) ordered_colsum(col_part, units.count, c, 1.0, bias_grad);
}

// MKL's (or any BLAS's) Fortran sgemm, when libtorch exports one; null otherwise.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// dW1 [Ch, Cs] = sum_m dh[m, :]^T S[m, :] with the student NCHW: per sample, S_n [Cs, HW] is read in
// place (dW1^T += S_n dh_n), so the student is not transposed to rows a second time. The samples are
// split into `groups` contiguous ranges, one partial each (one thread per range, sequential GEMMs),
// and the partials are added in range order. False when no BLAS sgemm is linked.
bool dw1_from_nchw(const at::Tensor& dh, const Feat& s, at::Tensor& dW1) {
  if (sgemm_ == nullptr || s.sp != 1 || plain_gemm()) return false;
  const int64_t N = s.n, Ch = dh.size(1), Cs = s.c, HW = s.p;
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  at::Tensor part = at::empty({groups, Cs, Ch}, dh.options());  // each: dW1^T of its samples
  float* pp = part.data_ptr<float>();
  const float* dhp = dh.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      const int64_t n0 = g * N / groups, n1 = (g + 1) * N / groups;
      const int m = static_cast<int>(Ch), n = static_cast<int>(Cs), k = static_cast<int>(HW);
      const int lda = static_cast<int>(Ch), ldb = static_cast<int>(s.sc), ldc = static_cast<int>(Ch);
      const float one = 1.f;
      for (int64_t i = n0; i < n1; ++i) {
        const float beta = i == n0 ? 0.f : 1.f;
        // column-major: P[Ch, Cs] (+)= dh_i^T[Ch, HW] * S_i^T[HW, Cs], i.e. row-major P = S_i dh_i
        sgemm_("N", "N", &m, &n, &k, &one, dhp + i * HW * Ch, &lda, s.ptr + i * s.sn, &ldb, &beta,
               pp + g * Cs * Ch, &ldc);
      }
    }
  });
  dW1 = at::empty({Ch, Cs}, dh.options());
  float* out = dW1.data_ptr<float>();
  at::parallel_for(0, Ch, std::max<int64_t>(1, 4096 / std::max<int64_t>(Cs, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t j = 0; j < Cs; ++j) {
        float acc = pp[j * Ch + i];
        for (int64_t g = 1; g < groups; ++g) acc += pp[(g * Cs + j) * Ch + i];
        out[i * Cs + j] = acc;
      }
  });
  return true;
}

// A^T B for rows A [M, a], B [M, b] (contiguous), times alpha: the rows are split into `groups`
// contiguous ranges, one sequential sgemm each on its own thread, partials added in range order
// (MKL's own threading does worse on these long-K, small-output products). False without sgemm.
bool rows_t_rows(const at::Tensor& A, const at::Tensor& B, float alpha, at::Tensor& out) {
  if (sgemm_ == nullptr || !A.is_contiguous() || !B.is_contiguous() || plain_gemm()) return false;
  const int64_t M = A.size(0), a = A.size(1), b = B.size(1);
  if (M >= (int64_t{1} << 31)) return false;  // sgemm takes 32-bit sizes
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(M / 256 + 1, at::get_num_threads()));
  at::Tensor part = at::empty({groups, a, b}, A.options());
  float* pp = part.data_ptr<float>();
  const float *ap = A.data_ptr<float>(), *bp = B.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t m0 = g * M / groups, m1 = (g + 1) * M / groups;
      // column-major: P[b, a] = B_g^T[b, Mg] * A_g[Mg, a], i.e. row-major P = A_g^T B_g
      const int m = static_cast<int>(b), n = static_cast<int>(a), k = static_cast<int>(m1 - m0);
      const int ldb_ = static_cast<int>(b), lda_ = static_cast<int>(a), ldc = static_cast<int>(b);
      const float zero = 0.f;
      sgemm_("N", "T", &m, &n, &k, &alpha, bp + m0 * b, &ldb_, ap + m0 * a, &lda_, &zero, pp + g * a * b, &ldc);
    }
  });
  if (groups == 1) {
    out = part[0];
    return true;
  }
  out = at::empty({a, b}, A.options());
  float* o = out.data_ptr<float>();
  const int64_t total = a * b;
  at::parallel_for(0, total, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float acc = pp[i];
      for (int64_t g = 1; g < groups; ++g) acc += pp[g * total + i];
      o[i] = acc;
    }
  });
  return true;
}

FASTKD_SIMD void bias_relu_block(float* __restrict r, const float* __restrict bias, int64_t rows, int64_t c) {
  for (int64_t i = 0; i < rows; ++i, r += c)
    for (int64_t j = 0; j < c; ++j) {
      const float x = r[j] + bias[j];
      r[j] = x < 0.f ? 0.f : x;  // NaN propagates, as torch.relu
    }
}

// h [M, Ch] = relu(S W1^T + b1) with the student NCHW, read in place: per sample, h_n = S_n^T W1^T
// (one sgemm), bias + ReLU applied while the sample's rows are still in cache. False without sgemm.
bool gemm1_from_nchw(const Feat& s, const at::Tensor& w1, const at::Tensor& b1, at::Tensor& h) {
  if (sgemm_ == nullptr || s.sp != 1 || plain_gemm()) return false;
  const int64_t N = s.n, Cs = s.c, HW = s.p, Ch = w1.size(0);
  const at::Tensor w1t = w1.t().contiguous();  // [Cs, Ch]
  h = at::empty({N * HW, Ch}, w1.options());
  float* hp = h.data_ptr<float>();
  const float *wp = w1t.data_ptr<float>(), *bp = b1.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, HW * Ch)), [&](int64_t b, int64_t e) {
    const int m = static_cast<int>(Ch), n = static_cast<int>(HW), k = static_cast<int>(Cs);
    const int lda = static_cast<int>(Ch), ldb = static_cast<int>(s.sc), ldc = static_cast<int>(Ch);
    const float one = 1.f, zero = 0.f;
    for (int64_t i = b; i < e; ++i) {
      // column-major: h_i^T[Ch, HW] = W1[Ch, Cs] * S_i[Cs, HW]
      sgemm_("N", "T", &m, &n, &k, &one, wp, &lda, s.ptr + i * s.sn, &ldb, &zero, hp + i * HW * Ch, &ldc);
      bias_relu_block(hp + i * HW * Ch, bp, HW, Ch);
    }
  });
  return true;
}

}  // namespace

// -> (loss, hidden rows [M, Ch], dL/dS' rows [M, Ct], dL/db2 [Ct])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ct_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, double alpha, bool mean) {
  const at::Tensor s = mergeable(student);
  const at::Tensor t = mergeable(teacher);
  const int64_t N = t.size(0);
  const at::Tensor b1c = b1.contiguous(), b2c = b2.contiguous();
  at::Tensor h;
  {
    RECORD_FUNCTION("fastkd::ct_gemm1", std::vector<c10::IValue>());
    if (!gemm1_from_nchw(feat_of(s), w1.contiguous(), b1c, h)) h = linear(ct_rows_of(s), w1, &b1c, true);
  }
  at::Tensor dp = linear(h, w2, nullptr, false);
  const double denom = mean ? static_cast<double>(t.numel()) : static_cast<double>(N);
  const float scale = to_float32(2.0 * alpha / denom);
  at::Tensor db2 = at::empty({t.size(1)}, t.options());
  double sq;
  {
    RECORD_FUNCTION("fastkd::ct_sq_error", std::vector<c10::IValue>());
    sq = ct_sq_error(dp.data_ptr<float>(), b2c.data_ptr<float>(), feat_of(t), scale,
                        db2.data_ptr<float>());
  }
  at::Tensor loss = at::scalar_tensor(to_float32(alpha * sq / denom), t.options());
  return {loss, h, dp, db2};
}

// -> (dS, dW1, dB1, dW2, dB2); needs: student, w1, b1, w2, b2 (an unneeded gradient comes back empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ct_backward(
    const at::Tensor& grad, const at::Tensor& student, const at::Tensor& h, const at::Tensor& dp,
    const at::Tensor& db2_saved, const at::Tensor& w1, const at::Tensor& w2, std::array<bool, 5> needs) {
  const bool n_s = needs[0], n_w1 = needs[1], n_b1 = needs[2], n_w2 = needs[3], n_b2 = needs[4];
  const float go = grad.item<float>();  // CPU tensor: no device synchronisation
  const auto opts = h.options();
  const at::Tensor empty = at::empty({0}, opts);
  at::Tensor dS = empty, dW1 = empty, db1 = empty, dW2 = empty, db2 = empty;
  const int64_t N = student.size(0), Hh = student.size(2), Ww = student.size(3), Ch = h.size(1);

  if (n_b2) db2 = db2_saved * go;
  if (n_w2) {
    RECORD_FUNCTION("fastkd::ct_dw2", std::vector<c10::IValue>());
    if (!rows_t_rows(dp, h, go, dW2)) {
      dW2 = at::mm(dp.t(), h);
      if (go != 1.f) dW2.mul_(go);
    }
  }
  if (!(n_s || n_w1 || n_b1)) return {dS, dW1, db1, dW2, db2};

  at::Tensor dh = linear(dp, w2.t(), nullptr, false);  // dp @ W2
  at::Tensor db1_full = n_b1 ? at::empty({Ch}, opts) : empty;
  {
    RECORD_FUNCTION("fastkd::ct_relu_gate", std::vector<c10::IValue>());
    ct_relu_gate(dh.data_ptr<float>(), h.data_ptr<float>(), N, Hh * Ww, Ch, go,
               n_b1 ? db1_full.data_ptr<float>() : nullptr);
  }
  if (n_b1) db1 = db1_full;
  if (n_w1) {
    RECORD_FUNCTION("fastkd::ct_dw1", std::vector<c10::IValue>());
    const at::Tensor sm = mergeable(student);
    if (!dw1_from_nchw(dh, feat_of(sm), dW1)) {
      const at::Tensor rows = ct_rows_of(sm);
      if (!rows_t_rows(dh, rows, 1.f, dW1)) dW1 = at::mm(dh.t(), rows);
    }
  }
  if (n_s) dS = rows_as_nchw(linear(dh, w1.t(), nullptr, false), N, Hh, Ww);  // dh @ W1
  return {dS, dW1, db1, dW2, db2};
}

}  // namespace fastkd
