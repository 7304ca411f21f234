// CUDA kernel of conditional_path: x_t and u_t in one elementwise pass over x_0, x_1
// (and noise), 16-byte packs where aligned, the per-sample t read once per pack.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "common.cuh"

namespace orwcfm_fast::cuda {
namespace {

constexpr const char* kPathOp = "orwcfm_fast::conditional_path";

// x_t = t[row] * x_1 + (1 - t[row]) * x_0 (+ sigma * noise when noise != nullptr); u_t = x_1 - x_0.
template <typename T, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads) conditional_path_kernel(
    const T* __restrict__ x_0, const T* __restrict__ x_1, const T* __restrict__ noise,
    const at::opmath_type<T>* __restrict__ t, at::opmath_type<T> sigma, T* __restrict__ x_t, T* __restrict__ u_t,
    index_t packs, at::cuda::detail::IntDivider<index_t> packs_per_row) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t p = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs; p += stride) {
    const acc_t tt = t[packs_per_row.div(p)];
    const acc_t one_minus_t = acc_t(1) - tt;
    const P a = reinterpret_cast<const P*>(x_0)[p];
    const P b = reinterpret_cast<const P*>(x_1)[p];
    P xt;
    P ut;
    if (noise != nullptr) {
      const P n = reinterpret_cast<const P*>(noise)[p];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t x0 = static_cast<acc_t>(a.val[e]);
        const acc_t x1 = static_cast<acc_t>(b.val[e]);
        xt.val[e] = static_cast<T>(tt * x1 + one_minus_t * x0 + sigma * static_cast<acc_t>(n.val[e]));
        ut.val[e] = static_cast<T>(x1 - x0);
      }
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t x0 = static_cast<acc_t>(a.val[e]);
        const acc_t x1 = static_cast<acc_t>(b.val[e]);
        xt.val[e] = static_cast<T>(tt * x1 + one_minus_t * x0);
        ut.val[e] = static_cast<T>(x1 - x0);
      }
    }
    reinterpret_cast<P*>(x_t)[p] = xt;
    reinterpret_cast<P*>(u_t)[p] = ut;
  }
}

// x_0, x_1: [B, ...] (same shape and dtype); t: [B]; noise: like x_1, used only when sigma > 0.
// Returns (x_t, u_t), contiguous, in x_1's dtype.
std::tuple<at::Tensor, at::Tensor> conditional_path_cuda(const at::Tensor& x_0_in, const at::Tensor& x_1_in,
                                                         const at::Tensor& t_in, double sigma,
                                                         const std::optional<at::Tensor>& noise_in) {
  check_path_inputs(kPathOp, x_0_in, x_1_in, t_in, sigma, noise_in);
  const c10::cuda::CUDAGuard guard(x_1_in.device());
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
  const c10::DeviceIndex device = x_1.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_1.scalar_type(), "conditional_path_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = pack_size<scalar_t>();
    const scalar_t* p0 = x_0.const_data_ptr<scalar_t>();
    const scalar_t* p1 = x_1.const_data_ptr<scalar_t>();
    const scalar_t* pn = add_noise ? noise.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pxt = x_t.mutable_data_ptr<scalar_t>();
    scalar_t* put = u_t.mutable_data_ptr<scalar_t>();
    const bool aligned = pack_aligned<scalar_t, kVec>(p0) && pack_aligned<scalar_t, kVec>(p1) &&
                         (pn == nullptr || pack_aligned<scalar_t, kVec>(pn)) && pack_aligned<scalar_t, kVec>(pxt) &&
                         pack_aligned<scalar_t, kVec>(put);
    dispatch_row_packs<scalar_t>(x_1.numel(), D, aligned, [&](auto vec, auto packs_per_row, auto packs) {
      constexpr int VEC = decltype(vec)::value;
      using index_t = decltype(packs);
      conditional_path_kernel<scalar_t, VEC, index_t><<<grid_for(packs, device), kThreads, 0, stream>>>(
          p0, p1, pn, t.const_data_ptr<acc_t>(), static_cast<acc_t>(sigma), pxt, put, packs, packs_per_row);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {x_t, u_t};
}

}  // namespace
}  // namespace orwcfm_fast::cuda

TORCH_LIBRARY_IMPL(orwcfm_fast, CUDA, m) {
  m.impl("conditional_path", &orwcfm_fast::cuda::conditional_path_cuda);
}
