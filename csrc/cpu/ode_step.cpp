// CPU kernel of ode_step: x + dt * sum_j coeffs[j] * ks[j] for any number of ks.
//
// Every element is accumulated in the accumulation type in the reference's order (x, then
// each k in turn, like its sequential add_) and rounded once into the output. Up to
// kMaxFused ks are combined in one fused pass, with the number of ks a compile-time constant
// (no intermediate stores). More ks (rare: Runge-Kutta stages of high-order methods) work on
// cache-resident chunks: the first kMaxFused are fused into an accumulation-type buffer, the
// next groups are added into it, and the last group rounds it into the output.
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
constexpr int kMaxFused = 4;      // ks per fused pass (RK4's update has 4)
constexpr int64_t kChunk = 1024;  // elements per accumulation buffer (4-8 KiB), > kMaxFused ks only

enum class From { kX, kBuffer };  // where the running sum starts
enum class To { kOut, kBuffer };  // where it goes

// For i < n: sum = (x[i] or buf[i]) + c0 k0[i] + ... + c_{NK-1} k_{NK-1}[i] in acc_t, in that
// order; stored into buf[i] (acc_t) or rounded into out[i]. buf may be read and written.
template <int NK, From kFrom, To kTo, typename scalar_t, typename acc_t>
void combine(const scalar_t* C10_RESTRICT x, acc_t* buf, const scalar_t* C10_RESTRICT k0,
             const scalar_t* C10_RESTRICT k1, const scalar_t* C10_RESTRICT k2, const scalar_t* C10_RESTRICT k3,
             acc_t c0, acc_t c1, acc_t c2, acc_t c3, scalar_t* C10_RESTRICT out, int64_t n) {
  static_assert(NK >= 0 && NK <= kMaxFused);
  for (int64_t i = 0; i < n; ++i) {
    acc_t sum;
    if constexpr (kFrom == From::kX) {
      sum = static_cast<acc_t>(x[i]);
    } else {
      sum = buf[i];
    }
    if constexpr (NK > 0) sum += c0 * static_cast<acc_t>(k0[i]);
    if constexpr (NK > 1) sum += c1 * static_cast<acc_t>(k1[i]);
    if constexpr (NK > 2) sum += c2 * static_cast<acc_t>(k2[i]);
    if constexpr (NK > 3) sum += c3 * static_cast<acc_t>(k3[i]);
    if constexpr (kTo == To::kOut) {
      out[i] = static_cast<scalar_t>(sum);
    } else {
      buf[i] = sum;
    }
  }
}

// combine<NK, ...> for a run-time nk in [0, kMaxFused], on ks[first, first + nk).
template <From kFrom, To kTo, typename scalar_t, typename acc_t>
void combine_group(int nk, const scalar_t* x, acc_t* buf, const scalar_t* const* ks, const acc_t* c, int64_t offset,
                   scalar_t* out, int64_t n) {
  const scalar_t* k[kMaxFused];
  acc_t s[kMaxFused];
  for (int j = 0; j < kMaxFused; ++j) {  // unused slots: any valid pointer, never read
    k[j] = j < nk ? ks[j] + offset : x;
    s[j] = j < nk ? c[j] : acc_t(0);
  }
  switch (nk) {
    case 0:
      combine<0, kFrom, kTo>(x, buf, k[0], k[1], k[2], k[3], s[0], s[1], s[2], s[3], out, n);
      break;
    case 1:
      combine<1, kFrom, kTo>(x, buf, k[0], k[1], k[2], k[3], s[0], s[1], s[2], s[3], out, n);
      break;
    case 2:
      combine<2, kFrom, kTo>(x, buf, k[0], k[1], k[2], k[3], s[0], s[1], s[2], s[3], out, n);
      break;
    case 3:
      combine<3, kFrom, kTo>(x, buf, k[0], k[1], k[2], k[3], s[0], s[1], s[2], s[3], out, n);
      break;
    default:
      combine<4, kFrom, kTo>(x, buf, k[0], k[1], k[2], k[3], s[0], s[1], s[2], s[3], out, n);
      break;
  }
}

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
  const int nk = static_cast<int>(ks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ode_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    std::vector<const scalar_t*> pk(static_cast<size_t>(nk));
    std::vector<acc_t> scale(static_cast<size_t>(nk));
    for (int j = 0; j < nk; ++j) {
      pk[j] = ks[j].const_data_ptr<scalar_t>();
      scale[j] = static_cast<acc_t>(dt * coeffs[j]);  // as the reference's add_(k, alpha=dt * c)
    }
    parallel_range(n, [&](int64_t begin, int64_t end) {
      if (nk <= kMaxFused) {
        combine_group<From::kX, To::kOut>(nk, px + begin, static_cast<acc_t*>(nullptr), pk.data(), scale.data(),
                                          begin, po + begin, end - begin);
        return;
      }
      acc_t buf[kChunk];
      for (int64_t start = begin; start < end; start += kChunk) {
        const int64_t m = std::min(kChunk, end - start);
        combine_group<From::kX, To::kBuffer>(kMaxFused, px + start, buf, pk.data(), scale.data(), start,
                                             po + start, m);
        int j = kMaxFused;
        for (; nk - j > kMaxFused; j += kMaxFused) {
          combine_group<From::kBuffer, To::kBuffer>(kMaxFused, px + start, buf, pk.data() + j, scale.data() + j,
                                                    start, po + start, m);
        }
        combine_group<From::kBuffer, To::kOut>(nk - j, px + start, buf, pk.data() + j, scale.data() + j, start,
                                               po + start, m);
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
