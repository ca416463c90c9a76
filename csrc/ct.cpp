// fastkd._C: CT loss (channel-wise transform), forward and backward, on the CPU.
//
//   S' = relu(S W1^T + b1) W2^T + b2     per pixel, S as rows [M = N*H*W, Cs]
//   loss = alpha * sum((S' - T)^2) / N   ('sum_over_batch')  or  / (N*Ct*H*W)  ('mean')
//
// The two 1x1 convolutions are plain GEMMs over the rows (MKL through at::mm; far faster on the
// CPU than oneDNN's 1x1 convolution on NCHW). Around them two fused passes: bias + ReLU in place,
// and squared error + fixed-order reduction + dL/dS' (in place of S') + dL/db2 in one pass that
// reads the teacher in its own layout. Saved for backward: the hidden rows and dL/dS'.
// Backward: dW2 and dH by GEMM, one pass for ReLU gating * incoming gradient + dL/db1, then dW1 and
// dS by GEMM (dS comes back channels_last, a view of its rows).
#include "fastkd.h"

#include <array>
#include <tuple>

namespace fastkd {

// -> (loss, hidden rows [M, Ch], dL/dS' rows [M, Ct], dL/db2 [Ct])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ct_forward(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, double alpha, bool mean) {
  const at::Tensor s = mergeable(student);
  const at::Tensor t = mergeable(teacher);
  const int64_t N = t.size(0), M = N * t.size(2) * t.size(3), Ch = w1.size(0);
  const at::Tensor b1c = b1.contiguous(), b2c = b2.contiguous();
  at::Tensor h = at::mm(nchw_as_rows(s), w1.t());
  bias_relu_(h.data_ptr<float>(), b1c.data_ptr<float>(), M, Ch);
  at::Tensor dp = at::mm(h, w2.t());
  const double denom = mean ? static_cast<double>(t.numel()) : static_cast<double>(N);
  const float scale = static_cast<float>(2.0 * alpha / denom);
  at::Tensor db2 = at::empty({t.size(1)}, t.options());
  const double sq = sq_error_grad_(dp.data_ptr<float>(), b2c.data_ptr<float>(), feat_of(t), scale,
                                   db2.data_ptr<float>());
  at::Tensor loss = at::scalar_tensor(alpha * sq / denom, t.options());
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
  if (n_w2) dW2 = at::mm(dp.t(), h).mul_(go);
  if (!(n_s || n_w1 || n_b1)) return {dS, dW1, db1, dW2, db2};

  at::Tensor dh = at::mm(dp, w2);
  at::Tensor db1_full = at::empty({Ch}, opts);
  relu_gate_(dh.data_ptr<float>(), h.data_ptr<float>(), N, Hh * Ww, Ch, go,
             n_b1 ? db1_full.data_ptr<float>() : nullptr);
  if (n_b1) db1 = db1_full;
  if (n_w1) dW1 = at::mm(dh.t(), nchw_as_rows(mergeable(student)));
  if (n_s) dS = rows_as_nchw(at::mm(dh, w1), N, Hh, Ww);
  return {dS, dW1, db1, dW2, db2};
}

}  // namespace fastkd
