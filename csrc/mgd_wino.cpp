// fastkd._C: MGD loss, forward and backward, with the 3x3 convolutions by Winograd F(4x4, 3x3)
// (csrc/winograd.cpp: transforms, why and how accurate). Same ops, inputs, residuals and results as
// the direct path in csrc/mgd.cpp (algo 0); this is algo 1.
//
// Forward, per chunk of samples (two transform buffers V, Y of [36, tiles + 1, C]):
//   P1  per sample: X = mask * (align(S) + ba) into a zero-padded tile image  -> V = B^T X B
//       (the align convolution runs per chunk: no feature-sized A)
//       Y = V @ U1                                         (36 GEMMs, one at::bmm)
//   P2  per sample: H = relu(A^T Y A + b1) -> saved rows, and into a padded image -> V = B^T H B
//       Y = V @ U2
//   P3  per sample: G = A^T Y A + b2; d = G - T; loss += d^2; dL/db2 += d; dL/dG = 2 alpha/N d -> saved
// Backward, two phases so that only one convolution's [36, C, C] weight tensors live at a time:
//   phase 1, per chunk (buffers A, B):
//   P4  per sample: A = adjoint of the output transform of dL/dG; B = B^T H B (recomputed)
//       dU2 += B^T @ A;  B = A @ U2^T                      (dL/dW2; dL/dH in the Winograd domain)
//   P5  per sample: dH = overlap-add of B dV B^T; dZ = go * dH * (H > 0) -> rows; dL/db1 += dZ
//   phase 2, per chunk:
//   P4  per sample: A = adjoint of the output transform of dZ
//   P1  B = B^T X B (recomputed from the seed);  dU1 += B^T @ A;  B = A @ U1^T
//   P6  per sample: dX = overlap-add; dL/dA or dL/dS = mask * dX in the student's layout, written
//       over the sample's dZ (same size, same sample block)
//   dW = G^T dU G; the align layer's backward is ATen's.
#include "fastkd.h"

#include <ATen/record_function.h>

#include <array>
#include <cstring>
#include <tuple>

