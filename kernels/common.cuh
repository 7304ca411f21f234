// Shared device helpers for the orwcfm_fast CUDA kernels.
//
// Headers are kept to c10/cuda (stream, guard, error checks) so the kernels build with a
// minimal CUDA toolkit (no cuBLAS/cuSPARSE headers needed, unlike ATen/cuda/CUDAContext.h).
// c10::cuda::getCurrentCUDAStream is the function behind at::cuda::getCurrentCUDAStream.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace orwcfm_fast::cuda {

constexpr int kThreads = 256;          // threads per block of the main kernels
constexpr int kBlocksPerSM = 2048 / kThreads;  // resident blocks per SM at full occupancy
constexpr int kVecBytes = 16;          // one 128-bit load per tensor per pack
constexpr unsigned kFullMask = 0xffffffffu;

// VEC consecutive elements moved with one vector load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T val[VEC];
};

// Elements per 16-byte pack: 4 float, 2 double, 8 half/bfloat16.
template <typename T>
constexpr int pack_size() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

// ptr can be read/written as Pack<T, VEC>.
template <typename T, int VEC>
inline bool pack_aligned(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (sizeof(T) * VEC) == 0;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of `device`, cached (no device sync; safe during graph capture).
inline int multiprocessor_count(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto index = static_cast<size_t>(device);
  if (cache.size() <= index) {
    cache.resize(index + 1, 0);
  }
  if (cache[index] == 0) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[index] = std::max(count, 1);
  }
  return cache[index];
}

// Blocks for a grid-stride loop over `items` work items (one per thread per iteration):
// enough to cover them, capped at one full-occupancy wave.
inline unsigned grid_for(int64_t items, c10::DeviceIndex device) {
  const int64_t needed = std::max<int64_t>(1, ceil_div(items, kThreads));
  return static_cast<unsigned>(std::min<int64_t>(needed, int64_t{multiprocessor_count(device)} * kBlocksPerSM));
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

// Sums a and b over the block (deterministic tree); the result is valid in thread 0.
// `shared` holds 2 * 32 doubles. Every thread of the block must call it.
template <int kBlockThreads>
__device__ __forceinline__ void block_sum2(double& a, double& b, double* shared) {
  static_assert(kBlockThreads % 32 == 0 && kBlockThreads <= 1024, "block must be whole warps");
  constexpr int kWarps = kBlockThreads / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    shared[warp] = a;
    shared[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? shared[lane] : 0.0;
    b = lane < kWarps ? shared[32 + lane] : 0.0;
    a = warp_sum(a);
    b = warp_sum(b);
  }
  __syncthreads();  // shared may be reused after return
}

}  // namespace orwcfm_fast::cuda

#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <climits>
#include <type_traits>

namespace orwcfm_fast::cuda {

// For elementwise kernels over contiguous [B, D] data with a per-row parameter: picks the
// pack width (16-byte packs when every pointer is aligned and rows hold whole packs, else
// scalars) and the index type (32-bit with a multiply-shift row divider when the packs fit,
// else 64-bit), then calls
//   launch(std::integral_constant<int, VEC>{}, IntDivider<index_t> packs_per_row, index_t packs).
// A pack never straddles two rows, so a thread computes its row once per pack.
template <typename T, typename Launch>
void dispatch_row_packs(int64_t numel, int64_t D, bool pointers_aligned, Launch&& launch) {
  using at::cuda::detail::IntDivider;
  constexpr int kVec = pack_size<T>();
  const auto run = [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int64_t packs = numel / VEC;
    const int64_t per_row = D / VEC;
    if (packs <= INT32_MAX) {
      launch(vec, IntDivider<uint32_t>(static_cast<uint32_t>(per_row)), static_cast<uint32_t>(packs));
    } else {
      launch(vec, IntDivider<uint64_t>(static_cast<uint64_t>(per_row)), static_cast<uint64_t>(packs));
    }
  };
  if (pointers_aligned && D % kVec == 0) {
    run(std::integral_constant<int, kVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

}  // namespace orwcfm_fast::cuda
