// fastkd._C: fused CPU kernels of the distillation losses (MGD, CT), shared pieces.
//
// Layout used inside the kernels: a feature [N, C, H, W] is processed as "rows" [M = N*H*W, C]
// (channels_last memory), the layout oneDNN convolutions and MKL GEMMs run fastest in on the CPU.
// Inputs in any dense layout are read through (n, c, p = h*W + w) strides, so converting to rows
// costs nothing extra: it happens inside the fused pass that also applies the mask.
//
// Determinism: every pass that reduces (the loss, bias gradients) splits the rows into fixed units
// of (sample n, block of kPixBlock pixels). A unit is always done by one thread, its partial is
// stored at the unit's index, and the partials are summed in unit order afterwards, in double. The
// result therefore does not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastkd {

// A double (a loss, or the gradient scale 2 alpha / N) as the float32 it is stored in: beyond float32's range
// it becomes +-inf (at::scalar_tensor would throw "cannot be converted to type float without overflow"), so a
// huge but finite loss weight ends in the engine's non-finite guard like on the reference backend.
inline float to_float32(double v) {
  constexpr double kMax = static_cast<double>(std::numeric_limits<float>::max());
  if (std::isnan(v) || std::fabs(v) <= kMax) return static_cast<float>(v);
  return v > 0 ? std::numeric_limits<float>::infinity() : -std::numeric_limits<float>::infinity();
}

// ---------------------------------------------------------------------------------------------
// The mask contract (fastkd/ops/mask.py): Philox-4x32-10, first output word, tl.rand's mapping.
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

inline uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// triton.language.rand: bitcast to int32, fold negatives (x < 0 -> -x - 1 == ~x), to float, scale.
inline float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

struct MaskSpec {
  bool spatial;      // [N,1,H,W] one draw per pixel, else [N,C,1,1] one draw per channel
  float ratio;       // dropped where u < ratio (compared in float32, as the reference does)
  uint64_t seed;
  uint64_t offset;   // global index of sample 0
  // keep value (0 or 1) of entry `idx` (pixel p or channel c) of sample n, per-sample size `per`.
  inline float keep(int64_t n, int64_t idx, int64_t per) const {
    const uint64_t ctr = (offset + static_cast<uint64_t>(n)) * static_cast<uint64_t>(per) +
                         static_cast<uint64_t>(idx);
    return uint_to_uniform(philox_first_word(seed, ctr)) < ratio ? 0.f : 1.f;
  }
};

// ---------------------------------------------------------------------------------------------
// Features seen through (n, c, p) strides.
// ---------------------------------------------------------------------------------------------
struct Feat {
  float* ptr;
  int64_t n, c, p;      // sizes: N, C, H*W
  int64_t sn, sc, sp;   // strides
  inline float& at(int64_t i, int64_t j, int64_t q) const { return ptr[i * sn + j * sc + q * sp]; }
};

// A float32 [N, C, H, W] CPU tensor whose H and W merge into one pixel stride (NCHW or NHWC dense):
// returned as is when they do, else as a contiguous copy.
at::Tensor mergeable(const at::Tensor& t);
Feat feat_of(const at::Tensor& t);   // t must be mergeable
// [N, C, H, W] view (channels_last strides) of rows [N*H*W, C].
at::Tensor rows_as_nchw(const at::Tensor& rows, int64_t n, int64_t h, int64_t w);
// [N*H*W, C] rows of a [N, C, H, W] tensor: a view when it is channels_last, else a transposing copy.
at::Tensor nchw_as_rows(const at::Tensor& t);

// Convolution weights [O, I, kh, kw] between OIHW (contiguous) and OHWI (channels_last) memory:
// a per-output-channel [I, kh*kw] transpose (ATen's generic strided copy takes ~10 ms for 128x128x3x3).
at::Tensor weight_to_channels_last(const at::Tensor& w);
at::Tensor weight_to_contiguous(const at::Tensor& w);

// The MGD align layer's backward (ATen's 1x1 convolution backward) from dL/dA: dS and/or dWa, dba.
void align_backward(const at::Tensor& da, const at::Tensor& s, const at::Tensor& align_w, bool n_s, bool n_al,
                    at::Tensor& dS, at::Tensor& dWa, at::Tensor& dba);

constexpr int64_t kPixBlock = 64;  // pixels per reduction unit

