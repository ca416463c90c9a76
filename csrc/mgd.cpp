// fastkd._C: MGD loss, forward and backward, on the CPU.
//
//   A = align(S) = conv1x1(S, Wa) + ba   (only when an align layer is given)
//   X = A * M                            M: Philox keep-mask, spatial [N,1,H,W] or channel [N,C,1,1]
//   H = relu(conv3x3(X, W1) + b1)
//   G = conv3x3(H, W2) + b2
//   loss = alpha * sum((G - T)^2) / N
//
// Forward: oneDNN does the convolutions (channels_last rows, no bias); around them three fused
// passes: (1) mask generation + application (+ align bias) while converting to rows, no mask tensor;
// (2) bias + ReLU in place; (3) squared error + its fixed-order reduction + dL/dG = 2 alpha/N (G - T)
// written in place of G, with dL/db2 summed in the same pass. G and G - T never exist as tensors.
// Saved for backward: H, dL/dG (rows), dL/db2; X is regenerated (mask pass, align conv) in backward.
// Backward: dH = conv2 input-grad(dL/dG), dW2 = conv2 weight-grad; one pass gates dH by ReLU,
// scales by the incoming gradient and sums dL/db1; X regenerated for dW1, then dropped; dX by the
// transposed convolution; one pass regenerates the mask from the seed and applies it while writing
// dL/dA in the student's layout; align backward (ATen). Peak: H, dL/dG + 2 feature-sized buffers.
#include "fastkd.h"

#include <array>
#include <tuple>

namespace fastkd {

namespace {

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, int64_t pad) {
  return at::convolution(x, w, c10::nullopt, {1, 1}, {pad, pad}, {1, 1}, false, {0, 0}, 1);
}

// channels_last [N,C,H,W] -> rows [N*H*W, C] view (copies only if oneDNN returned another layout).
at::Tensor as_rows(const at::Tensor& t) {
  return nchw_as_rows(t.contiguous(at::MemoryFormat::ChannelsLast));
}

MaskSpec mask_spec(bool spatial, double ratio, int64_t seed, int64_t offset) {
  return MaskSpec{spatial, static_cast<float>(ratio), static_cast<uint64_t>(seed),
                  static_cast<uint64_t>(offset)};
}

at::Tensor empty_like_layout(const at::Tensor& t) {
  if (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::empty_like(t, at::MemoryFormat::ChannelsLast);
  }
  return at::empty_like(t, at::MemoryFormat::Contiguous);
}

// X = mask * (align(S) or S) as rows [N*H*W, C]: the mask is drawn from the seed inside the pass.
at::Tensor masked_input(const at::Tensor& s, const c10::optional<at::Tensor>& align_w,
                        const c10::optional<at::Tensor>& align_b, const MaskSpec& mask, int64_t c) {
  const bool align = align_w.has_value() && align_w->defined();
  at::Tensor x = at::empty({s.size(0) * s.size(2) * s.size(3), c}, s.options());
  const at::Tensor a = align ? mergeable(conv(s, *align_w, 0)) : s;
  const at::Tensor ab = align ? align_b->contiguous() : at::Tensor();
  mask_to_rows(feat_of(a), align ? ab.data_ptr<float>() : nullptr, &mask, x.data_ptr<float>());
  return x;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mgd_forward_wino(
    const at::Tensor& s, const at::Tensor& t, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2, const c10::optional<at::Tensor>& align_w, const c10::optional<at::Tensor>& align_b,
    const MaskSpec& mask, double alpha);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mgd_backward_wino(float go, const at::Tensor& student, const at::Tensor& h, const at::Tensor& dg,
                  const at::Tensor& db2_saved, const at::Tensor& w1, const at::Tensor& w2,
                  const c10::optional<at::Tensor>& align_w, const c10::optional<at::Tensor>& align_b,
                  const MaskSpec& mask, std::array<bool, 6> needs);

// algo: 0 = direct convolutions (oneDNN, this file), 1 = Winograd F(4x4, 3x3) (mgd_wino.cpp).
// -> (loss, H rows, dL/dG rows, dL/db2). X is not kept: the backward regenerates it from the seed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mgd_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, const c10::optional<at::Tensor>& align_w,
    const c10::optional<at::Tensor>& align_b, bool spatial, double ratio, double alpha, int64_t seed,
    int64_t sample_offset, int64_t algo) {
  TORCH_CHECK(algo == 0 || algo == 1, "fastkd._C: mgd algo must be 0 (direct) or 1 (winograd), got ", algo);
  const at::Tensor s = mergeable(student);
  const at::Tensor t = mergeable(teacher);
  if (algo == 1) {
    return mgd_forward_wino(s, t, w1, b1, w2, b2, align_w, align_b, mask_spec(spatial, ratio, seed, sample_offset),
                            alpha);
  }
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3), M = N * H * W;
  const at::Tensor b1c = b1.contiguous(), b2c = b2.contiguous();
  const MaskSpec mask = mask_spec(spatial, ratio, seed, sample_offset);

  at::Tensor x = masked_input(s, align_w, align_b, mask, C);
  at::Tensor h = as_rows(conv(rows_as_nchw(x, N, H, W), weight_to_channels_last(w1), 1));
  x.reset();
  bias_relu_(h.data_ptr<float>(), b1c.data_ptr<float>(), M, C);
  at::Tensor dg = as_rows(conv(rows_as_nchw(h, N, H, W), weight_to_channels_last(w2), 1));
  at::Tensor db2 = at::empty({C}, t.options());
  const float scale = to_float32(2.0 * alpha / static_cast<double>(N));
  const double sq = sq_error_grad_(dg.data_ptr<float>(), b2c.data_ptr<float>(), feat_of(t), scale,
                                   db2.data_ptr<float>());
  at::Tensor loss = at::scalar_tensor(to_float32(alpha * sq / static_cast<double>(N)), t.options());
  return {loss, h, dg, db2};
}

