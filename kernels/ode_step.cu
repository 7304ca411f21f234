// CUDA kernel of ode_step: out = x + dt * sum_j coeffs[j] * ks[j], one elementwise pass
// for up to kMaxKsPerPass stage values (every explicit RK tableau up to dopri5's 7 stages).
//
// The k pointers and scaled coefficients travel in the kernel's parameter block; the loop
// over them is unrolled with constant indices, so all loads of a pack are in flight at
// once. More stage values take several passes through an accumulation-dtype buffer
// (the output itself for float32/float64), still rounding to x's dtype once, at the end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "common.cuh"

namespace orwcfm_fast::cuda {
namespace {

constexpr const char* kOdeStepOp = "orwcfm_fast::ode_step";
constexpr int kMaxKsPerPass = 8;

template <typename acc_t>
struct Stages {
  const void* ks[kMaxKsPerPass];  // K* each
  acc_t scale[kMaxKsPerPass];     // dt * coeffs[j]
  int count;
};

// out = base + sum_{j < count} scale[j] * ks[j], accumulated in acc_t in order j = 0, 1, ...
// base and out may be the same buffer (each element is read before it is written by the
// same thread), so they are not __restrict__. Elements past the last whole pack are done
// one by one.
template <typename K, typename In, typename Out, int VEC>
__global__ void __launch_bounds__(kThreads) ode_combine_kernel(const In* base, Stages<at::opmath_type<K>> stages,
                                                               Out* out, int64_t packs, int64_t n) {
  using acc_t = at::opmath_type<K>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t p = tid; p < packs; p += stride) {
    const Pack<In, VEC> b = reinterpret_cast<const Pack<In, VEC>*>(base)[p];
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc[e] = static_cast<acc_t>(b.val[e]);
    }
#pragma unroll
    for (int j = 0; j < kMaxKsPerPass; ++j) {
      if (j < stages.count) {
        const Pack<K, VEC> k = reinterpret_cast<const Pack<K, VEC>*>(stages.ks[j])[p];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          acc[e] += stages.scale[j] * static_cast<acc_t>(k.val[e]);
        }
      }
    }
    Pack<Out, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      o.val[e] = static_cast<Out>(acc[e]);
    }
    reinterpret_cast<Pack<Out, VEC>*>(out)[p] = o;
  }
  for (int64_t i = packs * VEC + tid; i < n; i += stride) {
    acc_t acc = static_cast<acc_t>(base[i]);
#pragma unroll
    for (int j = 0; j < kMaxKsPerPass; ++j) {
      if (j < stages.count) {
        acc += stages.scale[j] * static_cast<acc_t>(static_cast<const K*>(stages.ks[j])[i]);
      }
    }
    out[i] = static_cast<Out>(acc);
  }
}

// One pass over ks[first, last): out = base + sum scale[j] * ks[j].
template <typename K, typename In, typename Out>
void launch_pass(const In* base, const std::vector<const K*>& ks, const std::vector<at::opmath_type<K>>& scale,
                 size_t first, size_t last, Out* out, int64_t n, bool vectorize, c10::DeviceIndex device,
                 cudaStream_t stream) {
  Stages<at::opmath_type<K>> stages{};
  stages.count = static_cast<int>(last - first);
  for (size_t j = first; j < last; ++j) {
    stages.ks[j - first] = ks[j];
    stages.scale[j - first] = scale[j];
  }
  constexpr int kVec = pack_size<K>();
  if (vectorize) {
    const int64_t packs = n / kVec;
    ode_combine_kernel<K, In, Out, kVec>
        <<<grid_for(std::max<int64_t>(packs, n - packs * kVec), device), kThreads, 0, stream>>>(base, stages, out,
                                                                                               packs, n);
  } else {
    ode_combine_kernel<K, In, Out, 1><<<grid_for(n, device), kThreads, 0, stream>>>(base, stages, out, n, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// All passes of one ode_step call, for x's element type T.
template <typename T>
void launch_ode_step(const at::Tensor& x, const std::vector<at::Tensor>& ks, c10::ArrayRef<double> coeffs, double dt,
                     at::Tensor& out, c10::DeviceIndex device, cudaStream_t stream) {
  using acc_t = at::opmath_type<T>;
  constexpr int kVec = pack_size<T>();
  const int64_t n = x.numel();
  const T* px = x.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  std::vector<const T*> pk;
  std::vector<acc_t> scale;
  bool vectorize = pack_aligned<T, kVec>(px) && pack_aligned<T, kVec>(po);
  for (size_t j = 0; j < ks.size(); ++j) {
    pk.push_back(ks[j].const_data_ptr<T>());
    scale.push_back(static_cast<acc_t>(dt * coeffs[j]));  // as the reference's add_(k, alpha=dt * c)
    vectorize = vectorize && pack_aligned<T, kVec>(pk.back());
  }
  const size_t nk = pk.size();
  constexpr auto kPass = static_cast<size_t>(kMaxKsPerPass);
  if (nk <= kPass) {
    launch_pass<T>(px, pk, scale, 0, nk, po, n, vectorize, device, stream);
    return;
  }
  const auto pass_end = [&](size_t first) { return std::min(nk, first + kPass); };
  if constexpr (std::is_same_v<T, acc_t>) {
    // float32/float64: accumulate in place in the output, which has the accumulation dtype.
    launch_pass<T>(px, pk, scale, 0, kPass, po, n, vectorize, device, stream);
    for (size_t first = kPass; first < nk; first += kPass) {
      launch_pass<T>(static_cast<const acc_t*>(po), pk, scale, first, pass_end(first), po, n, vectorize, device,
                     stream);
    }
  } else {
    // float16/bfloat16: accumulate in a float buffer, round into the output on the last pass.
    at::Tensor buffer = at::empty(x.sizes(), x.options().dtype(accumulation_dtype(x.scalar_type())));
    acc_t* pb = buffer.mutable_data_ptr<acc_t>();
    vectorize = vectorize && pack_aligned<acc_t, kVec>(pb);
    launch_pass<T>(px, pk, scale, 0, kPass, pb, n, vectorize, device, stream);
    size_t first = kPass;
    for (; pass_end(first) < nk; first += kPass) {
      launch_pass<T>(static_cast<const acc_t*>(pb), pk, scale, first, pass_end(first), pb, n, vectorize, device,
                     stream);
    }
    launch_pass<T>(static_cast<const acc_t*>(pb), pk, scale, first, nk, po, n, vectorize, device, stream);
  }
}

// x: any shape; ks: tensors shaped like x (same dtype, may be empty); coeffs: one per k.
// Returns a new contiguous tensor in x's dtype.
at::Tensor ode_step_cuda(const at::Tensor& x_in, at::TensorList ks_in, c10::ArrayRef<double> coeffs, double dt) {
  check_ode_step_inputs(kOdeStepOp, x_in, ks_in, coeffs);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> ks;
  ks.reserve(ks_in.size());
  for (const at::Tensor& k : ks_in) {
    ks.push_back(k.contiguous());
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) {
    return out;
  }
  const c10::DeviceIndex device = x.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ode_step_cuda", [&] {
    launch_ode_step<scalar_t>(x, ks, coeffs, dt, out, device, stream);
  });
  return out;
}

}  // namespace
}  // namespace orwcfm_fast::cuda

TORCH_LIBRARY_IMPL(orwcfm_fast, CUDA, m) {
  m.impl("ode_step", &orwcfm_fast::cuda::ode_step_cuda);
}
