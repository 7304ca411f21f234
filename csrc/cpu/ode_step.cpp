// CPU kernel of ode_step: x + dt * sum_j coeffs[j] * ks[j] for any number of ks.
//
// Works on cache-resident chunks: a chunk of x is widened into an accumulation-type
// buffer, each k is added into it in order (like the reference's sequential add_),
// and the buffer is rounded once into the output.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace orwcfm_fast::cpu {
namespace {

constexpr const char* kOdeStepOp = "orwcfm_fast::ode_step";
constexpr int64_t kChunk = 1024;  // elements per accumulation buffer (4-8 KiB)

// x: any shape; ks: tensors shaped like x (same dtype, may be empty); coeffs: one per k.
// Returns a new contiguous tensor in x's dtype.
at::Tensor ode_step_cpu(const at::Tensor& x_in, at::TensorList ks_in, c10::ArrayRef<double> coeffs, double dt) {
  check_ode_step_inputs(kOdeStepOp, x_in, ks_in, coeffs);
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> ks;
  ks.reserve(ks_in.size());
  for (const at::Tensor& k : ks_in) {
    ks.push_back(k.contiguous());
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ode_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    std::vector<const scalar_t*> pk;
    std::vector<acc_t> scale;
    for (size_t j = 0; j < ks.size(); ++j) {
      pk.push_back(ks[j].const_data_ptr<scalar_t>());
      scale.push_back(static_cast<acc_t>(dt * coeffs[j]));  // as the reference's add_(k, alpha=dt * c)
    }
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      acc_t buf[kChunk];
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t m = std::min(kChunk, end - start);
        for (int64_t i = 0; i < m; ++i) {
          buf[i] = static_cast<acc_t>(px[start + i]);
        }
        for (size_t j = 0; j < pk.size(); ++j) {
          const scalar_t* k = pk[j] + start;
          const acc_t c = scale[j];
          for (int64_t i = 0; i < m; ++i) {
            buf[i] += c * static_cast<acc_t>(k[i]);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          po[start + i] = static_cast<scalar_t>(buf[i]);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace orwcfm_fast::cpu

TORCH_LIBRARY_IMPL(orwcfm_fast, CPU, m) {
  m.impl("ode_step", &orwcfm_fast::cpu::ode_step_cpu);
}
