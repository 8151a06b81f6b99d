// Host emulation of the CUDA subset used by csrc/cuda/*.cu, so that the kernels can be checked on a
// machine without a GPU (see README.md). Force-included (g++ -include emu.h) into each .cu compiled
// as C++ with -DLINFT_CUDA_EMULATION; csrc/cuda/common.cuh then skips the CUDA runtime headers and
// the <<<>>> launch, and the launch / dynamic shared memory go through the hooks defined here.
//
// Model: a launch runs the blocks of the grid one after another; each block runs on `blockDim.x`
// host threads (one std::thread per CUDA thread, kept for the whole launch), __syncthreads is a
// std::barrier over those threads, __shared__ is `static` (one block at a time), atomicAdd takes a
// global mutex. Only the fp16 / bf16 types and their conversions come from the CUDA headers.
#pragma once
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

struct emu_uint3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local emu_uint3 threadIdx;
inline thread_local emu_uint3 blockIdx;
inline dim3 blockDim, gridDim;

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

namespace emu {
inline cudaError_t last_error = cudaSuccess;
inline std::barrier<>* bar = nullptr;
inline thread_local long sync_count = 0;
inline std::mutex atomic_mu;
inline unsigned char* dyn_smem = nullptr;
inline std::map<const void*, size_t> dyn_smem_limit;  // per kernel, set by cudaFuncSetAttribute
inline long launches = 0;
inline long blocks_run = 0;
constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr size_t kMaxDynSmem = 227 * 1024;  // sm_90 opt-in limit
}  // namespace emu

template <class F>
inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::kMaxDynSmem) return cudaErrorInvalidValue;
    emu::dyn_smem_limit[reinterpret_cast<const void*>(f)] = static_cast<size_t>(value);
  }
  return cudaSuccess;
}

inline void __syncthreads() {
  ++emu::sync_count;
  emu::bar->arrive_and_wait();
}

template <class T>
inline T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> g(emu::atomic_mu);
  T old = *p;
  *p = old + v;
  return old;
}

// Dynamic shared memory of the running block: exactly the launch's bytes (so that AddressSanitizer
// sees overruns), filled with 0xFF bytes (NaN for fp32 and fp64) so that reading it before writing
// shows up in the results.
#define LINFT_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dyn_smem

namespace emu {
template <class... KArgs>
struct Launcher {
  dim3 grid;
  dim3 block;
  size_t smem;
  void (*k)(KArgs...);

  template <class... Args>
  void operator()(Args... args) {
    ++launches;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
        grid.z > 65535 || block.x == 0 || block.x > 1024 || block.y != 1 || block.z != 1) {
      fprintf(stderr, "EMU: bad launch configuration grid (%u,%u,%u) block (%u,%u,%u)\n", grid.x,
              grid.y, grid.z, block.x, block.y, block.z);
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    size_t limit = kDefaultDynSmem;
    auto it = dyn_smem_limit.find(reinterpret_cast<const void*>(k));
    if (it != dyn_smem_limit.end()) limit = it->second;
    if (smem > limit) {
      fprintf(stderr, "EMU: %zu bytes of dynamic shared memory over the kernel's limit %zu\n", smem,
              limit);
      last_error = cudaErrorInvalidValue;
      return;
    }
    std::unique_ptr<unsigned char[]> buf(new unsigned char[smem ? smem : 1]);
    dyn_smem = buf.get();
    blockDim = block;
    gridDim = grid;
    const unsigned nt = block.x;
    std::vector<long> counts(nt);
    emu_uint3 at;  // the block that just finished
    // Between two blocks, run once by the last thread to arrive: every thread has finished the
    // block; check that they all passed the same number of __syncthreads and re-poison the
    // dynamic shared memory for the next block.
    auto between_blocks = [&]() noexcept {
      for (unsigned t = 1; t < nt; ++t)
        if (counts[t] != counts[0]) {
          fprintf(stderr, "EMU: divergent __syncthreads in block (%u,%u,%u): thread %u called it "
                  "%ld times, thread 0 %ld times\n", at.x, at.y, at.z, t, counts[t], counts[0]);
          std::abort();
        }
      std::fill(buf.get(), buf.get() + smem, 0xFF);
      ++blocks_run;
    };
    std::fill(buf.get(), buf.get() + smem, 0xFF);
    std::barrier<> sync_bar(nt);
    std::barrier<decltype(between_blocks)> block_bar(nt, between_blocks);
    bar = &sync_bar;
    std::vector<std::thread> th;
    th.reserve(nt);
    for (unsigned t = 0; t < nt; ++t) {
      th.emplace_back([&, t]() {
        threadIdx.x = t;
        for (unsigned bz = 0; bz < grid.z; ++bz)
          for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
              blockIdx.x = bx;
              blockIdx.y = by;
              blockIdx.z = bz;
              sync_count = 0;
              k(args...);
              counts[t] = sync_count;
              if (t == 0) at = blockIdx;
              block_bar.arrive_and_wait();
            }
      });
    }
    for (auto& x : th) x.join();
    bar = nullptr;
    dyn_smem = nullptr;
  }
};

template <class... KArgs>
Launcher<KArgs...> make(dim3 g, dim3 b, size_t smem, void (*k)(KArgs...)) {
  return Launcher<KArgs...>{g, b, smem, k};
}
}  // namespace emu

// LINFT_LAUNCH(grid, block, smem_bytes, stream, kernel<...>)(args...)
#define LINFT_LAUNCH(grid, block, smem, stream, ...) \
  ((void)(stream), ::emu::make(dim3(grid), dim3(block), (smem), &__VA_ARGS__))
