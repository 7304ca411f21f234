// Helpers shared by the CPU kernels in csrc/cpu.
//
// Threads: at::parallel_for is a header template; with torch's OpenMP backend its parallel
// region only exists when the extension is compiled with -fopenmp (setup.py adds it),
// otherwise every kernel here runs on one thread.
//
// Vectorisation: the elementwise kernels are plain loops over restrict (C10_RESTRICT) pointers,
// which GCC and Clang vectorise to the target's width (AVX2 with -march=x86-64-v3). Reductions
// cannot be written that way without letting the compiler reorder the sum (-ffast-math), so
// they use the fixed-width vectors below, whose lane structure fixes the summation order.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace orwcfm_fast::cpu {

// Minimum elements per parallel task (ATen's at::internal::GRAIN_SIZE, which lives in the
// heavy TensorIterator.h): smaller inputs run serially, on the calling thread.
constexpr int64_t kGrain = 32768;
// Parallel ranges start at multiples of kTile elements, so each thread's run starts on a
// cache line (torch's allocations are 64-byte aligned) and no line is written by two threads.
constexpr int64_t kTile = 64;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls fn(begin, end) on ranges covering [0, n), in parallel when n > kGrain.
template <typename Fn>
void parallel_range(int64_t n, const Fn& fn) {
  at::parallel_for(0, ceil_div(n, kTile), kGrain / kTile, [&](int64_t tile_begin, int64_t tile_end) {
    fn(tile_begin * kTile, std::min(n, tile_end * kTile));
  });
}

// Calls fn(row, begin, end) on runs [begin, end) of the flat index space [0, B * D) of
// contiguous [B, D] data, each run inside one row, in parallel when B * D > kGrain.
// Lets elementwise kernels with a per-sample parameter load it once per run, not per element
// (one integer division per run, none per element).
template <typename Fn>
void parallel_rows(int64_t B, int64_t D, const Fn& fn) {
  parallel_range(B * D, [&](int64_t begin, int64_t end) {
    int64_t row = begin / D;
    int64_t i = begin;
    while (i < end) {
      const int64_t stop = std::min(end, (row + 1) * D);
      fn(row, i, stop);
      i = stop;
      ++row;
    }
  });
}

// The values of a [B] float tensor (any supported dtype, any stride) as T, each rounded once
// (as Tensor.to(T) would): per-sample parameters without a conversion op and its allocation.
template <typename T>
std::vector<T> per_sample_values(const at::Tensor& c) {
  const at::Tensor values = c.contiguous();
  const int64_t n = values.numel();
  std::vector<T> out(static_cast<size_t>(n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "per_sample_values", [&] {
    const scalar_t* p = values.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>(static_cast<double>(p[i]));  // exact widening, then one rounding
    }
  });
  return out;
}

// ---------------------------------------------------------------------------- fixed-width vectors
// A vector of the target's natural width (32 bytes with AVX, else 16) of float or double:
// element-wise + - * on whole vectors. With GCC and Clang it is a vector extension type, which
// the compiler maps to single SIMD instructions (a * b + c contracts to an FMA where the target
// has one); elsewhere an array with the same lane-wise arithmetic (same results, up to FMA
// contraction).
#if defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

#if (defined(__GNUC__) || defined(__clang__)) && !defined(ORWCFM_FAST_PORTABLE_VECTORS)
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int kWidth = kVecBytes / static_cast<int>(sizeof(T));
};
#else
template <typename T>
struct VecOf {
  static constexpr int kWidth = kVecBytes / static_cast<int>(sizeof(T));
  struct type {
    T lane[kWidth];  // trivial (memcpy-able); `type v = {}` zero-fills
    friend type operator+(type a, const type& b) { for (int l = 0; l < kWidth; ++l) a.lane[l] += b.lane[l]; return a; }
    friend type operator-(type a, const type& b) { for (int l = 0; l < kWidth; ++l) a.lane[l] -= b.lane[l]; return a; }
    friend type operator*(type a, const type& b) { for (int l = 0; l < kWidth; ++l) a.lane[l] *= b.lane[l]; return a; }
    type& operator+=(const type& b) { return *this = *this + b; }
  };
};
#endif
template <typename T>
using vec_t = typename VecOf<T>::type;

// kWidth elements of `p` (any alignment), converted to acc_t (float or double).
template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE vec_t<acc_t> load_vec(const scalar_t* p) {
  vec_t<acc_t> r;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&r, p, sizeof(r));
  } else {
    acc_t lanes[VecOf<acc_t>::kWidth];
    for (int l = 0; l < VecOf<acc_t>::kWidth; ++l) {
      lanes[l] = static_cast<acc_t>(p[l]);
    }
    std::memcpy(&r, lanes, sizeof(r));
  }
  return r;
}

// Sum of the lanes, pairwise: (l0 + l_{W/2}) + ... in a fixed order.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t sum_lanes(vec_t<acc_t> v) {
  acc_t lanes[VecOf<acc_t>::kWidth];
  std::memcpy(lanes, &v, sizeof(lanes));
  for (int width = VecOf<acc_t>::kWidth / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
    }
  }
  return lanes[0];
}

}  // namespace orwcfm_fast::cpu
