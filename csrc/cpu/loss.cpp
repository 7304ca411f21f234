// CPU kernels of orw_cfm_w2_loss and orw_cfm_w2_loss_backward.
//
// Forward: one pass over v, u, v_ref computes both per-sample sums of squares. Each row is
// cut into fixed 512-element blocks, each summed in the accumulation type by 4 independent
// vector accumulators per sum (4 x 8 float lanes with AVX2: each lane sums 16 terms), reduced
// pairwise in a fixed order, plus the block's last < 8 elements one by one; block sums are
// added in double. The float32 relative error is then < 30 ulps worst case, independent of
// D, and the result does not depend on the number of threads (the blocking is fixed, and
// parallel tasks are fixed segments of whole blocks, combined serially).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace orwcfm_fast::cpu {
namespace {

constexpr const char* kLossOp = "orwcfm_fast::orw_cfm_w2_loss";
constexpr const char* kLossBackwardOp = "orwcfm_fast::orw_cfm_w2_loss_backward";

constexpr int64_t kBlock = 512;  // elements summed in the accumulation type
// Elements per parallel task. Fixed (a multiple of kBlock) so the summation order, and
// hence the result, is the same whatever the number of threads.
constexpr int64_t kSegment = 16 * kBlock;

// Adds sum((v - u)^2) and sum((v - r)^2) over n contiguous elements to fm and w2.
template <typename scalar_t>
void sum_squared_differences(const scalar_t* C10_RESTRICT v, const scalar_t* C10_RESTRICT u,
                             const scalar_t* C10_RESTRICT r, int64_t n, double& fm, double& w2) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = vec_t<acc_t>;
  constexpr int64_t W = VecOf<acc_t>::kWidth;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const scalar_t* bv = v + start;
    const scalar_t* bu = u + start;
    const scalar_t* br = r + start;
    // Four accumulators per sum: enough independent FMA chains to hide their latency.
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    V b0 = {}, b1 = {}, b2 = {}, b3 = {};
    int64_t j = 0;
    for (; j + 4 * W <= m; j += 4 * W) {
      const V x0 = load_vec<acc_t>(bv + j);
      const V x1 = load_vec<acc_t>(bv + j + W);
      const V x2 = load_vec<acc_t>(bv + j + 2 * W);
      const V x3 = load_vec<acc_t>(bv + j + 3 * W);
      V d0 = x0 - load_vec<acc_t>(bu + j);
      V d1 = x1 - load_vec<acc_t>(bu + j + W);
      V d2 = x2 - load_vec<acc_t>(bu + j + 2 * W);
      V d3 = x3 - load_vec<acc_t>(bu + j + 3 * W);
      a0 += d0 * d0;
      a1 += d1 * d1;
      a2 += d2 * d2;
      a3 += d3 * d3;
      d0 = x0 - load_vec<acc_t>(br + j);
      d1 = x1 - load_vec<acc_t>(br + j + W);
      d2 = x2 - load_vec<acc_t>(br + j + 2 * W);
      d3 = x3 - load_vec<acc_t>(br + j + 3 * W);
      b0 += d0 * d0;
      b1 += d1 * d1;
      b2 += d2 * d2;
      b3 += d3 * d3;
    }
    for (; j + W <= m; j += W) {
      const V x = load_vec<acc_t>(bv + j);
      const V d_fm = x - load_vec<acc_t>(bu + j);
      const V d_w2 = x - load_vec<acc_t>(br + j);
      a0 += d_fm * d_fm;
      b0 += d_w2 * d_w2;
    }
    acc_t block_fm = 0;
    acc_t block_w2 = 0;
    if (m >= W) {
      block_fm = sum_lanes<acc_t>((a0 + a1) + (a2 + a3));
      block_w2 = sum_lanes<acc_t>((b0 + b1) + (b2 + b3));
    }
    for (; j < m; ++j) {  // the last < W elements (all of a row with D < W): scalar
      const acc_t x = static_cast<acc_t>(bv[j]);
      const acc_t d_fm = x - static_cast<acc_t>(bu[j]);
      const acc_t d_w2 = x - static_cast<acc_t>(br[j]);
      block_fm += d_fm * d_fm;
      block_w2 += d_w2 * d_w2;
    }
    fm += static_cast<double>(block_fm);
    w2 += static_cast<double>(block_w2);
  }
}

