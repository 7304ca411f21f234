// CUDA kernels of orw_cfm_w2_loss and orw_cfm_w2_loss_backward.
//
// Forward (memory bound, one read of v, u, v_ref for both fm and w2):
//   1. per-(row, chunk) partial sums of (v-u)^2 and (v-v_ref)^2, in double, written to a
//      workspace. Rows of D <= 1024 use a group of <= 32 lanes per row (many rows per block);
//      longer rows are split into `chunks` pieces so B * chunks blocks fill the GPU even for
//      B = 1, with 16-byte vector loads where the three tensors are equally aligned.
//      Within a thread, 16-32 squares are summed in float (double for float64 inputs)
//      before being added to double accumulators; warp/block reductions run in double.
//   2. finalize: per-row sums of the chunk partials in a fixed order -> fm, w2, and the
//      loss as a deterministic block reduction (a third one-block kernel when B > 1024).
//      With w2_weights the W2 term of row i is alpha * c[i] * w2[i]: the same kernels, c read
//      (as float64, converted once on the device) by the finalize kernel; without them the
//      pointer is null and the arithmetic is the scalar-alpha one.
// No atomics, no host synchronization; everything runs on the current stream, so the op
// can be captured in a CUDA graph. Results are bitwise reproducible run to run.
//
// Backward: grad_v = c_fm[row] * (v - u) + c_w2[row] * (v - v_ref), one elementwise pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "common.cuh"

namespace orwcfm_fast::cuda {
namespace {

constexpr const char* kLossOp = "orwcfm_fast::orw_cfm_w2_loss";
constexpr const char* kLossBackwardOp = "orwcfm_fast::orw_cfm_w2_loss_backward";

constexpr int64_t kRowsKernelMaxD = 1024;  // rows up to this long: lane groups, one row per group
constexpr int64_t kMinTermsPerLane = 16;   // lane groups are sized for >= this many elements per lane
constexpr int kFinalizeThreads = 1024;
constexpr int64_t kFinalizeRowsPerBlock = 1024;

// Partial sums for rows of D <= kRowsKernelMaxD: a group of G lanes (a power of two <= 32)
// per row, groups grid-striding over rows. Writes part_fm[row], part_w2[row].
template <typename T>
__global__ void __launch_bounds__(kThreads) loss_partials_rows_kernel(const T* __restrict__ v, const T* __restrict__ u,
                                                                      const T* __restrict__ r, int64_t B, int64_t D,
                                                                      int G, double* __restrict__ part_fm,
                                                                      double* __restrict__ part_w2) {
  using acc_t = at::opmath_type<T>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int lane = threadIdx.x & (G - 1);
  const int64_t groups = static_cast<int64_t>(gridDim.x) * kThreads / G;
  // `first` is the row of the warp's first group: the loop is warp-uniform, so every
  // shuffle below runs with the full warp.
  for (int64_t row = tid / G, first = (tid & ~int64_t{31}) / G; first < B; row += groups, first += groups) {
    acc_t f = 0;
    acc_t w = 0;
    if (row < B) {
      const T* rv = v + row * D;
      const T* ru = u + row * D;
      const T* rr = r + row * D;
      for (int64_t e = lane; e < D; e += G) {
        const acc_t x = static_cast<acc_t>(rv[e]);
        const acc_t d_fm = x - static_cast<acc_t>(ru[e]);
        const acc_t d_w2 = x - static_cast<acc_t>(rr[e]);
        f += d_fm * d_fm;
        w += d_w2 * d_w2;
      }
    }
    double df = static_cast<double>(f);
    double dw = static_cast<double>(w);
    for (int offset = G >> 1; offset > 0; offset >>= 1) {
      df += __shfl_xor_sync(kFullMask, df, offset, G);
      dw += __shfl_xor_sync(kFullMask, dw, offset, G);
    }
    if (lane == 0 && row < B) {
      part_fm[row] = df;
      part_w2[row] = dw;
    }
  }
}

// Partial sums for long rows: block b handles chunk (b % chunks) of row (b / chunks) and
// writes part_fm[b], part_w2[b]. VEC > 1 requires v, u, r to share their alignment modulo
// 16 bytes; each row then has a scalar head up to the first 16-byte boundary, a vector body
// split evenly over the chunks, and a scalar tail (head and tail are done by chunk 0).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) loss_partials_chunked_kernel(const T* __restrict__ v,
                                                                         const T* __restrict__ u,
                                                                         const T* __restrict__ r, int64_t D,
                                                                         int64_t chunks, double* __restrict__ part_fm,
                                                                         double* __restrict__ part_w2) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  // Packs in flight per thread and tensor: 4 (2 for 16-bit types, whose packs hold 8 elements)
  // keeps 16-32 squares per float partial sum and registers below ~70.
  constexpr int kUnroll = (VEC > 1 && sizeof(T) == 2) ? 2 : 4;
  __shared__ double shared[64];
  const int64_t block = blockIdx.x;
  const int64_t row = block / chunks;
  const int64_t chunk = block - row * chunks;
  const T* rv = v + row * D;
  const T* ru = u + row * D;
  const T* rr = r + row * D;

