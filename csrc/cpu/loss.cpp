// CPU kernels of orw_cfm_w2_loss and orw_cfm_w2_loss_backward.
//
// Forward: one pass over v, u, v_ref computes both per-sample sums of squares. Each row
// is cut into fixed 256-element blocks summed in the accumulation type with 16
// independent lanes (16 terms each, then a pairwise lane sum); block sums are added in
// double. The float32 relative error is then ~ 20 ulps worst case, independent of D,
// and the result does not depend on the number of threads (the blocking is fixed).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace orwcfm_fast::cpu {
namespace {

constexpr const char* kLossOp = "orwcfm_fast::orw_cfm_w2_loss";
constexpr const char* kLossBackwardOp = "orwcfm_fast::orw_cfm_w2_loss_backward";

constexpr int64_t kBlock = 256;  // elements summed in the accumulation type
constexpr int kLanes = 16;       // independent partial sums per block
// Elements per parallel task. Fixed (a multiple of kBlock) so the summation order, and
// hence the result, is the same whatever the number of threads.
constexpr int64_t kSegment = 64 * kBlock;

// Adds sum((v - u)^2) and sum((v - r)^2) over n contiguous elements to fm and w2.
template <typename scalar_t>
void sum_squared_differences(const scalar_t* v, const scalar_t* u, const scalar_t* r, int64_t n, double& fm,
                             double& w2) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const scalar_t* bv = v + start;
    const scalar_t* bu = u + start;
    const scalar_t* br = r + start;
    acc_t a[kLanes] = {};
    acc_t b[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= m; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t x = static_cast<acc_t>(bv[j + l]);
        const acc_t d_fm = x - static_cast<acc_t>(bu[j + l]);
        const acc_t d_w2 = x - static_cast<acc_t>(br[j + l]);
        a[l] += d_fm * d_fm;
        b[l] += d_w2 * d_w2;
      }
    }
    for (int l = 0; j < m; ++j, ++l) {
      const acc_t x = static_cast<acc_t>(bv[j]);
      const acc_t d_fm = x - static_cast<acc_t>(bu[j]);
      const acc_t d_w2 = x - static_cast<acc_t>(br[j]);
      a[l] += d_fm * d_fm;
      b[l] += d_w2 * d_w2;
    }
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) {
        a[l] += a[l + width];
        b[l] += b[l + width];
      }
    }
    fm += static_cast<double>(a[0]);
    w2 += static_cast<double>(b[0]);
  }
}

// v, u, v_ref: [B, ...] (same shape and dtype); weights: [B]; alpha >= 0.
// Returns (loss [], fm [B], w2 [B]) in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> orw_cfm_w2_loss_cpu(const at::Tensor& v_in, const at::Tensor& u_in,
                                                                   const at::Tensor& v_ref_in,
                                                                   const at::Tensor& weights_in, double alpha) {
  check_loss_inputs(kLossOp, v_in, u_in, v_ref_in, weights_in, alpha);
  const at::Tensor v = v_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor v_ref = v_ref_in.contiguous();
  const at::Tensor weights = weights_in.to(at::kDouble).contiguous();
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  const auto opts = v.options().dtype(accumulation_dtype(v.scalar_type()));
  at::Tensor loss = at::empty({}, opts);
  at::Tensor fm = at::empty({B}, opts);
  at::Tensor w2 = at::empty({B}, opts);

  const int64_t segments = ceil_div(D, kSegment);
  std::vector<double> partial(static_cast<size_t>(2 * B * segments));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_loss_cpu", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* pr = v_ref.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrain / std::min(D, kSegment));
    at::parallel_for(0, B * segments, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / segments;
        const int64_t offset = (task - row * segments) * kSegment;
        const int64_t start = row * D + offset;
        double f = 0.0;
        double w = 0.0;
        sum_squared_differences(pv + start, pu + start, pr + start, std::min(kSegment, D - offset), f, w);
        partial[2 * task] = f;
        partial[2 * task + 1] = w;
      }
    });
    // [B] -> scalar: tiny and serial, so deterministic.
    const double* pw = weights.const_data_ptr<double>();
    out_t* pfm = fm.mutable_data_ptr<out_t>();
    out_t* pw2 = w2.mutable_data_ptr<out_t>();
    double total = 0.0;
    for (int64_t row = 0; row < B; ++row) {
      double f = 0.0;
      double w = 0.0;
      for (int64_t s = 0; s < segments; ++s) {
        f += partial[2 * (row * segments + s)];
        w += partial[2 * (row * segments + s) + 1];
      }
      f /= static_cast<double>(D);
      w /= static_cast<double>(D);
      pfm[row] = static_cast<out_t>(f);
      pw2[row] = static_cast<out_t>(w);
      total += pw[row] * f + alpha * w;
    }
    *loss.mutable_data_ptr<out_t>() = static_cast<out_t>(total / static_cast<double>(B));
  });
  return {loss, fm, w2};
}

// v, u, v_ref: [B, ...]; c_fm, c_w2: [B]. Returns grad_v [B, ...] (contiguous, v's dtype):
// c_fm[i] * (v[i] - u[i]) + c_w2[i] * (v[i] - v_ref[i]), computed in the accumulation type.
at::Tensor orw_cfm_w2_loss_backward_cpu(const at::Tensor& v_in, const at::Tensor& u_in, const at::Tensor& v_ref_in,
                                        const at::Tensor& c_fm_in, const at::Tensor& c_w2_in) {
  check_loss_backward_inputs(kLossBackwardOp, v_in, u_in, v_ref_in, c_fm_in, c_w2_in);
  const at::Tensor v = v_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor v_ref = v_ref_in.contiguous();
  const auto acc = accumulation_dtype(v.scalar_type());
  const at::Tensor c_fm = per_sample_coefficients(c_fm_in, acc);
  const at::Tensor c_w2 = per_sample_coefficients(c_w2_in, acc);
  at::Tensor grad = at::empty(v.sizes(), v.options());
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* pr = v_ref.const_data_ptr<scalar_t>();
    const acc_t* pcf = c_fm.const_data_ptr<acc_t>();
    const acc_t* pcw = c_w2.const_data_ptr<acc_t>();
    scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
    parallel_rows(B, D, [&](int64_t row, int64_t begin, int64_t end) {
      const acc_t cf = pcf[row];
      const acc_t cw = pcw[row];
      for (int64_t i = begin; i < end; ++i) {
        const acc_t x = static_cast<acc_t>(pv[i]);
        pg[i] = static_cast<scalar_t>(cf * (x - static_cast<acc_t>(pu[i])) + cw * (x - static_cast<acc_t>(pr[i])));
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace orwcfm_fast::cpu

TORCH_LIBRARY_IMPL(orwcfm_fast, CPU, m) {
  m.impl("orw_cfm_w2_loss", &orwcfm_fast::cpu::orw_cfm_w2_loss_cpu);
  m.impl("orw_cfm_w2_loss_backward", &orwcfm_fast::cpu::orw_cfm_w2_loss_backward_cpu);
}