struct Units {
  int64_t n, hw, per_sample, count;
  Units(int64_t n_, int64_t hw_) : n(n_), hw(hw_) {
    per_sample = (hw + kPixBlock - 1) / kPixBlock;
    count = n * per_sample;
  }
  inline int64_t sample(int64_t u) const { return u / per_sample; }
  inline int64_t p0(int64_t u) const { return (u % per_sample) * kPixBlock; }
  inline int64_t p1(int64_t u) const { return std::min(hw, p0(u) + kPixBlock); }
};

// Run f(unit) for every unit, each unit on one thread (at::parallel_for follows torch's threads);
// like ATen's own kernels, work below ~32k elements stays on the calling thread.
constexpr int64_t kGrainElems = 32768;
template <class F>
inline void for_units(const Units& units, int64_t c, F f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, kPixBlock * c));
  at::parallel_for(0, units.count, grain, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) f(u);
  });
}

// Sum per-unit column partials [units, C] in unit order into out[C] * scale (float32).
void ordered_colsum(const std::vector<double>& partial, int64_t units, int64_t c, double scale,
                    float* out);

// ---------------------------------------------------------------------------------------------
// Fused passes (kernels.cpp)
// ---------------------------------------------------------------------------------------------
// rows[m, c] = (src[n, c, p] (+ bias[c])) * keep(n, c, p)   (mask == nullptr: no mask)
void mask_to_rows(const Feat& src, const float* bias, const MaskSpec* mask, float* rows);
// dst[n, c, p] = rows[m, c] * keep(n, c, p)
void rows_to_masked(const float* rows, const MaskSpec& mask, const Feat& dst);
// rows = max(rows + bias, 0) in place
void bias_relu_(float* rows, const float* bias, int64_t m, int64_t c);
// d = rows + bias - target; returns sum(d^2) (fixed order, double); rows <- scale * d;
// bias_grad[c] = scale * sum_m d (fixed order).
double sq_error_grad_(float* rows, const float* bias, const Feat& target, float scale,
                      float* bias_grad);
// grad_rows <- go * grad_rows * (act > 0) in place; bias_grad[c] = sum_m of the result (fixed order).
void relu_gate_(float* grad_rows, const float* act, int64_t n, int64_t hw, int64_t c, float go,
                float* bias_grad);

// ---------------------------------------------------------------------------------------------
// Winograd F(4x4, 3x3) for MGD's 3x3 convolutions (winograd.cpp, used by mgd_wino.cpp)
// ---------------------------------------------------------------------------------------------
namespace wino {

// One sample's geometry: 4x4 output tiles over H x W, and the zero-padded image the 6x6 input
// tiles are read from: pixel (y, x) of the image sits at (y + 1, x + 1) of the padded [ph, pw, C].
struct Geom {
  int64_t H, W, th, tw, tiles, ph, pw;
  Geom(int64_t h, int64_t w) : H(h), W(w), th((h + 3) / 4), tw((w + 3) / 4) {
    tiles = th * tw;
    ph = 4 * th + 2;
    pw = 4 * tw + 2;
  }
  int64_t padded_elems(int64_t c) const { return ph * pw * c; }
};

// Transformed features are stored tile-major [T, 36, C] (tile t, component k = 6a + b, channel; T is
// the number of tiles, kept in the signatures), tile t of sample n of a chunk at t0 + ty * tw + tx;
// `tmp` is 36*C floats of scratch, out16 16*C.
// V = B^T d B of every tile of one sample, from its padded image.
void input_tiles(const float* pad, const Geom& g, int64_t C, float* V, int64_t T, int64_t t0, float* tmp);
// pad = overlap-add of B dV B^T over the sample's tiles (pad is zeroed first): the adjoint of input_tiles.
void adjoint_input_tiles(const float* dV, const Geom& g, int64_t C, int64_t T, int64_t t0, float* pad,
                         float* tmp);
// out16 = A^T Y A of tile t: [16, C], row-major 4x4 pixels.
void output_tile(const float* Y, int64_t T, int64_t t, int64_t C, float* out16, float* tmp);
// V = A dY A^T of every tile of one sample, dY read from its padded image: the adjoint of output_tile.
void adjoint_output_tiles(const float* pad, const Geom& g, int64_t C, float* V, int64_t T, int64_t t0,
                          float* tmp);
// G w G^T of a [O, I, 3, 3] weight, as [36, I, O] (the right operand of the forward GEMMs).
at::Tensor weight(const at::Tensor& w);
// scale * G^T dU G: the [O, I, 3, 3] gradient of `weight(w)` from dU [36, I, O].
at::Tensor weight_grad(const at::Tensor& dut, int64_t O, int64_t I, double scale);

}  // namespace wino

}  // namespace fastkd
