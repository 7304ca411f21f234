// CPU kernel of conditional_path: x_t and u_t in one pass over x_0, x_1 (and noise).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace orwcfm_fast::cpu {
namespace {

constexpr const char* kPathOp = "orwcfm_fast::conditional_path";

// x_t = t * x_1 + (1 - t) * x_0 (+ s * noise) and u_t = x_1 - x_0 for i < n, rounded once.
template <bool kNoise, typename scalar_t, typename acc_t>
void path_run(const scalar_t* C10_RESTRICT x_0, const scalar_t* C10_RESTRICT x_1, const scalar_t* C10_RESTRICT noise,
              acc_t t, acc_t s, scalar_t* C10_RESTRICT x_t, scalar_t* C10_RESTRICT u_t, int64_t n) {
  const acc_t one_minus_t = acc_t(1) - t;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = static_cast<acc_t>(x_0[i]);
    const acc_t b = static_cast<acc_t>(x_1[i]);
    acc_t xt = t * b + one_minus_t * a;
    if constexpr (kNoise) {
      xt += s * static_cast<acc_t>(noise[i]);
    }
    x_t[i] = static_cast<scalar_t>(xt);
    u_t[i] = static_cast<scalar_t>(b - a);
  }
}

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
  const int64_t B = x_1.size(0);
  const int64_t D = x_1.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_1.scalar_type(), "conditional_path_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p0 = x_0.const_data_ptr<scalar_t>();
    const scalar_t* p1 = x_1.const_data_ptr<scalar_t>();
    const scalar_t* pn = add_noise ? noise.const_data_ptr<scalar_t>() : nullptr;
    const std::vector<acc_t> t = per_sample_values<acc_t>(t_in);  // rounded once, like .to(acc_t)
    scalar_t* pxt = x_t.mutable_data_ptr<scalar_t>();
    scalar_t* put = u_t.mutable_data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(sigma);
    parallel_rows(B, D, [&](int64_t row, int64_t begin, int64_t end) {
      const acc_t tt = t[row];
      if (pn != nullptr) {
        path_run<true>(p0 + begin, p1 + begin, pn + begin, tt, s, pxt + begin, put + begin, end - begin);
      } else {  // noise unused: any valid pointer
        path_run<false>(p0 + begin, p1 + begin, p1 + begin, tt, s, pxt + begin, put + begin, end - begin);
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
