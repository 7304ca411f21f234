// The schema of every op in the orwcfm_fast namespace, in one place.
//
// Kernels are registered per backend with TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp for CPU,
// kernels/*.cu for CUDA); fake (meta) implementations and autograd formulas are
// registered from Python in orwcfm_fast/ops/_cpp.py.
//
// Shapes: B samples of D elements each; "[B, ...]" is any shape with B = size(0).
//
//   orw_cfm_w2_loss(v, u, v_ref [B, ...], weights [B], alpha, w2_weights [B]?) -> (loss [], fm [B], w2 [B])
//       fm[i] = mean_D (v[i] - u[i])^2, w2[i] = mean_D (v[i] - v_ref[i])^2,
//       loss = mean_i (weights[i] * fm[i] + alpha * c[i] * w2[i]) with c = w2_weights (per-sample
//       W2 coefficients; absent: c = 1, the scalar-alpha path); outputs in the accumulation
//       dtype (float64 for float64 inputs, else float32).
//   orw_cfm_w2_loss_backward(v, u, v_ref [B, ...], c_fm [B], c_w2 [B]) -> grad_v [B, ...]
//       grad_v[i] = c_fm[i] * (v[i] - u[i]) + c_w2[i] * (v[i] - v_ref[i]), in v's dtype.
//   conditional_path(x_0, x_1 [B, ...], t [B], sigma, noise [B, ...]?) -> (x_t, u_t)
//       x_t = t * x_1 + (1 - t) * x_0 (+ sigma * noise if sigma > 0), u_t = x_1 - x_0.
//   ode_step(x, ks[j] shaped like x, coeffs[j], dt) -> x + dt * sum_j coeffs[j] * ks[j]
#include <torch/library.h>

TORCH_LIBRARY(orwcfm_fast, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "orw_cfm_w2_loss(Tensor v, Tensor u, Tensor v_ref, Tensor weights, float alpha, Tensor? w2_weights=None) "
      "-> (Tensor loss, Tensor fm, Tensor w2)",
      tags);
  m.def("orw_cfm_w2_loss_backward(Tensor v, Tensor u, Tensor v_ref, Tensor c_fm, Tensor c_w2) -> Tensor", tags);
  m.def(
      "conditional_path(Tensor x_0, Tensor x_1, Tensor t, float sigma=0.0, Tensor? noise=None) "
      "-> (Tensor x_t, Tensor u_t)",
      tags);
  m.def("ode_step(Tensor x, Tensor[] ks, float[] coeffs, float dt) -> Tensor", tags);
}