namespace fastkd {

namespace {

using wino::Geom;

// Samples per chunk. Peak memory of the backward, in floats, F = N*H*W*C (one feature):
//   saved H and dL/dG (2F) + dZ, later dL/dX (F) + the two transform buffers A, B
//   + U, dU of one convolution (2 * 36 * C^2)
// The transient part (A, B, U, dU) is held to 2.5 F, which keeps the whole below the eager
// reference's (~6 F); within that, chunks as large as possible (GEMMs of >= 64 tiles regardless).
int64_t chunk_samples(int64_t N, int64_t C, const Geom& g) {
  const double feature = static_cast<double>(N) * g.H * g.W * C;
  const double per_buffer = std::max(0.0, (2.5 * feature - 72.0 * C * C) / 2.0);
  const int64_t by_memory = static_cast<int64_t>(per_buffer / (36.0 * C * g.tiles));
  const int64_t by_gemm = (64 + g.tiles - 1) / g.tiles;
  return std::max<int64_t>(1, std::min(N, std::max(by_memory, by_gemm)));
}

// Per-thread scratch of one sample: the padded image and the transforms' temporaries.
struct Scratch {
  std::vector<float> pad, tmp, out16;
  Scratch(const Geom& g, int64_t C) : pad(g.padded_elems(C)), tmp(36 * C), out16(16 * C) {}
};

// Run f(n, scratch) for the samples [n0, n1), one sample per task (any thread; results per sample).
// (`name` shows in torch.profiler's tables.)
template <class F>
void for_samples(const char* name, int64_t n0, int64_t n1, const Geom& g, int64_t C, F f) {
  RECORD_FUNCTION(name, std::vector<c10::IValue>());
  at::parallel_for(n0, n1, 1, [&](int64_t b, int64_t e) {
    Scratch s(g, C);
    for (int64_t n = b; n < e; ++n) f(n, s);
  });
}

// The padded image of sample n of `src` (any (n, c, p) strides), (+ bias[c]) * keep, zero border.
void fill_padded(const Feat& src, int64_t local, int64_t n, const float* bias, const MaskSpec* mask,
                 const Geom& g, float* pad) {
  const int64_t C = src.c, W = g.W, HW = g.H * g.W;
  std::memset(pad, 0, sizeof(float) * g.padded_elems(C));
  std::vector<float> keep;
  if (mask != nullptr) {
    const int64_t per = mask->spatial ? HW : C;
    keep.resize(per);
    for (int64_t i = 0; i < per; ++i) keep[i] = mask->keep(n, i, per);
  }
  const bool spatial = mask != nullptr && mask->spatial;
  const bool channel = mask != nullptr && !mask->spatial;
  const float* s = src.ptr + local * src.sn;
  if (src.sp == 1 && src.sc != 1) {
    // NCHW: channel by channel, contiguous reads (the sample's padded image stays in L2)
    for (int64_t c = 0; c < C; ++c) {
      const float* sc = s + c * src.sc;
      const float b = bias != nullptr ? bias[c] : 0.f;
      const float kc = channel ? keep[c] : 1.f;
      for (int64_t y = 0; y < g.H; ++y) {
        float* o = pad + ((y + 1) * g.pw + 1) * C + c;
        for (int64_t x = 0; x < W; ++x) {
          const int64_t p = y * W + x;
          o[x * C] = (sc[p] + b) * (spatial ? keep[p] : kc);
        }
      }
    }
    return;
  }
  for (int64_t y = 0; y < g.H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const int64_t p = y * W + x;
      float* __restrict o = pad + ((y + 1) * g.pw + x + 1) * C;
      const float* sp = s + p * src.sp;
      const float kp = spatial ? keep[p] : 1.f;
      for (int64_t c = 0; c < C; ++c) {
        const float b = bias != nullptr ? bias[c] : 0.f;
        o[c] = (sp[c * src.sc] + b) * (channel ? keep[c] : kp);
      }
    }
}

// The padded image of sample n of rows [N*H*W, C].
void fill_padded_rows(const float* rows, int64_t n, int64_t C, const Geom& g, float* pad) {
  std::memset(pad, 0, sizeof(float) * g.padded_elems(C));
  for (int64_t y = 0; y < g.H; ++y)
    std::memcpy(pad + ((y + 1) * g.pw + 1) * C, rows + ((n * g.H + y) * g.W) * C, sizeof(float) * g.W * C);
}

// The [36, T + 1, C] GEMM operands at the front of a flat buffer. The transforms touch all 36
// components of a tile at once: with a component stride of T * C floats (a multiple of 4 KiB for
// the usual C and T) the 36 streams would fall into the same L1 sets; one extra tile row, kept at
// zero (GEMMs of zero rows give zero rows), staggers them.
int64_t rows_of(int64_t T) { return T + 1; }

at::Tensor chunk_view(const at::Tensor& flat, int64_t T, int64_t C) {
  return flat.narrow(0, 0, 36 * rows_of(T) * C).view({36, rows_of(T), C});
}

// A flat buffer for chunks of up to `tiles` tiles.
at::Tensor chunk_buffer(int64_t tiles, int64_t C, const at::TensorOptions& opts) {
  return at::empty({36 * rows_of(tiles) * C}, opts);
}

// The chunk's view, its extra row zeroed (a shorter last chunk re-reads memory of the previous one).
at::Tensor chunk_view_zeroed(const at::Tensor& flat, int64_t T, int64_t C) {
  at::Tensor v = chunk_view(flat, T, C);
  v.select(1, T).zero_();
  return v;
}

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& w) {
  return at::convolution(x, w, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
}

// What the mask is applied to for the samples [n0, n1): the student itself, or the align layer's
// output (without its bias) for those samples only, so no feature-sized A exists at any time.
struct Source {
  at::Tensor t;
  Feat f;
  int64_t base;  // sample n is at f's index n - base
};

Source chunk_source(const at::Tensor& s, const c10::optional<at::Tensor>& align_w, int64_t n0, int64_t n1) {
  if (!(align_w.has_value() && align_w->defined())) return {s, feat_of(s), 0};
  at::Tensor a = mergeable(conv1x1(s.narrow(0, n0, n1 - n0), *align_w));
  return {a, feat_of(a), n0};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mgd_forward_wino(
    const at::Tensor& s, const at::Tensor& t, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const c10::optional<at::Tensor>& align_w, const c10::optional<at::Tensor>& align_b,
    const MaskSpec& mask, double alpha) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3), M = N * H * W;
  const Geom g(H, W);
  const bool align = align_w.has_value() && align_w->defined();
  const at::Tensor ab = align ? align_b->contiguous() : at::Tensor();
  const at::Tensor b1c = b1.contiguous(), b2c = b2.contiguous();
  const at::Tensor u1 = wino::weight(w1), u2 = wino::weight(w2);  // [36, Cin, Cout]
  at::Tensor h = at::empty({M, C}, t.options()), dg = at::empty({M, C}, t.options());
  const Feat ft = feat_of(t);
  const float* pb1 = b1c.data_ptr<float>();
  const float* pb2 = b2c.data_ptr<float>();
  const float* pab = align ? ab.data_ptr<float>() : nullptr;
  float* ph = h.data_ptr<float>();
  float* pdg = dg.data_ptr<float>();
  const float scale = to_float32(2.0 * alpha / static_cast<double>(N));
  std::vector<double> loss_part(N, 0.0), col_part(N * C, 0.0);

  const int64_t chunk = chunk_samples(N, C, g);
  at::Tensor V = chunk_buffer(chunk * g.tiles, C, t.options());
  at::Tensor Y = chunk_buffer(chunk * g.tiles, C, t.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n1 = std::min(N, n0 + chunk), TT = rows_of((n1 - n0) * g.tiles);
    at::Tensor v = chunk_view_zeroed(V, TT - 1, C), y = chunk_view_zeroed(Y, TT - 1, C);
    float* pv = v.data_ptr<float>();
    const Source src = chunk_source(s, align_w, n0, n1);
    for_samples("fastkd::wino_P1_mask_input", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
      fill_padded(src.f, n - src.base, n, pab, &mask, g, sc.pad.data());
      wino::input_tiles(sc.pad.data(), g, C, pv, TT, (n - n0) * g.tiles, sc.tmp.data());
    });
    at::bmm_out(y, v, u1);
    const float* py = y.data_ptr<float>();
    for_samples("fastkd::wino_P2_relu_output_input", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
      float* pad = sc.pad.data();
      std::memset(pad, 0, sizeof(float) * g.padded_elems(C));
      for (int64_t ty = 0; ty < g.th; ++ty)
        for (int64_t tx = 0; tx < g.tw; ++tx) {
          wino::output_tile(py, TT, (n - n0) * g.tiles + ty * g.tw + tx, C, sc.out16.data(), sc.tmp.data());
          for (int64_t i = 0; i < 4 && 4 * ty + i < H; ++i)
            for (int64_t j = 0; j < 4 && 4 * tx + j < W; ++j) {
              const int64_t yy = 4 * ty + i, xx = 4 * tx + j;
              const float* o = sc.out16.data() + (i * 4 + j) * C;
              float* hr = ph + ((n * H + yy) * W + xx) * C;
              float* pr = pad + ((yy + 1) * g.pw + xx + 1) * C;
              for (int64_t c = 0; c < C; ++c) {
                const float z = o[c] + pb1[c];
                const float r = z < 0.f ? 0.f : z;  // NaN propagates, as torch.relu
                hr[c] = r;
                pr[c] = r;
              }
            }
        }
      wino::input_tiles(pad, g, C, pv, TT, (n - n0) * g.tiles, sc.tmp.data());
    });
    at::bmm_out(y, v, u2);
    for_samples("fastkd::wino_P3_error_output", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
      std::vector<float> sq(C, 0.f), col(C, 0.f), tt;
      const float* tn = ft.ptr + n * ft.sn;
      int64_t tsp = ft.sp;  // teacher pixel stride once channels are innermost
      if (ft.sc != 1) {     // NCHW teacher: the sample as rows first (contiguous reads), then vector loops
        tt.resize(H * W * C);
        for (int64_t c = 0; c < C; ++c)
          for (int64_t p = 0; p < H * W; ++p) tt[p * C + c] = tn[c * ft.sc + p * ft.sp];
        tn = tt.data();
        tsp = C;
      }
      for (int64_t ty = 0; ty < g.th; ++ty)
        for (int64_t tx = 0; tx < g.tw; ++tx) {
          wino::output_tile(py, TT, (n - n0) * g.tiles + ty * g.tw + tx, C, sc.out16.data(), sc.tmp.data());
          for (int64_t i = 0; i < 4 && 4 * ty + i < H; ++i)
            for (int64_t j = 0; j < 4 && 4 * tx + j < W; ++j) {
              const int64_t p = (4 * ty + i) * W + 4 * tx + j;
              const float* o = sc.out16.data() + (i * 4 + j) * C;
              const float* tp = tn + p * tsp;
              float* dr = pdg + (n * H * W + p) * C;
              for (int64_t c = 0; c < C; ++c) {
                const float d = (o[c] + pb2[c]) - tp[c];
                sq[c] += d * d;
                col[c] += d;
                dr[c] = scale * d;
              }
            }
        }
      double acc = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        acc += sq[c];
        col_part[n * C + c] = col[c];
      }
      loss_part[n] = acc;
    });
  }
  at::Tensor db2 = at::empty({C}, t.options());
  ordered_colsum(col_part, N, C, scale, db2.data_ptr<float>());
  double sq = 0.0;
  for (double v : loss_part) sq += v;
  at::Tensor loss = at::scalar_tensor(to_float32(alpha * sq / static_cast<double>(N)), t.options());
  return {loss, h, dg, db2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mgd_backward_wino(float go, const at::Tensor& student, const at::Tensor& h, const at::Tensor& dg,
                  const at::Tensor& db2_saved, const at::Tensor& w1, const at::Tensor& w2,
                  const c10::optional<at::Tensor>& align_w, const c10::optional<at::Tensor>& align_b,
                  const MaskSpec& mask, std::array<bool, 6> needs) {
  const bool n_s = needs[0], n_w1 = needs[1], n_b1 = needs[2], n_w2 = needs[3], n_b2 = needs[4];
  const bool align = align_w.has_value() && align_w->defined();
  const bool n_al = align && needs[5];
  const int64_t N = student.size(0), H = student.size(2), W = student.size(3), C = h.size(1), M = N * H * W;
  const Geom g(H, W);
  const auto opts = h.options();
  const at::Tensor empty = at::empty({0}, opts);
  at::Tensor dS = empty, dW1 = empty, db1 = empty, dW2 = empty, db2 = empty, dWa = empty, dba = empty;
  if (n_b2) db2 = db2_saved * go;
  const bool need_dx = n_s || n_al;
  const bool need_dz = need_dx || n_w1 || n_b1;
  if (!need_dz && !n_w2) return {dS, dW1, db1, dW2, db2, dWa, dba};

  const at::Tensor s = mergeable(student);
  const at::Tensor ab = align ? align_b->contiguous() : at::Tensor();
  const float* pab = align ? ab.data_ptr<float>() : nullptr;
  const float* ph = h.data_ptr<float>();
  const float* pdg = dg.data_ptr<float>();
  const int64_t chunk = chunk_samples(N, C, g);
  at::Tensor A = chunk_buffer(chunk * g.tiles, C, opts), B = chunk_buffer(chunk * g.tiles, C, opts);
  float* pa = A.data_ptr<float>();
  float* pbuf = B.data_ptr<float>();

  // Phase 1, conv2: dL/dW2 and dZ = go * dL/dH * (H > 0) as rows (the storage dL/dX reuses later).
  // Only one pair of [36, C, C] weight-domain tensors is alive at a time (U2, dU2 here; U1, dU1 next).
  at::Tensor dz = need_dz ? at::empty({M, C}, opts) : at::Tensor();
  std::vector<double> col_part(n_b1 ? N * C : 0, 0.0);
  {
    const at::Tensor u2 = need_dz ? wino::weight(w2) : at::Tensor();  // [36, Cin, Cout]
    at::Tensor du2 = n_w2 ? at::zeros({36, C, C}, opts) : at::Tensor();
    float* pdz = need_dz ? dz.data_ptr<float>() : nullptr;
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t n1 = std::min(N, n0 + chunk), TT = rows_of((n1 - n0) * g.tiles);
      at::Tensor ac = chunk_view_zeroed(A, TT - 1, C), bc = chunk_view_zeroed(B, TT - 1, C);
      for_samples("fastkd::wino_P4_adjoint_output", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
        fill_padded_rows(pdg, n, C, g, sc.pad.data());
        wino::adjoint_output_tiles(sc.pad.data(), g, C, pa, TT, (n - n0) * g.tiles, sc.tmp.data());
        if (n_w2) {
          fill_padded_rows(ph, n, C, g, sc.pad.data());
          wino::input_tiles(sc.pad.data(), g, C, pbuf, TT, (n - n0) * g.tiles, sc.tmp.data());
        }
      });
      if (n_w2) du2.baddbmm_(bc.transpose(1, 2), ac);
      if (!need_dz) continue;
      at::bmm_out(bc, ac, u2.transpose(1, 2));  // dL/dV of conv2's input; U2 read transposed, no copy
      for_samples("fastkd::wino_P5_relu_gate", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
        float* pad = sc.pad.data();
        wino::adjoint_input_tiles(pbuf, g, C, TT, (n - n0) * g.tiles, pad, sc.tmp.data());
        std::vector<float> col(n_b1 ? C : 0, 0.f);
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            const int64_t m = (n * H + y) * W + x;
            const float* r = pad + ((y + 1) * g.pw + x + 1) * C;
            const float* hr = ph + m * C;
            float* zr = pdz + m * C;
            for (int64_t c = 0; c < C; ++c) {
              const float scaled = go * r[c];
              const float v = hr[c] > 0.f ? scaled : 0.f;
              zr[c] = v;
              if (n_b1) col[c] += v;
            }
          }
        if (n_b1)
          for (int64_t c = 0; c < C; ++c) col_part[n * C + c] = col[c];
      });
    }
    if (n_w2) dW2 = wino::weight_grad(du2, C, C, go);
  }
  if (n_b1) {
    db1 = at::empty({C}, opts);
    ordered_colsum(col_part, N, C, 1.0, db1.data_ptr<float>());
  }
  if (!need_dx && !n_w1) return {dS, dW1, db1, dW2, db2, dWa, dba};

  // Phase 2, conv1: dL/dW1 and dL/dX. dL/dX (dL/dA with the align layer) is written, sample by
  // sample, over dZ's storage once the sample's dZ has been read: same size, same sample blocks.
  at::Tensor dx;
  if (need_dx) {
    const bool cl = !s.is_contiguous() && s.is_contiguous(at::MemoryFormat::ChannelsLast);
    dx = cl ? rows_as_nchw(dz, N, H, W) : dz.view({N, C, H, W});
  }
  {
    const at::Tensor u1 = need_dx ? wino::weight(w1) : at::Tensor();
    at::Tensor du1 = n_w1 ? at::zeros({36, C, C}, opts) : at::Tensor();
    const float* pdz = dz.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t n1 = std::min(N, n0 + chunk), TT = rows_of((n1 - n0) * g.tiles);
      at::Tensor ac = chunk_view_zeroed(A, TT - 1, C), bc = chunk_view_zeroed(B, TT - 1, C);
      for_samples("fastkd::wino_P4_adjoint_output", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
        fill_padded_rows(pdz, n, C, g, sc.pad.data());
        wino::adjoint_output_tiles(sc.pad.data(), g, C, pa, TT, (n - n0) * g.tiles, sc.tmp.data());
      });
      if (n_w1) {
        const Source src = chunk_source(s, align_w, n0, n1);
        for_samples("fastkd::wino_P1_mask_input", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
          fill_padded(src.f, n - src.base, n, pab, &mask, g, sc.pad.data());
          wino::input_tiles(sc.pad.data(), g, C, pbuf, TT, (n - n0) * g.tiles, sc.tmp.data());
        });
        du1.baddbmm_(bc.transpose(1, 2), ac);
      }
      if (!need_dx) continue;
      at::bmm_out(bc, ac, u1.transpose(1, 2));  // dL/dV of conv1's input (X)
      const Feat fd = feat_of(dx);
      for_samples("fastkd::wino_P6_adjoint_input", n0, n1, g, C, [&](int64_t n, Scratch& sc) {
        float* pad = sc.pad.data();
        wino::adjoint_input_tiles(pbuf, g, C, TT, (n - n0) * g.tiles, pad, sc.tmp.data());
        const int64_t per = mask.spatial ? H * W : C;
        std::vector<float> keep(per);
        for (int64_t i = 0; i < per; ++i) keep[i] = mask.keep(n, i, per);
        float* d = fd.ptr + n * fd.sn;
        if (fd.sp == 1 && fd.sc != 1) {  // NCHW: channel by channel
          for (int64_t c = 0; c < C; ++c)
            for (int64_t y = 0; y < H; ++y)
              for (int64_t x = 0; x < W; ++x) {
                const int64_t p = y * W + x;
                d[c * fd.sc + p] = pad[((y + 1) * g.pw + x + 1) * C + c] * (mask.spatial ? keep[p] : keep[c]);
              }
          return;
        }
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x) {
            const int64_t p = y * W + x;
            const float* r = pad + ((y + 1) * g.pw + x + 1) * C;
            float* dp = d + p * fd.sp;
            for (int64_t c = 0; c < C; ++c) dp[c * fd.sc] = r[c] * (mask.spatial ? keep[p] : keep[c]);
          }
      });
    }
    if (n_w1) dW1 = wino::weight_grad(du1, C, C, 1.0);
  }
  A.reset();
  B.reset();
  if (!need_dx) return {dS, dW1, db1, dW2, db2, dWa, dba};
  if (!align) return {dx, dW1, db1, dW2, db2, dWa, dba};
  align_backward(dx, s, *align_w, n_s, n_al, dS, dWa, dba);
  return {dS, dW1, db1, dW2, db2, dWa, dba};
}

}  // namespace fastkd
