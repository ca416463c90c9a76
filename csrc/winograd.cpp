// fastkd._C: MGD's two 3x3 convolutions by Winograd F(4x4, 3x3), forward and backward, on the CPU.
//
// Why: the six 3x3 convolution passes of an MGD step (2 forward, 4 backward) are ~90 % of its time
// when oneDNN runs them directly, and oneDNN already runs them near this CPU's float32 peak; fusion
// alone cannot go faster. Winograd F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input tile
// with 36 multiplies per (input, output) channel pair instead of 144: the convolution becomes 36
// independent GEMMs [tiles, C_in] x [C_in, C_out] (MKL, through at::bmm), 3x fewer FLOPs at 7x7 and
// 14x14 (tile padding included). Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks".
//
//   forward    Y = A^T [ (G w G^T) . (B^T d B) ] A          d: 6x6 input tile, Y: 4x4 output tile
//   backward   the exact adjoint of the forward (the same three transforms, transposed):
//              dM = A dY A^T,   dU = sum_tiles V^T dM -> dw = G^T dU G,   dd = B (dM U^T) B^T
//
// Float32 error: ~1e-5 of the largest output (direct convolution: ~3e-7), far inside the float32
// tolerance of the kernels (1e-4 of the largest value). Everything element-wise is fused into the
// transforms: the mask (drawn from the seed) and the align bias into the first input transform,
// bias + ReLU into the first output transform, bias + squared error + its gradient into the second;
// in backward the ReLU gate and dL/db1 sit between the adjoint transforms, and dH is never stored.
//
// Memory: a transformed feature is 36 / 16 = 2.25x the feature's size (x 64/49 for 7x7 tiles), and
// a transformed weight 4x the weight's; mgd_wino.cpp processes the batch in chunks of samples sized
// from a peak-memory budget (chunk_samples), so the peak stays below the eager reference's.
//
// Determinism: every reduction (loss, bias gradients) is per sample, then summed in sample order;
// chunks depend on the shapes only, so results do not depend on the number of threads.
#include "fastkd.h"

#include <cstring>

