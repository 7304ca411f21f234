// Input validation shared by the CPU (csrc/cpu) and CUDA (kernels/) implementations.
//
// Every op validates its arguments with these helpers before touching data, so both
// backends raise the same message, which names the op and the offending argument, e.g.
//   orwcfm_fast::orw_cfm_w2_loss: u has shape [4, 2] but v has [4, 3]; they must match
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace orwcfm_fast {

// Dtype in which an op accumulates and returns reductions: float64 for float64, else float32.
inline at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// `name` is defined and float32/float64/float16/bfloat16.
inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be a float32, float64, float16 or bfloat16 tensor, got ", t.scalar_type());
}

// `name` is on the same device as `like_name`.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                              const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name, " is on ",
              like.device(), "; all tensor arguments must be on the same device");
}

// `name` has the shape, dtype and device of `like_name`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                       const at::Tensor& like) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", like_name, " has ",
              like.sizes(), "; they must match");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              like_name, " has ", like.scalar_type(), "; they must match");
  check_same_device(op, name, t, like_name, like);
}

// `name` is a [B] float vector (any supported float dtype) on the samples' device.
inline void check_batch_vector(const char* op, const char* name, const at::Tensor& w, const char* like_name,
                               const at::Tensor& like) {
  check_float(op, name, w);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == like.size(0), op, ": ", name, " must have shape [B] = [", like.size(0),
              "] (B = ", like_name, ".shape[0]), got ", w.sizes());
  check_same_device(op, name, w, like_name, like);
}

// [B, ...] samples with at least one sample (B >= 1) and one non-batch element (D >= 1).
inline void check_samples(const char* op, const char* name, const at::Tensor& x) {
  check_float(op, name, x);
  TORCH_CHECK(x.dim() >= 2, op, ": ", name, " must be [B, ...] with at least one non-batch dim, got shape ",
              x.sizes());
  TORCH_CHECK(x.size(0) >= 1, op, ": ", name, " must hold at least one sample (B >= 1), got shape ", x.sizes());
  TORCH_CHECK(x.numel() >= 1, op, ": ", name, " must have at least one element per sample, got shape ", x.sizes());
}

// orw_cfm_w2_loss(v, u, v_ref, weights, alpha, w2_weights). The values of w2_weights are not
// checked (that would read them back from the device); the caller keeps them >= 0.
inline void check_loss_inputs(const char* op, const at::Tensor& v, const at::Tensor& u, const at::Tensor& v_ref,
                              const at::Tensor& weights, double alpha,
                              const std::optional<at::Tensor>& w2_weights) {
  check_samples(op, "v", v);
  check_like(op, "u", u, "v", v);
  check_like(op, "v_ref", v_ref, "v", v);
  check_batch_vector(op, "weights", weights, "v", v);
  if (w2_weights.has_value() && w2_weights->defined()) {
    check_batch_vector(op, "w2_weights", *w2_weights, "v", v);
  }
  TORCH_CHECK(alpha >= 0.0, op, ": alpha must be >= 0, got ", alpha);
}

// orw_cfm_w2_loss_backward(v, u, v_ref, c_fm, c_w2).
inline void check_loss_backward_inputs(const char* op, const at::Tensor& v, const at::Tensor& u,
                                       const at::Tensor& v_ref, const at::Tensor& c_fm, const at::Tensor& c_w2) {
  check_samples(op, "v", v);
  check_like(op, "u", u, "v", v);
  check_like(op, "v_ref", v_ref, "v", v);
  check_batch_vector(op, "c_fm", c_fm, "v", v);
  check_batch_vector(op, "c_w2", c_w2, "v", v);
}

// conditional_path(x_0, x_1, t, sigma, noise): x_1 is [B, ...] (B may be 0), noise is needed when sigma > 0.
inline void check_path_inputs(const char* op, const at::Tensor& x_0, const at::Tensor& x_1, const at::Tensor& t,
                              double sigma, const std::optional<at::Tensor>& noise) {
  check_float(op, "x_1", x_1);
  TORCH_CHECK(x_1.dim() >= 1, op, ": x_1 must be [B, ...], got a 0-dim tensor");
  check_like(op, "x_0", x_0, "x_1", x_1);
  check_batch_vector(op, "t", t, "x_1", x_1);
  const bool has_noise = noise.has_value() && noise->defined();
  if (has_noise) {
    check_like(op, "noise", *noise, "x_1", x_1);
  }
  TORCH_CHECK(!(sigma > 0.0) || has_noise, op, ": sigma = ", sigma, " > 0 needs `noise` (standard normal, shaped like x_1)");
}

// ode_step(x, ks, coeffs, dt): every k is shaped like x; one coefficient per k.
inline void check_ode_step_inputs(const char* op, const at::Tensor& x, at::TensorList ks,
                                  c10::ArrayRef<double> coeffs) {
  check_float(op, "x", x);
  TORCH_CHECK(ks.size() == coeffs.size(), op, ": got ", coeffs.size(), " coefficients for ", ks.size(),
              " stage values ks; they must match");
  for (size_t j = 0; j < ks.size(); ++j) {
    const std::string name = "ks[" + std::to_string(j) + "]";
    check_like(op, name.c_str(), ks[j], "x", x);
  }
}

// [B] coefficient vector in the accumulation dtype, contiguous (no copy when it already is).
inline at::Tensor per_sample_coefficients(const at::Tensor& c, at::ScalarType acc) {
  return c.to(acc).contiguous();
}

}  // namespace orwcfm_fast