  int64_t head = 0;
  if constexpr (VEC > 1) {
    const auto misalign = static_cast<int64_t>((reinterpret_cast<std::uintptr_t>(rv) % kVecBytes) / sizeof(T));
    head = misalign == 0 ? 0 : std::min<int64_t>(VEC - misalign, D);
  }
  const int64_t packs = (D - head) / VEC;
  const int64_t per_chunk = ceil_div(packs, chunks);
  const int64_t begin = std::min(packs, chunk * per_chunk);
  const int64_t end = std::min(packs, begin + per_chunk);
  const P* pv = reinterpret_cast<const P*>(rv + head);
  const P* pu = reinterpret_cast<const P*>(ru + head);
  const P* pr = reinterpret_cast<const P*>(rr + head);

  double s_fm = 0.0;
  double s_w2 = 0.0;
  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t{kThreads} * kUnroll) {
    P a[kUnroll];
    P b[kUnroll];
    P c[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t i = base + int64_t{k} * kThreads;
      if (i < end) {
        a[k] = pv[i];
        b[k] = pu[i];
        c[k] = pr[i];
      }
    }
    acc_t f = 0;
    acc_t w = 0;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (base + int64_t{k} * kThreads < end) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc_t x = static_cast<acc_t>(a[k].val[e]);
          const acc_t d_fm = x - static_cast<acc_t>(b[k].val[e]);
          const acc_t d_w2 = x - static_cast<acc_t>(c[k].val[e]);
          f += d_fm * d_fm;
          w += d_w2 * d_w2;
        }
      }
    }
    s_fm += static_cast<double>(f);
    s_w2 += static_cast<double>(w);
  }
  if (chunk == 0) {
    const int64_t tail = head + packs * VEC;
    const int64_t scalars = head + (D - tail);
    for (int64_t j = threadIdx.x; j < scalars; j += kThreads) {
      const int64_t e = j < head ? j : tail + (j - head);
      const acc_t x = static_cast<acc_t>(rv[e]);
      const acc_t d_fm = x - static_cast<acc_t>(ru[e]);
      const acc_t d_w2 = x - static_cast<acc_t>(rr[e]);
      s_fm += static_cast<double>(d_fm * d_fm);
      s_w2 += static_cast<double>(d_w2 * d_w2);
    }
  }
  block_sum2<kThreads>(s_fm, s_w2, shared);
  if (threadIdx.x == 0) {
    part_fm[block] = s_fm;
    part_w2[block] = s_w2;
  }
}

// fm[row], w2[row] from the `chunks` partials of each row (a warp per row, fixed order), and
// the block's sum of weights[row] * fm[row] + alpha_row * w2[row] over its kFinalizeRowsPerBlock
// rows, alpha_row = alpha * w2_coef[row] (alpha when w2_coef is null): written to *loss (divided
// by B) when the grid is one block, else to block_terms.
template <typename W, typename out_t>
__global__ void __launch_bounds__(kFinalizeThreads) loss_finalize_rows_kernel(
    const double* __restrict__ part_fm, const double* __restrict__ part_w2, int64_t chunks,
    const W* __restrict__ weights, double alpha, const double* __restrict__ w2_coef, int64_t B, int64_t D,
    out_t* __restrict__ fm, out_t* __restrict__ w2, double* __restrict__ block_terms, out_t* __restrict__ loss) {
  __shared__ double shared[64];
  constexpr int kWarps = kFinalizeThreads / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kFinalizeRowsPerBlock;
  const int64_t row_end = std::min(B, row_begin + kFinalizeRowsPerBlock);
  double term = 0.0;
  for (int64_t row = row_begin + warp; row < row_end; row += kWarps) {
    double f = 0.0;
    double w = 0.0;
    for (int64_t c = lane; c < chunks; c += 32) {
      f += part_fm[row * chunks + c];
      w += part_w2[row * chunks + c];
    }
    f = warp_sum(f) / static_cast<double>(D);
    w = warp_sum(w) / static_cast<double>(D);
    if (lane == 0) {
      fm[row] = static_cast<out_t>(f);
      w2[row] = static_cast<out_t>(w);
      const double alpha_row = w2_coef == nullptr ? alpha : alpha * w2_coef[row];
      term += static_cast<double>(static_cast<at::opmath_type<W>>(weights[row])) * f + alpha_row * w;
    }
  }
  double unused = 0.0;
  block_sum2<kFinalizeThreads>(term, unused, shared);
  if (threadIdx.x == 0) {
    if (gridDim.x == 1) {
      *loss = static_cast<out_t>(term / static_cast<double>(B));
    } else {
      block_terms[blockIdx.x] = term;
    }
  }
}

