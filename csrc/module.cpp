// fastkd._C: operator registration (torch.ops.fastkd_C.*), the mask-generation entry points, and
// the Python module init. The Python side (fastkd/ops/_csrc_backend.py) adds fake (meta)
// implementations and autograd, so the ops are ordinary torch custom ops.
#include <Python.h>

#include <array>
#include <torch/library.h>

#include "fastkd.h"

namespace fastkd {

// Bumped whenever an op schema or a saved-tensor convention changes: the loader refuses a stale build.
constexpr int64_t kAbiVersion = 3;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mgd_forward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool, double,
    double, int64_t, int64_t, int64_t);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
mgd_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
             const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
             const c10::optional<at::Tensor>&, bool, double, int64_t, int64_t, std::array<bool, 6>, int64_t);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ct_forward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, bool);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ct_backward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, std::array<bool, 5>);

// The keep-mask of the contract: [N,1,H,W] (spatial) or [N,C,1,1] (channel), float32 0/1.
at::Tensor keep_mask(bool spatial, int64_t n, int64_t c, int64_t h, int64_t w, double ratio, int64_t seed,
                     int64_t sample_offset) {
  const MaskSpec mask{spatial, static_cast<float>(ratio), static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(sample_offset)};
  const int64_t per = spatial ? h * w : c;
  at::Tensor out = spatial ? at::empty({n, 1, h, w}, at::kFloat) : at::empty({n, c, 1, 1}, at::kFloat);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n * per, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = mask.keep(i / per, i % per, per);
  });
  return out;
}

// tl.rand(seed, counter) for an int64 counter tensor (counters are taken as uint64 bit patterns).
at::Tensor philox_uniform(const at::Tensor& counter, int64_t seed) {
  TORCH_CHECK(counter.scalar_type() == at::kLong, "philox_uniform: counter must be int64");
  const at::Tensor ctr = counter.contiguous();
  at::Tensor out = at::empty(ctr.sizes(), ctr.options().dtype(at::kFloat));
  const int64_t* c = ctr.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, ctr.numel(), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = uint_to_uniform(philox_first_word(key, static_cast<uint64_t>(c[i])));
  });
  return out;
}

int64_t abi_version() { return kAbiVersion; }

}  // namespace fastkd

TORCH_LIBRARY(fastkd_C, m) {
  m.def("abi_version() -> int", &fastkd::abi_version);
  m.def("keep_mask(bool spatial, int n, int c, int h, int w, float ratio, int seed, int sample_offset) -> Tensor");
  m.def("philox_uniform(Tensor counter, int seed) -> Tensor");
  m.def("mgd_forward(Tensor student, Tensor teacher, Tensor gen_w1, Tensor gen_b1, Tensor gen_w2, "
        "Tensor gen_b2, Tensor? align_w, Tensor? align_b, bool spatial, float ratio, float alpha, int seed, "
        "int sample_offset, int algo=1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mgd_backward(Tensor grad, Tensor student, Tensor h, Tensor dg, Tensor db2, "
        "Tensor gen_w1, Tensor gen_w2, Tensor? align_w, Tensor? align_b, bool spatial, float ratio, int seed, "
        "int sample_offset, bool[6] needs, int algo=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ct_forward(Tensor student, Tensor teacher, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
        "float alpha, bool mean) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ct_backward(Tensor grad, Tensor student, Tensor h, Tensor dp, Tensor db2, Tensor w1, Tensor w2, "
        "bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastkd_C, CPU, m) {
  m.impl("philox_uniform", &fastkd::philox_uniform);
  m.impl("mgd_forward", &fastkd::mgd_forward);
  m.impl("mgd_backward", &fastkd::mgd_backward);
  m.impl("ct_forward", &fastkd::ct_forward);
  m.impl("ct_backward", &fastkd::ct_backward);
}

// keep_mask takes no tensor, so it has no dispatch key to pick CPU by: give it a catch-all kernel.
TORCH_LIBRARY_IMPL(fastkd_C, CompositeExplicitAutograd, m) {
  m.impl("keep_mask", &fastkd::keep_mask);
}

static struct PyModuleDef fastkd_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "fastkd's compiled CPU kernels; the ops live in torch.ops.fastkd_C (load via fastkd._ext).", -1,
    nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastkd_c_module); }
