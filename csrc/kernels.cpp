// fastkd._C: the fused element-wise passes around the oneDNN / MKL convolutions and GEMMs.
//
// Each pass reads its inputs once and writes its output once; none allocates a temporary as large
// as a feature. Passes that reduce do so per fixed unit (see fastkd.h) for thread-count independent
// results.
#include "fastkd.h"

#include <algorithm>

namespace fastkd {

at::Tensor mergeable(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "fastkd._C: expected a 4-D feature, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastkd._C: expected float32, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "fastkd._C: expected a CPU tensor, got ", t.device());
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

Feat feat_of(const at::Tensor& t) {
  Feat f;
  f.ptr = t.data_ptr<float>();
  f.n = t.size(0);
  f.c = t.size(1);
  f.p = t.size(2) * t.size(3);
  f.sn = t.stride(0);
  f.sc = t.stride(1);
  f.sp = t.stride(3);
  TORCH_CHECK(t.size(2) <= 1 || t.stride(2) == t.size(3) * t.stride(3),
              "fastkd._C: H and W of the feature do not merge into one stride");
  return f;
}

at::Tensor rows_as_nchw(const at::Tensor& rows, int64_t n, int64_t h, int64_t w) {
  return rows.view({n, h, w, rows.size(1)}).permute({0, 3, 1, 2});
}

at::Tensor nchw_as_rows(const at::Tensor& t) {
  const int64_t m = t.size(0) * t.size(2) * t.size(3);
  return t.permute({0, 2, 3, 1}).reshape({m, t.size(1)});
}

static at::Tensor relayout_weight(const at::Tensor& w, at::MemoryFormat to) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kFloat, "fastkd._C: expected a float32 4-D weight");
  if (w.is_contiguous(to)) return w;
  const at::Tensor src = w.is_contiguous() || w.is_contiguous(at::MemoryFormat::ChannelsLast) ? w : w.contiguous();
  if (src.is_contiguous(to)) return src;
  at::Tensor out = at::empty_like(src, to);
  const int64_t O = w.size(0), I = w.size(1), K = w.size(2) * w.size(3);
  const float* s = src.data_ptr<float>();
  float* d = out.data_ptr<float>();
  const bool src_cl = !src.is_contiguous();  // src is OHWI, dst is OIHW
  at::parallel_for(0, O, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, I * K)), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const float* so = s + o * I * K;
      float* dd = d + o * I * K;
      for (int64_t i = 0; i < I; ++i)
        for (int64_t k = 0; k < K; ++k) {
          if (src_cl) dd[i * K + k] = so[k * I + i];
          else dd[k * I + i] = so[i * K + k];
        }
    }
  });
  return out;
}

at::Tensor weight_to_channels_last(const at::Tensor& w) {
  return relayout_weight(w, at::MemoryFormat::ChannelsLast);
}

at::Tensor weight_to_contiguous(const at::Tensor& w) {
  return relayout_weight(w, at::MemoryFormat::Contiguous);
}

void ordered_colsum(const std::vector<double>& partial, int64_t units, int64_t c, double scale,
                    float* out) {
  std::vector<double> acc(c, 0.0);  // units x C adds: serial, in unit order
  for (int64_t u = 0; u < units; ++u) {
    const double* row = partial.data() + u * c;
    for (int64_t j = 0; j < c; ++j) acc[j] += row[j];
  }
  for (int64_t j = 0; j < c; ++j) out[j] = static_cast<float>(acc[j] * scale);
}

namespace {

// keep values of one unit: per pixel (spatial) or per channel (channel mode), 1.0 without a mask.
struct UnitKeep {
  std::vector<float> v;
  bool spatial = true;
  void fill(const MaskSpec* mask, int64_t n, int64_t p0, int64_t p1, int64_t hw, int64_t c) {
    if (mask == nullptr) {
      spatial = true;
      v.assign(p1 - p0, 1.f);
    } else if (mask->spatial) {
      spatial = true;
      v.resize(p1 - p0);
      for (int64_t p = p0; p < p1; ++p) v[p - p0] = mask->keep(n, p, hw);
    } else {
      spatial = false;
      v.resize(c);
      for (int64_t j = 0; j < c; ++j) v[j] = mask->keep(n, j, c);
    }
  }
  inline float at(int64_t dp, int64_t j) const { return spatial ? v[dp] : v[j]; }
};

}  // namespace

template <bool kBias>
static void mask_to_rows_impl(const Feat& src, const float* bias, const MaskSpec* mask, float* rows) {
  const int64_t C = src.c, HW = src.p;
  const Units units(src.n, HW);
  const bool pixel_inner = src.sp == 1;  // NCHW source: walk pixels innermost
  for_units(units, C, [&](int64_t u) {
    const int64_t n = units.sample(u), p0 = units.p0(u), p1 = units.p1(u);
    UnitKeep keep;
    keep.fill(mask, n, p0, p1, HW, C);
    float* out = rows + (n * HW) * C;
    if (pixel_inner) {
      for (int64_t j = 0; j < C; ++j) {
        const float* s = src.ptr + n * src.sn + j * src.sc;
        const float b = kBias ? bias[j] : 0.f;
        for (int64_t p = p0; p < p1; ++p) {
          const float x = kBias ? s[p] + b : s[p];
          out[p * C + j] = x * keep.at(p - p0, j);
        }
      }
    } else {
      for (int64_t p = p0; p < p1; ++p) {
        const float* s = src.ptr + n * src.sn + p * src.sp;
        float* o = out + p * C;
        for (int64_t j = 0; j < C; ++j) {
          const float x = kBias ? s[j * src.sc] + bias[j] : s[j * src.sc];
          o[j] = x * keep.at(p - p0, j);
        }
      }
    }
  });
}

