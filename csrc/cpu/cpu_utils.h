// Helpers shared by the CPU kernels in csrc/cpu.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace orwcfm_fast::cpu {

// Minimum elements per parallel task (ATen's at::internal::GRAIN_SIZE, which lives in the
// heavy TensorIterator.h): smaller inputs run serially.
constexpr int64_t kGrain = 32768;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls fn(row, begin, end) on runs [begin, end) of the flat index space [0, B * D) of
// contiguous [B, D] data, each run inside one row, in parallel chunks of >= kGrain elements.
// Lets elementwise kernels with a per-sample parameter load it once per run, not per element.
template <typename Fn>
void parallel_rows(int64_t B, int64_t D, const Fn& fn) {
  at::parallel_for(0, B * D, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t row = i / D;
      const int64_t stop = std::min(end, (row + 1) * D);
      fn(row, i, stop);
      i = stop;
    }
  });
}

}  // namespace orwcfm_fast::cpu