// -> (dS, dW1, db1, dW2, db2, dWa, dba); gradients not asked for (needs[i] false) come back empty.
// needs: student, w1, b1, w2, b2, align (both align_w and align_b).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mgd_backward(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& h, const at::Tensor& dg,
             const at::Tensor& db2_saved, const at::Tensor& w1, const at::Tensor& w2,
             const c10::optional<at::Tensor>& align_w, const c10::optional<at::Tensor>& align_b, bool spatial,
             double ratio, int64_t seed, int64_t sample_offset, std::array<bool, 6> needs, int64_t algo) {
  TORCH_CHECK(algo == 0 || algo == 1, "fastkd._C: mgd algo must be 0 (direct) or 1 (winograd), got ", algo);
  if (algo == 1) {
    return mgd_backward_wino(grad.item<float>(), student, h, dg, db2_saved, w1, w2, align_w, align_b,
                             mask_spec(spatial, ratio, seed, sample_offset), needs);
  }
  const bool n_s = needs[0], n_w1 = needs[1], n_b1 = needs[2], n_w2 = needs[3], n_b2 = needs[4];
  const bool align = align_w.has_value() && align_w->defined();
  const bool n_al = align && needs[5];
  const int64_t N = student.size(0), H = student.size(2), W = student.size(3);
  const int64_t C = h.size(1);
  const float go = grad.item<float>();  // CPU tensor: no device synchronisation
  const auto opts = h.options();
  const at::Tensor empty = at::empty({0}, opts);
  at::Tensor dS = empty, dW1 = empty, db1 = empty, dW2 = empty, db2 = empty, dWa = empty, dba = empty;

  if (n_b2) db2 = db2_saved * go;
  const bool need_dx = n_s || n_al;
  const bool need_dh = need_dx || n_w1 || n_b1;
  if (!need_dh && !n_w2) return {dS, dW1, db1, dW2, db2, dWa, dba};

  const at::Tensor h4 = rows_as_nchw(h, N, H, W);
  auto g2 = at::convolution_backward(rows_as_nchw(dg, N, H, W), h4, weight_to_channels_last(w2), c10::nullopt, {1, 1}, {1, 1},
                                     {1, 1}, false, {0, 0}, 1, {need_dh, n_w2, false});
  if (n_w2) dW2 = weight_to_contiguous(std::get<1>(g2)).mul_(go);
  if (!need_dh) return {dS, dW1, db1, dW2, db2, dWa, dba};

  at::Tensor dh = as_rows(std::get<0>(g2));
  std::get<0>(g2).reset();
  at::Tensor db1_full = at::empty({C}, opts);
  relu_gate_(dh.data_ptr<float>(), h.data_ptr<float>(), N, H * W, C, go,
             n_b1 ? db1_full.data_ptr<float>() : nullptr);
  if (n_b1) db1 = db1_full;
  if (!need_dx && !n_w1) return {dS, dW1, db1, dW2, db2, dWa, dba};

  // Peak memory: X is regenerated here and released as soon as dW1 is done; dX comes from the
  // transposed convolution (no input tensor needed); dH is released before dL/dS is allocated.
  const MaskSpec mask = mask_spec(spatial, ratio, seed, sample_offset);
  const at::Tensor w1cl = weight_to_channels_last(w1);
  at::Tensor dh4 = rows_as_nchw(dh, N, H, W);
  if (n_w1) {
    at::Tensor x = masked_input(mergeable(student), align_w, align_b, mask, C);
    auto g1 = at::convolution_backward(dh4, rows_as_nchw(x, N, H, W), w1cl, c10::nullopt, {1, 1}, {1, 1},
                                       {1, 1}, false, {0, 0}, 1, {false, true, false});
    dW1 = weight_to_contiguous(std::get<1>(g1));
  }
  if (!need_dx) return {dS, dW1, db1, dW2, db2, dWa, dba};
  at::Tensor dx = as_rows(at::convolution(dh4, w1cl, c10::nullopt, {1, 1}, {1, 1}, {1, 1}, true, {0, 0}, 1));
  dh4.reset();
  dh.reset();
  if (!align) {
    dS = empty_like_layout(student);
    rows_to_masked(dx.data_ptr<float>(), mask, feat_of(dS));
    return {dS, dW1, db1, dW2, db2, dWa, dba};
  }
  const at::Tensor s = mergeable(student);
  at::Tensor da = at::empty({N, C, H, W}, opts.memory_format(s.suggest_memory_format()));
  rows_to_masked(dx.data_ptr<float>(), mask, feat_of(da));
  dx.reset();
  align_backward(da, s, *align_w, n_s, n_al, dS, dWa, dba);
  return {dS, dW1, db1, dW2, db2, dWa, dba};
}

void align_backward(const at::Tensor& da, const at::Tensor& s, const at::Tensor& align_w, bool n_s, bool n_al,
                    at::Tensor& dS, at::Tensor& dWa, at::Tensor& dba) {
  auto ga = at::convolution_backward(da, s, align_w, at::IntArrayRef{align_w.size(0)}, {1, 1}, {0, 0}, {1, 1},
                                     false, {0, 0}, 1, {n_s, n_al, n_al});
  if (n_s) dS = std::get<0>(ga);
  if (n_al) {
    dWa = weight_to_contiguous(std::get<1>(ga));
    dba = std::get<2>(ga);
  }
}

}  // namespace fastkd