void mask_to_rows(const Feat& src, const float* bias, const MaskSpec* mask, float* rows) {
  if (bias != nullptr) {
    mask_to_rows_impl<true>(src, bias, mask, rows);
  } else {
    mask_to_rows_impl<false>(src, bias, mask, rows);
  }
}

void rows_to_masked(const float* rows, const MaskSpec& mask, const Feat& dst) {
  const int64_t C = dst.c, HW = dst.p;
  const Units units(dst.n, HW);
  const bool pixel_inner = dst.sp == 1;
  for_units(units, C, [&](int64_t u) {
    const int64_t n = units.sample(u), p0 = units.p0(u), p1 = units.p1(u);
    UnitKeep keep;
    keep.fill(&mask, n, p0, p1, HW, C);
    const float* in = rows + (n * HW) * C;
    if (pixel_inner) {
      for (int64_t j = 0; j < C; ++j) {
        float* d = dst.ptr + n * dst.sn + j * dst.sc;
        for (int64_t p = p0; p < p1; ++p) d[p] = in[p * C + j] * keep.at(p - p0, j);
      }
    } else {
      for (int64_t p = p0; p < p1; ++p) {
        float* d = dst.ptr + n * dst.sn + p * dst.sp;
        const float* r = in + p * C;
        for (int64_t j = 0; j < C; ++j) d[j * dst.sc] = r[j] * keep.at(p - p0, j);
      }
    }
  });
}

void bias_relu_(float* rows, const float* bias, int64_t m, int64_t c) {
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* r = rows + i * c;
      for (int64_t j = 0; j < c; ++j) {
        const float x = r[j] + bias[j];
        r[j] = x < 0.f ? 0.f : x;  // NaN propagates, as torch.relu
      }
    }
  });
}

double sq_error_grad_(float* rows, const float* bias, const Feat& target, float scale,
                      float* bias_grad) {
  const int64_t C = target.c, HW = target.p;
  const Units units(target.n, HW);
  std::vector<double> loss_part(units.count, 0.0);
  std::vector<double> col_part(bias_grad ? units.count * C : 0, 0.0);
  for_units(units, C, [&](int64_t u) {
    const int64_t n = units.sample(u), p0 = units.p0(u), p1 = units.p1(u);
    const float* t = target.ptr + n * target.sn;
    // Teacher not channels-innermost (NCHW): gather the unit's tile as rows first (it stays in L1),
    // so that the main loop runs over contiguous channels and vectorises.
    std::vector<float> tile;
    if (target.sc != 1) {
      tile.resize((p1 - p0) * C);
      for (int64_t j = 0; j < C; ++j)
        for (int64_t p = p0; p < p1; ++p) tile[(p - p0) * C + j] = t[j * target.sc + p * target.sp];
    }
    // Per-channel partials in float over the unit's <= kPixBlock pixels, then double, fixed order.
    std::vector<float> sq(C, 0.f), colf(C, 0.f);
    float* __restrict sqp = sq.data();
    float* __restrict cp = colf.data();
    for (int64_t p = p0; p < p1; ++p) {
      float* __restrict r = rows + (n * HW + p) * C;
      const float* __restrict tp = tile.empty() ? t + p * target.sp : tile.data() + (p - p0) * C;
      for (int64_t j = 0; j < C; ++j) {
        const float d = (r[j] + bias[j]) - tp[j];
        sqp[j] += d * d;
        cp[j] += d;
        r[j] = scale * d;
      }
    }
    double acc = 0.0;
    for (int64_t j = 0; j < C; ++j) acc += sqp[j];
    loss_part[u] = acc;
    if (bias_grad)
      for (int64_t j = 0; j < C; ++j) col_part[u * C + j] = cp[j];
  });
  if (bias_grad) ordered_colsum(col_part, units.count, C, scale, bias_grad);
  double total = 0.0;
  for (double v : loss_part) total += v;
  return total;
}

void relu_gate_(float* grad_rows, const float* act, int64_t n, int64_t hw, int64_t c, float go,
                float* bias_grad) {
  const Units units(n, hw);
  std::vector<double> col_part(bias_grad ? units.count * c : 0, 0.0);
  for_units(units, c, [&](int64_t u) {
    const int64_t s = units.sample(u), p0 = units.p0(u), p1 = units.p1(u);
    std::vector<float> colf(c, 0.f);
    float* __restrict cp = colf.data();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t m = s * hw + p;
      float* __restrict gr = grad_rows + m * c;
      const float* __restrict a = act + m * c;
      for (int64_t j = 0; j < c; ++j) {
        const float scaled = go * gr[j];  // computed unconditionally: a select, not a branch
        const float v = a[j] > 0.f ? scaled : 0.f;
        gr[j] = v;
        cp[j] += v;
      }
    }
    if (bias_grad)
      for (int64_t j = 0; j < c; ++j) col_part[u * c + j] = cp[j];
  });
  if (bias_grad) ordered_colsum(col_part, units.count, c, 1.0, bias_grad);
}

}  // namespace fastkd
