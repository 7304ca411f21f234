// CPU kernel of conditional_path: x_t and u_t in one pass over x_0, x_1 (and noise).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace orwcfm_fast::cpu {
namespace {

constexpr const char* kPathOp = "orwcfm_fast::conditional_path";

// x_0, x_1: [B, ...] (same shape and dtype); t: [B]; noise: like x_1, used only when sigma > 0.
// Returns (x_t, u_t), contiguous, in x_1's dtype; computed in the accumulation type, rounded once:
// x_t = t * x_1 + (1 - t) * x_0 (+ sigma * noise), u_t = x_1 - x_0.
std::tuple<at::Tensor, at::Tensor> conditional_path_cpu(const at::Tensor& x_0_in, const at::Tensor& x_1_in,
                                                        const at::Tensor& t_in, double sigma,
                                                        const std::optional<at::Tensor>& noise_in) {
  check_path_inputs(kPathOp, x_0_in, x_1_in, t_in, sigma, noise_in);
  const at::Tensor x_0 = x_0_in.contiguous();
  const at::Tensor x_1 = x_1_in.contiguous();
  const bool add_noise = sigma > 0.0;
  const at::Tensor noise = add_noise ? noise_in->contiguous() : at::Tensor();
  at::Tensor x_t = at::empty(x_1.sizes(), x_1.options());
  at::Tensor u_t = at::empty(x_1.sizes(), x_1.options());
  if (x_1.numel() == 0) {
    return {x_t, u_t};
  }
  const at::Tensor t = t_in.to(accumulation_dtype(x_1.scalar_type())).contiguous();
  const int64_t B = x_1.size(0);
  const int64_t D = x_1.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_1.scalar_type(), "conditional_path_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p0 = x_0.const_data_ptr<scalar_t>();
    const scalar_t* p1 = x_1.const_data_ptr<scalar_t>();
    const scalar_t* pn = add_noise ? noise.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* pt = t.const_data_ptr<acc_t>();
    scalar_t* pxt = x_t.mutable_data_ptr<scalar_t>();
    scalar_t* put = u_t.mutable_data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(sigma);
    parallel_rows(B, D, [&](int64_t row, int64_t begin, int64_t end) {
      const acc_t tt = pt[row];
      const acc_t one_minus_t = acc_t(1) - tt;
      if (pn != nullptr) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t a = static_cast<acc_t>(p0[i]);
          const acc_t b = static_cast<acc_t>(p1[i]);
          pxt[i] = static_cast<scalar_t>(tt * b + one_minus_t * a + s * static_cast<acc_t>(pn[i]));
          put[i] = static_cast<scalar_t>(b - a);
        }
      } else {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t a = static_cast<acc_t>(p0[i]);
          const acc_t b = static_cast<acc_t>(p1[i]);
          pxt[i] = static_cast<scalar_t>(tt * b + one_minus_t * a);
          put[i] = static_cast<scalar_t>(b - a);
        }
      }
    });
  });
  return {x_t, u_t};
}

}  // namespace
}  // namespace orwcfm_fast::cpu

TORCH_LIBRARY_IMPL(orwcfm_fast, CPU, m) {
  m.impl("conditional_path", &orwcfm_fast::cpu::conditional_path_cpu);
}