// v, u, v_ref: [B, ...] (same shape and dtype); weights: [B]; alpha >= 0; w2_weights: [B] or none.
// Returns (loss [], fm [B], w2 [B]) in the accumulation dtype; the loss's W2 term of sample i is
// alpha * w2_weights[i] * w2[i] (alpha * w2[i] without w2_weights: the same arithmetic as before).
std::tuple<at::Tensor, at::Tensor, at::Tensor> orw_cfm_w2_loss_cpu(const at::Tensor& v_in, const at::Tensor& u_in,
                                                                   const at::Tensor& v_ref_in,
                                                                   const at::Tensor& weights_in, double alpha,
                                                                   const std::optional<at::Tensor>& w2_weights_in) {
  check_loss_inputs(kLossOp, v_in, u_in, v_ref_in, weights_in, alpha, w2_weights_in);
  const at::Tensor v = v_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor v_ref = v_ref_in.contiguous();
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  const auto opts = v.options().dtype(accumulation_dtype(v.scalar_type()));
  at::Tensor loss = at::empty({}, opts);
  at::Tensor fm = at::empty({B}, opts);
  at::Tensor w2 = at::empty({B}, opts);

  const std::vector<double> weight = per_sample_values<double>(weights_in);
  const bool per_sample_w2 = w2_weights_in.has_value() && w2_weights_in->defined();
  // Empty without w2_weights: the scalar alpha path reads nothing more.
  const std::vector<double> w2_weight =
      per_sample_w2 ? per_sample_values<double>(*w2_weights_in) : std::vector<double>();
  const int64_t segments = ceil_div(D, kSegment);
  std::vector<double> partial(static_cast<size_t>(2 * B * segments));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_loss_cpu", [&] {
    using out_t = at::opmath_type<scalar_t>;
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* pr = v_ref.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrain / std::min(D, kSegment));
    at::parallel_for(0, B * segments, grain, [&](int64_t begin, int64_t end) {
      int64_t row = begin / segments;  // task = row * segments + segment
      int64_t segment = begin - row * segments;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t offset = segment * kSegment;
        const int64_t start = row * D + offset;
        double f = 0.0;
        double w = 0.0;
        sum_squared_differences(pv + start, pu + start, pr + start, std::min(kSegment, D - offset), f, w);
        partial[2 * task] = f;
        partial[2 * task + 1] = w;
        if (++segment == segments) {
          segment = 0;
          ++row;
        }
      }
    });
    // [B] -> scalar: tiny and serial, so deterministic.
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
      const double alpha_row = per_sample_w2 ? alpha * w2_weight[row] : alpha;
      total += weight[row] * f + alpha_row * w;
    }
    *loss.mutable_data_ptr<out_t>() = static_cast<out_t>(total / static_cast<double>(B));
  });
  return {loss, fm, w2};
}

// g[i] = cf * (v[i] - u[i]) + cw * (v[i] - r[i]) for i < n, in acc_t, rounded once.
template <typename scalar_t, typename acc_t>
void loss_grad_run(const scalar_t* C10_RESTRICT v, const scalar_t* C10_RESTRICT u, const scalar_t* C10_RESTRICT r,
                   acc_t cf, acc_t cw, scalar_t* C10_RESTRICT g, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(v[i]);
    g[i] = static_cast<scalar_t>(cf * (x - static_cast<acc_t>(u[i])) + cw * (x - static_cast<acc_t>(r[i])));
  }
}

// v, u, v_ref: [B, ...]; c_fm, c_w2: [B]. Returns grad_v [B, ...] (contiguous, v's dtype):
// c_fm[i] * (v[i] - u[i]) + c_w2[i] * (v[i] - v_ref[i]), computed in the accumulation type.
at::Tensor orw_cfm_w2_loss_backward_cpu(const at::Tensor& v_in, const at::Tensor& u_in, const at::Tensor& v_ref_in,
                                        const at::Tensor& c_fm_in, const at::Tensor& c_w2_in) {
  check_loss_backward_inputs(kLossBackwardOp, v_in, u_in, v_ref_in, c_fm_in, c_w2_in);
  const at::Tensor v = v_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor v_ref = v_ref_in.contiguous();
  at::Tensor grad = at::empty(v.sizes(), v.options());
  const int64_t B = v.size(0);
  const int64_t D = v.numel() / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "orw_cfm_w2_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* pr = v_ref.const_data_ptr<scalar_t>();
    const std::vector<acc_t> c_fm = per_sample_values<acc_t>(c_fm_in);  // rounded once, like .to(acc_t)
    const std::vector<acc_t> c_w2 = per_sample_values<acc_t>(c_w2_in);
    scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
    parallel_rows(B, D, [&](int64_t row, int64_t begin, int64_t end) {
      loss_grad_run(pv + begin, pu + begin, pr + begin, c_fm[row], c_w2[row], pg + begin, end - begin);
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