namespace fastkd {
namespace wino {


namespace {

// o[a] = sum_r B^T[a][r] d[r] over vectors of C floats.
__attribute__((noinline)) void bt6(const float* d0, const float* d1, const float* d2, const float* d3, const float* d4,
                const float* d5, float* const o[6], int64_t C) {
  float* __restrict o0 = o[0];
  float* __restrict o1 = o[1];
  float* __restrict o2 = o[2];
  float* __restrict o3 = o[3];
  float* __restrict o4 = o[4];
  float* __restrict o5 = o[5];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float x0 = d0[c], x1 = d1[c], x2 = d2[c], x3 = d3[c], x4 = d4[c], x5 = d5[c];
    o0[c] = 4.f * x0 - 5.f * x2 + x4;
    o1[c] = -4.f * (x1 + x2) + x3 + x4;
    o2[c] = 4.f * (x1 - x2) - x3 + x4;
    o3[c] = 2.f * (x3 - x1) - x2 + x4;
    o4[c] = 2.f * (x1 - x3) - x2 + x4;
    o5[c] = 4.f * x1 - 5.f * x3 + x5;
  }
}

// d[p] = sum_a B^T[a][p] v[a] (the adjoint of bt6); accumulates into d when kAdd.
template <bool kAdd>
__attribute__((noinline)) void b6(const float* const v[6], float* const d[6], int64_t C) {
  const float* __restrict v0 = v[0];
  const float* __restrict v1 = v[1];
  const float* __restrict v2 = v[2];
  const float* __restrict v3 = v[3];
  const float* __restrict v4 = v[4];
  const float* __restrict v5 = v[5];
  float* d0 = d[0];
  float* d1 = d[1];
  float* d2 = d[2];
  float* d3 = d[3];
  float* d4 = d[4];
  float* d5 = d[5];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float x0 = v0[c], x1 = v1[c], x2 = v2[c], x3 = v3[c], x4 = v4[c], x5 = v5[c];
    const float r0 = 4.f * x0;
    const float r1 = 4.f * (x2 - x1) + 2.f * (x4 - x3) + 4.f * x5;
    const float r2 = -5.f * x0 - 4.f * (x1 + x2) - x3 - x4;
    const float r3 = x1 - x2 + 2.f * (x3 - x4) - 5.f * x5;
    const float r4 = x0 + x1 + x2 + x3 + x4;
    const float r5 = x5;
    if (kAdd) {
      d0[c] += r0; d1[c] += r1; d2[c] += r2; d3[c] += r3; d4[c] += r4; d5[c] += r5;
    } else {
      d0[c] = r0; d1[c] = r1; d2[c] = r2; d3[c] = r3; d4[c] = r4; d5[c] = r5;
    }
  }
}

// o[i] = sum_a A^T[i][a] m[a], i < 4.
__attribute__((noinline)) void at4(const float* const m[6], float* const o[4], int64_t C) {
  const float* __restrict m0 = m[0];
  const float* __restrict m1 = m[1];
  const float* __restrict m2 = m[2];
  const float* __restrict m3 = m[3];
  const float* __restrict m4 = m[4];
  const float* __restrict m5 = m[5];
  float* __restrict o0 = o[0];
  float* __restrict o1 = o[1];
  float* __restrict o2 = o[2];
  float* __restrict o3 = o[3];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float x1 = m1[c], x2 = m2[c], x3 = m3[c], x4 = m4[c];
    const float s12 = x1 + x2, d12 = x1 - x2, s34 = x3 + x4, d34 = x3 - x4;
    o0[c] = m0[c] + s12 + s34;
    o1[c] = d12 + 2.f * d34;
    o2[c] = s12 + 4.f * s34;
    o3[c] = d12 + 8.f * d34 + m5[c];
  }
}

// m[a] = sum_i A^T[i][a] y[i] (the adjoint of at4).
__attribute__((noinline)) void a6(const float* const y[4], float* const m[6], int64_t C) {
  const float* __restrict y0 = y[0];
  const float* __restrict y1 = y[1];
  const float* __restrict y2 = y[2];
  const float* __restrict y3 = y[3];
  float* __restrict m0 = m[0];
  float* __restrict m1 = m[1];
  float* __restrict m2 = m[2];
  float* __restrict m3 = m[3];
  float* __restrict m4 = m[4];
  float* __restrict m5 = m[5];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const float x0 = y0[c], x1 = y1[c], x2 = y2[c], x3 = y3[c];
    const float e = x0 + x2, o = x1 + x3, e4 = x0 + 4.f * x2, o8 = 2.f * x1 + 8.f * x3;
    m0[c] = x0;
    m1[c] = e + o;
    m2[c] = e - o;
    m3[c] = e4 + o8;
    m4[c] = e4 - o8;
    m5[c] = x3;
  }
}

}  // namespace

// V[k, t0 + tile, :] = B^T d B of every tile of one sample; `pad` is the sample's padded image
// [ph, pw, C]. V is [36, T, C]; tmp is 36*C scratch.
void input_tiles(const float* pad, const Geom& g, int64_t C, float* V, int64_t T, int64_t t0, float* tmp) {
  for (int64_t ty = 0; ty < g.th; ++ty)
    for (int64_t tx = 0; tx < g.tw; ++tx) {
      const int64_t t = t0 + ty * g.tw + tx;
      const float* base = pad + ((4 * ty) * g.pw + 4 * tx) * C;
      // columns: tmp[a][s] = sum_r B^T[a][r] d[r][s]
      for (int64_t s = 0; s < 6; ++s) {
        const float* d = base + s * C;
        float* o[6];
        for (int a = 0; a < 6; ++a) o[a] = tmp + (a * 6 + s) * C;
        const int64_t rs = g.pw * C;
        bt6(d, d + rs, d + 2 * rs, d + 3 * rs, d + 4 * rs, d + 5 * rs, o, C);
      }
      // rows: V[a][b] = sum_s B^T[b][s] tmp[a][s]
      for (int64_t a = 0; a < 6; ++a) {
        const float* r = tmp + a * 6 * C;
        float* o[6];
        for (int b = 0; b < 6; ++b) o[b] = V + ((a * 6 + b) * T + t) * C;
        bt6(r, r + C, r + 2 * C, r + 3 * C, r + 4 * C, r + 5 * C, o, C);
      }
    }
}