// *loss = sum(block_terms[0:n]) / B, one block, fixed order.
template <typename out_t>
__global__ void __launch_bounds__(kFinalizeThreads) loss_finalize_total_kernel(const double* __restrict__ block_terms,
                                                                               int64_t n, int64_t B,
                                                                               out_t* __restrict__ loss) {
  __shared__ double shared[64];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kFinalizeThreads) {
    s += block_terms[i];
  }
  double unused = 0.0;
  block_sum2<kFinalizeThreads>(s, unused, shared);
  if (threadIdx.x == 0) {
    *loss = static_cast<out_t>(s / static_cast<double>(B));
  }
}

// v, u, v_ref: [B, ...] (same shape and dtype); weights: [B]; alpha >= 0; w2_weights: [B] or none.
// Returns (loss [], fm [B], w2 [B]) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> orw_cfm_w2_loss_cuda(const at::Tensor& v_in, const at::Tensor& u_in,
                                                                    const at::Tensor& v_ref_in,
                                                                    const at::Tensor& weights_in, double alpha,
                                                                    const std::optional<at::Tensor>& w2_weights_in) {
  check_loss_inputs(kLossOp, v_in, u_in, v_ref_in, weights_in, alpha, w2_weights_in);
  const c10::cuda::CUDAGuard guard(v_in.device());
  const at::Tensor v = v_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor v_ref = v_ref_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  // [B] float64 per-sample W2 coefficients (one small conversion on the stream, no sync), or none.
  const bool per_sample_w2 = w2_weights_in.has_value() && w2_weights_in->defined();
  const at::Tensor w2_coef = per_sample_w2 ? per_sample_coefficients(*w2_weights_in, at::kDouble) : at::Tensor();
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  const auto acc = accumulation_dtype(v.scalar_type());
  const auto opts = v.options().dtype(acc);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor fm = at::empty({B}, opts);
  at::Tensor w2 = at::empty({B}, opts);

  const c10::DeviceIndex device = v.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t sms = multiprocessor_count(device);
  int64_t chunks = 1;
  at::Tensor partials;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_loss_cuda", [&] {
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* pr = v_ref.const_data_ptr<scalar_t>();
    if (D <= kRowsKernelMaxD) {
      int G = 1;
      while (G < 32 && G * kMinTermsPerLane < D) {
        G *= 2;
      }
      partials = at::empty({2, B}, v.options().dtype(at::kDouble));
      double* part = partials.mutable_data_ptr<double>();
      const int64_t blocks = std::min(ceil_div(B * G, kThreads), sms * kBlocksPerSM);
      loss_partials_rows_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          pv, pu, pr, B, D, G, part, part + B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      constexpr int kVec = pack_size<scalar_t>();
      const auto addr = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
      const bool vectorize = (addr(pv) - addr(pu)) % kVecBytes == 0 && (addr(pv) - addr(pr)) % kVecBytes == 0;
      const int64_t vec = vectorize ? kVec : 1;
      // Enough chunks per row for one full-occupancy wave, each at least two packs per thread.
      const int64_t max_chunks = std::max<int64_t>(1, D / (int64_t{kThreads} * vec * 2));
      chunks = std::clamp<int64_t>(ceil_div(sms * kBlocksPerSM, B), 1, max_chunks);
      TORCH_CHECK(B * chunks <= INT32_MAX, kLossOp, ": too many samples (B = ", B, ") for one launch");
      partials = at::empty({2, B * chunks}, v.options().dtype(at::kDouble));
      double* part = partials.mutable_data_ptr<double>();
      const auto grid = static_cast<unsigned>(B * chunks);
      if (vectorize) {
        loss_partials_chunked_kernel<scalar_t, kVec>
            <<<grid, kThreads, 0, stream>>>(pv, pu, pr, D, chunks, part, part + B * chunks);
      } else {
        loss_partials_chunked_kernel<scalar_t, 1>
            <<<grid, kThreads, 0, stream>>>(pv, pu, pr, D, chunks, part, part + B * chunks);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });

  const double* part = partials.const_data_ptr<double>();
  const int64_t n_partials = B * chunks;
  const int64_t finalize_blocks = ceil_div(B, kFinalizeRowsPerBlock);
  TORCH_CHECK(finalize_blocks <= INT32_MAX, kLossOp, ": too many samples (B = ", B, ")");
  at::Tensor block_terms;
  if (finalize_blocks > 1) {
    block_terms = at::empty({finalize_blocks}, v.options().dtype(at::kDouble));
  }
  double* terms = finalize_blocks > 1 ? block_terms.mutable_data_ptr<double>() : nullptr;
  const double* coef = per_sample_w2 ? w2_coef.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "orw_cfm_w2_loss_cuda_finalize", [&] {
    const scalar_t* pw = weights.const_data_ptr<scalar_t>();
    const auto finalize = [&](auto* out) {
      using out_t = std::remove_pointer_t<decltype(out)>;
      loss_finalize_rows_kernel<scalar_t, out_t><<<static_cast<unsigned>(finalize_blocks), kFinalizeThreads, 0, stream>>>(
          part, part + n_partials, chunks, pw, alpha, coef, B, D, fm.mutable_data_ptr<out_t>(), w2.mutable_data_ptr<out_t>(),
          terms, loss.mutable_data_ptr<out_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (finalize_blocks > 1) {
        loss_finalize_total_kernel<out_t>
            <<<1, kFinalizeThreads, 0, stream>>>(terms, finalize_blocks, B, loss.mutable_data_ptr<out_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (acc == at::kDouble) {
      finalize(static_cast<double*>(nullptr));
    } else {
      finalize(static_cast<float*>(nullptr));
    }
  });
  return {loss, fm, w2};
}

// grad[p] pack by pack; row = p / packs_per_row.
template <typename T, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(const T* __restrict__ v, const T* __restrict__ u,
                                                                 const T* __restrict__ r,
                                                                 const at::opmath_type<T>* __restrict__ c_fm,
                                                                 const at::opmath_type<T>* __restrict__ c_w2,
                                                                 T* __restrict__ grad, index_t packs,
                                                                 at::cuda::detail::IntDivider<index_t> packs_per_row) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t p = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs; p += stride) {
    const index_t row = packs_per_row.div(p);
    const acc_t cf = c_fm[row];
    const acc_t cw = c_w2[row];
    const P a = reinterpret_cast<const P*>(v)[p];
    const P b = reinterpret_cast<const P*>(u)[p];
    const P c = reinterpret_cast<const P*>(r)[p];
    P out;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t x = static_cast<acc_t>(a.val[e]);
      out.val[e] = static_cast<T>(cf * (x - static_cast<acc_t>(b.val[e])) + cw * (x - static_cast<acc_t>(c.val[e])));
    }
    reinterpret_cast<P*>(grad)[p] = out;
  }
}