// pad (zeroed here) += B dV B^T of every tile of one sample (overlap-add of the 6x6 tiles).
void adjoint_input_tiles(const float* dV, const Geom& g, int64_t C, int64_t T, int64_t t0, float* pad,
                         float* tmp) {
  std::memset(pad, 0, sizeof(float) * g.padded_elems(C));
  for (int64_t ty = 0; ty < g.th; ++ty)
    for (int64_t tx = 0; tx < g.tw; ++tx) {
      const int64_t t = t0 + ty * g.tw + tx;
      // tmp[p][b] = sum_a B^T[a][p] dV[a][b]
      for (int64_t b = 0; b < 6; ++b) {
        const float* v[6];
        float* o[6];
        for (int a = 0; a < 6; ++a) {
          v[a] = dV + ((a * 6 + b) * T + t) * C;
          o[a] = tmp + (a * 6 + b) * C;
        }
        b6<false>(v, o, C);
      }
      // pad[4ty + p][4tx + q] += sum_b B^T[b][q] tmp[p][b]
      float* base = pad + ((4 * ty) * g.pw + 4 * tx) * C;
      for (int64_t p = 0; p < 6; ++p) {
        const float* v[6];
        float* o[6];
        for (int b = 0; b < 6; ++b) {
          v[b] = tmp + (p * 6 + b) * C;
          o[b] = base + (p * g.pw + b) * C;
        }
        b6<true>(v, o, C);
      }
    }
}

// out16[i*4+j] = (A^T M A)[i][j] for tile t: [16, C]; tmp is 24*C scratch.
void output_tile(const float* Y, int64_t T, int64_t t, int64_t C, float* out16, float* tmp) {
  for (int64_t b = 0; b < 6; ++b) {  // tmp[i][b] = sum_a A^T[i][a] M[a][b]
    const float* m[6];
    float* o[4];
    for (int a = 0; a < 6; ++a) m[a] = Y + ((a * 6 + b) * T + t) * C;
    for (int i = 0; i < 4; ++i) o[i] = tmp + (i * 6 + b) * C;
    at4(m, o, C);
  }
  for (int64_t i = 0; i < 4; ++i) {  // out[i][j] = sum_b A^T[j][b] tmp[i][b]
    const float* m[6];
    float* o[4];
    for (int b = 0; b < 6; ++b) m[b] = tmp + (i * 6 + b) * C;
    for (int j = 0; j < 4; ++j) o[j] = out16 + (i * 4 + j) * C;
    at4(m, o, C);
  }
}

// V[k, t0 + tile, :] = A dY A^T of every tile of one sample; dY read from the padded image `pad`
// (pixel (y, x) at (y + 1, x + 1), zero outside the image). tmp is 24*C scratch.
void adjoint_output_tiles(const float* pad, const Geom& g, int64_t C, float* V, int64_t T, int64_t t0,
                          float* tmp) {
  for (int64_t ty = 0; ty < g.th; ++ty)
    for (int64_t tx = 0; tx < g.tw; ++tx) {
      const int64_t t = t0 + ty * g.tw + tx;
      const float* base = pad + ((4 * ty + 1) * g.pw + 4 * tx + 1) * C;
      for (int64_t j = 0; j < 4; ++j) {  // tmp[a][j] = sum_i A^T[i][a] dY[i][j]
        const float* y[4];
        float* m[6];
        for (int i = 0; i < 4; ++i) y[i] = base + (i * g.pw + j) * C;
        for (int a = 0; a < 6; ++a) m[a] = tmp + (a * 4 + j) * C;
        a6(y, m, C);
      }
      for (int64_t a = 0; a < 6; ++a) {  // V[a][b] = sum_j A^T[j][b] tmp[a][j]
        const float* y[4];
        float* m[6];
        for (int j = 0; j < 4; ++j) y[j] = tmp + (a * 4 + j) * C;
        for (int b = 0; b < 6; ++b) m[b] = V + ((a * 6 + b) * T + t) * C;
        a6(y, m, C);
      }
    }
}

// Transformed weights: U[k] = G w G^T per (o, i), k = 6a + b: U[k][rs] = sum_rs G[a][r] G[b][s] w[rs].
static const double kG[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                {-1.0 / 6, 1.0 / 6, -1.0 / 6}, {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};

namespace {
// coef[k][r * 3 + s] = G[a][r] G[b][s] (float; products of small fractions, rounded once).
struct Coef {
  float c[36][9];
  Coef() {
    for (int a = 0; a < 6; ++a)
      for (int b = 0; b < 6; ++b)
        for (int r = 0; r < 3; ++r)
          for (int s = 0; s < 3; ++s) c[a * 6 + b][r * 3 + s] = static_cast<float>(kG[a][r] * kG[b][s]);
  }
};
const Coef& coef() {
  static const Coef k;
  return k;
}
}  // namespace

at::Tensor weight(const at::Tensor& w) {
  const at::Tensor wc = w.contiguous();
  const int64_t O = w.size(0), I = w.size(1);
  at::Tensor u = at::empty({36, I, O}, w.options());
  const float* src = wc.data_ptr<float>();
  float* dst = u.data_ptr<float>();
  const Coef& k = coef();
  at::parallel_for(0, I, std::max<int64_t>(1, 4096 / std::max<int64_t>(O, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> wi(9 * O);  // w[:, i] as [rs][o]
    for (int64_t i = b; i < e; ++i) {
      for (int64_t o = 0; o < O; ++o)
        for (int rs = 0; rs < 9; ++rs) wi[rs * O + o] = src[(o * I + i) * 9 + rs];
      for (int kk = 0; kk < 36; ++kk) {
        float* __restrict d = dst + (kk * I + i) * O;
        const float* cf = k.c[kk];
        for (int64_t o = 0; o < O; ++o) d[o] = 0.f;
        for (int rs = 0; rs < 9; ++rs) {
          const float f = cf[rs];
          if (f == 0.f) continue;
          const float* __restrict x = wi.data() + rs * O;
          for (int64_t o = 0; o < O; ++o) d[o] += f * x[o];
        }
      }
    }
  });
  return u;
}

at::Tensor weight_grad(const at::Tensor& dut, int64_t O, int64_t I, double scale) {
  at::Tensor dw = at::empty({O, I, 3, 3}, dut.options());
  const float* src = dut.data_ptr<float>();
  float* dst = dw.data_ptr<float>();
  const Coef& k = coef();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, I, std::max<int64_t>(1, 4096 / std::max<int64_t>(O, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> acc(9 * O);  // dw[:, i] as [rs][o]
    for (int64_t i = b; i < e; ++i) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int kk = 0; kk < 36; ++kk) {
        const float* __restrict x = src + (kk * I + i) * O;
        for (int rs = 0; rs < 9; ++rs) {
          const float f = k.c[kk][rs];
          if (f == 0.f) continue;
          float* __restrict a = acc.data() + rs * O;
          for (int64_t o = 0; o < O; ++o) a[o] += f * x[o];
        }
      }
      for (int64_t o = 0; o < O; ++o)
        for (int rs = 0; rs < 9; ++rs) dst[(o * I + i) * 9 + rs] = sc * acc[rs * O + o];
    }
  });
  return dw;
}

}  // namespace wino
}  // namespace fastkd