// v, u, v_ref: [B, ...]; c_fm, c_w2: [B]. Returns grad_v [B, ...] (contiguous, v's dtype).
at::Tensor orw_cfm_w2_loss_backward_cuda(const at::Tensor& v_in, const at::Tensor& u_in, const at::Tensor& v_ref_in,
                                         const at::Tensor& c_fm_in, const at::Tensor& c_w2_in) {
  check_loss_backward_inputs(kLossBackwardOp, v_in, u_in, v_ref_in, c_fm_in, c_w2_in);
  const c10::cuda::CUDAGuard guard(v_in.device());
  const at::Tensor v = v_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor v_ref = v_ref_in.contiguous();
  const auto acc = accumulation_dtype(v.scalar_type());
  const at::Tensor c_fm = per_sample_coefficients(c_fm_in, acc);
  const at::Tensor c_w2 = per_sample_coefficients(c_w2_in, acc);
  at::Tensor grad = at::empty(v.sizes(), v.options());
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  const c10::DeviceIndex device = v.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = pack_size<scalar_t>();
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* pr = v_ref.const_data_ptr<scalar_t>();
    scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
    const bool aligned = pack_aligned<scalar_t, kVec>(pv) && pack_aligned<scalar_t, kVec>(pu) &&
                         pack_aligned<scalar_t, kVec>(pr) && pack_aligned<scalar_t, kVec>(pg);
    dispatch_row_packs<scalar_t>(v.numel(), D, aligned, [&](auto vec, auto packs_per_row, auto packs) {
      constexpr int VEC = decltype(vec)::value;
      using index_t = decltype(packs);
      loss_backward_kernel<scalar_t, VEC, index_t><<<grid_for(packs, device), kThreads, 0, stream>>>(
          pv, pu, pr, c_fm.const_data_ptr<acc_t>(), c_w2.const_data_ptr<acc_t>(), pg, packs, packs_per_row);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace
}  // namespace orwcfm_fast::cuda

TORCH_LIBRARY_IMPL(orwcfm_fast, CUDA, m) {
  m.impl("orw_cfm_w2_loss", &orwcfm_fast::cuda::orw_cfm_w2_loss_cuda);
  m.impl("orw_cfm_w2_loss_backward", &orwcfm_fast::cuda::orw_cfm_w2_loss_backward_cuda);
}
