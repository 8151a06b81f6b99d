// Host emulation of the CUDA subset used by csrc/cuda/*.cu, so that the kernels can be checked on a
// machine without a GPU (see README.md). Force-included (g++ -include emu.h) into each .cu compiled
// as C++ with -DLINFT_CUDA_EMULATION; csrc/cuda/common.cuh then skips the CUDA runtime headers and
// the <<<>>> launch, and the launch / dynamic shared memory go through the hooks defined here.
//
// Model: a launch runs the blocks of the grid one after another; each block runs on `blockDim.x`
// host threads (one std::thread per CUDA thread, kept for the whole launch), __syncthreads is a
// barrier over those threads (emu::Barrier; a watchdog aborts a launch stuck at barriers),
// __shared__ is `static` (one block at a time), atomicAdd takes a global mutex. Warp-level
// operations (ldmatrix, mma.sync, see csrc/cuda/mma.cuh) exchange fragments through a per-warp
// scratch area and a per-warp barrier of its 32 threads; cp.async copies are queued per thread and
// done at cp.async.wait_group, wgmma (csrc/cuda/wgmma.cuh) likewise at wgmma.wait_group, each thread
// reading its fragment's operands through the descriptors. Only the fp16 / bf16 types and their
// conversions come from the CUDA headers.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
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
// Seconds every thread of a launch may sit at a barrier with none passing before the launch is
// called hung (a barrier some thread never reaches: a __syncthreads or warp operation behind a
// divergent branch, or a thread that left the block early; undefined behaviour on a GPU, where it
// often hangs). All threads waiting and no barrier completing cannot resolve, so the wait is short;
// LINFT_CUDA_EMU_HANG_S overrides it.
inline double hang_seconds() {
  static const double s = [] {
    const char* e = std::getenv("LINFT_CUDA_EMU_HANG_S");
    return e && std::atof(e) > 0 ? std::atof(e) : 10.0;
  }();
  return s;
}

inline std::atomic<long> barrier_phases{0};  // completed phases of every barrier: the watchdog's progress

struct NoCompletion {
  void operator()() noexcept {}
};

// A std::barrier that counts the threads waiting at it and its completed phases, for the watchdog
// of Launcher (which names the barriers threads are stuck at).
template <class Completion = NoCompletion>
class Barrier {
 public:
  Barrier(unsigned count, std::string what, Completion completion = {})
      : bar_(count, Phase{std::move(completion)}), count_(count), what_(std::move(what)) {}
  void arrive_and_wait() {
    waiting_.fetch_add(1, std::memory_order_relaxed);
    bar_.arrive_and_wait();
    waiting_.fetch_sub(1, std::memory_order_relaxed);
  }
  int waiting() const { return waiting_.load(std::memory_order_relaxed); }
  // "what: k of n threads waiting", or "" when none waits.
  std::string waiters() const {
    const int k = waiting();
    return k ? what_ + ": " + std::to_string(k) + " of " + std::to_string(count_) + " threads waiting"
             : std::string();
  }

 private:
  struct Phase {  // runs once per phase, before any thread is released
    Completion completion;
    void operator()() noexcept {
      barrier_phases.fetch_add(1, std::memory_order_relaxed);
      completion();
    }
  };
  std::barrier<Phase> bar_;
  const unsigned count_;
  const std::string what_;
  std::atomic<int> waiting_{0};
};

inline cudaError_t last_error = cudaSuccess;
inline Barrier<>* bar = nullptr;
inline thread_local long sync_count = 0;
inline std::mutex atomic_mu;
inline unsigned char* dyn_smem = nullptr;
inline std::map<const void*, size_t> dyn_smem_limit;  // per kernel, set by cudaFuncSetAttribute
inline long launches = 0;
struct LaunchRecord {
  dim3 grid, block;
  size_t smem;
};
inline std::vector<LaunchRecord> launch_log;  // every launch (valid or not), for the driver
inline long blocks_run = 0;
constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr size_t kMaxDynSmem = 227 * 1024;  // sm_90 opt-in limit

// Emulated devices (cudaGetDevice / cudaDeviceGetAttribute in emu_rt.cpp): `device` is the current
// one; device 0 is compute capability 9.0 (wgmma: the kernels' sm_90a code is what it runs), device
// 1 is 7.5 (no cp.async, no bf16 mma), device 2 is 8.0 (mma.sync, no wgmma).
inline int device = 0;
constexpr int kDevices = 3;
constexpr int kDeviceCcMajor[kDevices] = {9, 7, 8};
inline long live_allocs = 0;  // cudaMallocAsync minus cudaFreeAsync
inline std::vector<size_t> alloc_log;  // bytes of every cudaMallocAsync, for the driver

// ---------------------------------------------------------------- shared window
// The running block's dynamic shared memory sits kDynSmemOffset bytes into a 1024-byte aligned
// "shared window" (as after some static shared memory on a GPU, where the dynamic part is only
// 16-byte aligned): a kernel that needs 1024-byte alignment (the 128-byte swizzle of wgmma
// operands) has to align it itself. smem_u32 is __cvta_generic_to_shared: offsets into the window.
constexpr size_t kSmemWindowAlign = 1024;
constexpr size_t kDynSmemOffset = 48;
inline unsigned char* smem_window = nullptr;
inline size_t smem_window_bytes = 0;

// Bytes of the window written by cp.async copies that landed (generic proxy) and whose writing thread
// has not run fence.proxy.async since: wgmma (async proxy) must not read them (csrc/cuda/wgmma.cuh).
inline std::vector<unsigned char> smem_unfenced;
inline thread_local std::vector<size_t> cp_landed_unfenced;  // window offsets of this thread's copies

// Bytes of the window that issued cp.async copies will write and that have not landed yet (a count
// per byte): reading them is a race on a GPU, where a copy lands any time before its wait (here it
// lands at the wait), so ldmatrix and wgmma abort when they read them.
inline std::vector<unsigned char> smem_inflight;

// Offset of p in the window, or -1 when p is elsewhere (static __shared__ or global memory).
inline long window_offset(const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (smem_window == nullptr || c < smem_window || c + n > smem_window + smem_window_bytes) return -1;
  return static_cast<long>(c - smem_window);
}

inline void check_landed(const void* p, size_t n, const char* reader) {
  const long off = window_offset(p, n);
  if (off < 0) return;
  for (size_t i = 0; i < n; ++i)
    if (smem_inflight[off + i]) {
      fprintf(stderr, "EMU: %s (thread %u) reads shared byte %ld, which a cp.async still in flight "
              "will write (not yet waited for: a race)\n", reader, threadIdx.x, off + static_cast<long>(i));
      std::abort();
    }
}

inline uint32_t smem_u32(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (smem_window == nullptr || c < smem_window || c > smem_window + smem_window_bytes) {
    fprintf(stderr, "EMU: %p is not in the block's dynamic shared memory\n", p);
    std::abort();
  }
  return static_cast<uint32_t>(c - smem_window);
}

// ---------------------------------------------------------------- warps
// Lane threadIdx.x % 32 of warp threadIdx.x / 32. A warp operation deposits this lane's operands in
// the warp's scratch, waits at the warp barrier, then computes this lane's result from every lane's
// operands. Scratch is double-buffered by the parity of the warp's operation count: a lane can only
// write buffer p again after the next operation's barrier, which all lanes reach after reading p.
constexpr int kWarp = 32;
struct Warp {
  std::unique_ptr<Barrier<>> bar;
  const void* ptr[2][kWarp];
  uint32_t a[2][kWarp][4];
  uint32_t b[2][kWarp][2];
};
inline Warp* warps = nullptr;              // the running block's warps
inline thread_local long warp_ops = 0;     // warp operations of this thread in this block

inline unsigned lane_id() { return threadIdx.x % kWarp; }
inline Warp& my_warp() { return warps[threadIdx.x / kWarp]; }
// Returns the scratch buffer index of this operation after the lane deposited its operands in it
// (deposit(buf) runs before the barrier).
template <class F>
inline int warp_exchange(F&& deposit) {
  const int buf = static_cast<int>(warp_ops & 1);
  ++warp_ops;
  deposit(buf);
  my_warp().bar->arrive_and_wait();
  return buf;
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l supplies row l % 8 of matrix l / 8; register m
// of lane l receives 16-bit elements 2(l % 4), 2(l % 4) + 1 of row l / 4 of matrix m.
// With trans (ldmatrix...trans), register m of lane l receives elements (row 2(l % 4), column l / 4)
// and (row 2(l % 4) + 1, column l / 4) of matrix m instead.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans = false) {
  if (reinterpret_cast<std::uintptr_t>(row_addr) % 16 != 0) {
    fprintf(stderr, "EMU: ldmatrix row address %p is not 16-byte aligned\n", row_addr);
    std::abort();
  }
  check_landed(row_addr, 16, "ldmatrix");
  Warp& w = my_warp();
  const unsigned l = lane_id();
  const int buf = warp_exchange([&](int p) { w.ptr[p][l] = row_addr; });
  for (int m = 0; m < 4; ++m) {
    if (!trans) {
      memcpy(&r[m], static_cast<const unsigned char*>(w.ptr[buf][m * 8 + l / 4]) + (l % 4) * 4, 4);
      continue;
    }
    uint16_t lo, hi;
    memcpy(&lo, static_cast<const unsigned char*>(w.ptr[buf][m * 8 + 2 * (l % 4)]) + (l / 4) * 2, 2);
    memcpy(&hi, static_cast<const unsigned char*>(w.ptr[buf][m * 8 + 2 * (l % 4) + 1]) + (l / 4) * 2, 2);
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

inline float half_bits_to_float(uint32_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  __half_raw r;
  r.x = static_cast<unsigned short>(bits);
  return __half2float(__half(r));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, c += A B, with the per-lane
// fragments of csrc/cuda/mma.cuh (g = lane / 4, t = lane % 4):
//   A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2
//   B[k][n]:   lane n * 4 + (k % 8) / 2,         register k / 8,                half k % 2
//   C[g + 8 (q / 2)][2t + q % 2] = c[q]
// The products are exact in fp32; they are added to c one by one in fp32 (the tensor cores'
// internal order and precision are unspecified; sequential fp32 is the pessimistic model).
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  Warp& w = my_warp();
  const unsigned l = lane_id();
  const int buf = warp_exchange([&](int p) {
    for (int i = 0; i < 4; ++i) w.a[p][l][i] = a[i];
    for (int i = 0; i < 2; ++i) w.b[p][l][i] = b[i];
  });
  const unsigned g = l / 4, t = l % 4;
  for (int q = 0; q < 4; ++q) {
    const unsigned row = g + 8 * (q / 2), col = 2 * t + q % 2;
    float d = c[q];
    for (unsigned k = 0; k < 16; ++k) {
      const uint32_t ra = w.a[buf][(row % 8) * 4 + (k % 8) / 2][(row / 8) + 2 * (k / 8)];
      const uint32_t rb = w.b[buf][col * 4 + (k % 8) / 2][k / 8];
      const float x = half_bits_to_float((ra >> (16 * (k % 2))) & 0xFFFF, bf16);
      const float y = half_bits_to_float((rb >> (16 * (k % 2))) & 0xFFFF, bf16);
      d += x * y;
    }
    c[q] = d;
  }
}

// ---------------------------------------------------------------- asynchronous operations
// The per-thread queue behind cp.async and wgmma: operations issued since the last commit_group, and
// the committed groups still in flight, carried out oldest first by wait_group.
template <class Op>
struct AsyncGroups {
  std::vector<Op> open;                      // not committed yet
  std::deque<std::vector<Op>> committed;     // committed, in flight
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  // Carries out (run(op)) the oldest groups until at most `pending` are in flight.
  template <class Run>
  void wait(int pending, Run&& run) {
    while (static_cast<int>(committed.size()) > pending) {
      for (const Op& op : committed.front()) run(op);
      committed.pop_front();
    }
  }
  // Drops everything issued and not waited for (the thread leaves the block); returns how much.
  size_t discard() {
    size_t n = open.size();
    for (const auto& g : committed) n += g.size();
    open.clear();
    committed.clear();
    return n;
  }
};

// ---------------------------------------------------------------- cp.async
// Copies are queued per thread and carried out at cp.async.wait_group (a copy that is never waited
// for never lands, so a missing wait shows as stale or 0xFF-poisoned shared memory).
struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;
};
inline thread_local AsyncGroups<AsyncCopy> cp_queue;

inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<std::uintptr_t>(dst) % 16 || reinterpret_cast<std::uintptr_t>(src) % 16 ||
      src_bytes < 0 || src_bytes > 16) {
    fprintf(stderr, "EMU: cp.async dst %p src %p src-size %d: misaligned or bad size\n", dst, src,
            src_bytes);
    std::abort();
  }
  cp_queue.open.push_back({dst, src, src_bytes});
  const long off = window_offset(dst, 16);
  if (off >= 0)
    for (int i = 0; i < 16; ++i) ++smem_inflight[off + i];
}
inline void cp_async_commit() { cp_queue.commit(); }
inline void cp_async_wait(int pending) {
  cp_queue.wait(pending, [](const AsyncCopy& c) {
    if (c.src_bytes) memcpy(c.dst, c.src, c.src_bytes);
    memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
    const long off = window_offset(c.dst, 16);
    if (off >= 0) {
      for (int i = 0; i < 16; ++i) --smem_inflight[off + i];
      std::fill(smem_unfenced.begin() + off, smem_unfenced.begin() + off + 16, 1);
      cp_landed_unfenced.push_back(static_cast<size_t>(off));
    }
  });
}
// Copies issued but never waited for when the thread leaves the block.
inline size_t cp_async_left() {
  cp_landed_unfenced.clear();
  return cp_queue.discard();
}

// ---------------------------------------------------------------- warpgroups (wgmma, sm_90a)
// wgmma.mma_async is queued per thread, closed into a batch by wgmma.commit_group and carried out at
// wgmma.wait_group from shared memory as it is then (like cp.async), so overwriting the operands or
// reading the accumulators before the wait shows in the results. Each thread computes its own
// accumulator fragment (csrc/cuda/wgmma.cuh) straight from the descriptors; the four warps of a
// warpgroup must issue the same number of wgmma operations (checked between blocks), with the same
// descriptors (the A descriptor per warpgroup). The operands a thread reads are hashed at issue and
// again at the wait: data that changes in between (a stage refilled too early, or copies that had
// not landed when the MMA was issued) aborts, as do reads of bytes that cp.async wrote with no
// fence.proxy.async by their writer since. Stricter than the PTX ISA: every batch must start with
// wgmma.fence. Only cp.async writes are tracked for the proxy fence (plain stores are not).
constexpr int kWarpgroup = 128;
struct WgmmaOp {
  float* d;
  int n;
  uint64_t da, db;
  bool bf16;
  uint64_t hash;  // of the operand elements this thread reads, at issue
};
inline std::mutex wg_desc_mu;
inline std::map<std::pair<unsigned, long>, std::pair<uint64_t, uint64_t>> wg_desc;  // (warpgroup, op) -> descriptors
inline thread_local AsyncGroups<WgmmaOp> wg_queue;
inline thread_local bool wg_fenced = false;
inline thread_local long wg_ops = 0;  // wgmma fence/mma/commit/wait of this thread in this block

[[noreturn]] inline void wg_fail(const char* what, uint64_t desc) {
  fprintf(stderr, "EMU: wgmma descriptor %#llx (thread %u): %s\n", static_cast<unsigned long long>(desc),
          threadIdx.x, what);
  std::abort();
}

// The 16-bit element (row, k) of an operand whose descriptor is desc: K-major, 128-byte swizzle.
inline uint32_t wg_element(uint64_t desc, int row, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  uint32_t addr = start + static_cast<uint32_t>(row / 8) * sbo + static_cast<uint32_t>(row % 8) * 128 +
                  static_cast<uint32_t>(k) * 2;
  addr ^= ((addr >> 7) & 7) << 4;
  if (addr + 2 > smem_window_bytes) wg_fail("reads past the block's dynamic shared memory", desc);
  check_landed(smem_window + addr, 2, "wgmma");
  if (smem_unfenced[addr] || smem_unfenced[addr + 1]) {
    fprintf(stderr, "EMU: wgmma (thread %u) reads shared byte %u, written by cp.async with no "
            "fence.proxy.async by its writer since\n", threadIdx.x, addr);
    std::abort();
  }
  uint16_t v;
  memcpy(&v, smem_window + addr, 2);
  return v;
}

// This thread's fragment reads rows 16 w + g and 16 w + g + 8 of A and rows 8 j + 2 t, 8 j + 2 t + 1
// of B (csrc/cuda/wgmma.cuh): a hash of those elements.
inline uint64_t wg_operand_hash(const WgmmaOp& op) {
  const unsigned i = threadIdx.x % kWarpgroup, w = i / kWarp, l = i % kWarp;
  const unsigned g = l / 4, t = l % 4;
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint32_t v) { h = (h ^ v) * 1099511628211ull; };
  for (int k = 0; k < 16; ++k) {
    mix(wg_element(op.da, static_cast<int>(16 * w + g), k));
    mix(wg_element(op.da, static_cast<int>(16 * w + g + 8), k));
    for (int j = 0; j < op.n / 8; ++j) {
      mix(wg_element(op.db, static_cast<int>(8 * j + 2 * t), k));
      mix(wg_element(op.db, static_cast<int>(8 * j + 2 * t + 1), k));
    }
  }
  return h;
}

inline void fence_proxy_async() {
  for (size_t off : cp_landed_unfenced) std::fill(smem_unfenced.begin() + off, smem_unfenced.begin() + off + 16, 0);
  cp_landed_unfenced.clear();
}

inline void wgmma_fence() {
  ++wg_ops;
  wg_fenced = true;
}

// wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{bf16,f16}.{bf16,f16}, d += A B^T, scale-d 1, both
// operands K-major (transpose flags 0) in shared memory.
inline void wgmma_m64nNk16(float* d, int n, uint64_t da, uint64_t db, bool bf16) {
  ++wg_ops;
  if (!wg_fenced) {
    fprintf(stderr, "EMU: wgmma.mma_async without a wgmma.fence before its batch (thread %u)\n",
            threadIdx.x);
    std::abort();
  }
  for (uint64_t desc : {da, db}) {
    if ((desc >> 62) != 1) wg_fail("only the 128-byte swizzle layout is emulated", desc);
    if (((desc >> 49) & 7) != 0) wg_fail("only base offset 0 is emulated", desc);
  }
  {  // every thread of the warpgroup passes the same descriptors to its n-th operation
    std::lock_guard<std::mutex> lock(wg_desc_mu);
    const auto key = std::make_pair(threadIdx.x / kWarpgroup, wg_ops);
    auto [it, first] = wg_desc.try_emplace(key, da, db);
    if (!first && it->second != std::make_pair(da, db)) {
      fprintf(stderr, "EMU: wgmma descriptors differ within warpgroup %u (thread %u: %#llx %#llx, "
              "another thread: %#llx %#llx)\n", threadIdx.x / kWarpgroup, threadIdx.x,
              static_cast<unsigned long long>(da), static_cast<unsigned long long>(db),
              static_cast<unsigned long long>(it->second.first),
              static_cast<unsigned long long>(it->second.second));
      std::abort();
    }
  }
  WgmmaOp op{d, n, da, db, bf16, 0};
  op.hash = wg_operand_hash(op);
  wg_queue.open.push_back(op);
}

inline void wgmma_commit() {
  ++wg_ops;
  wg_queue.commit();
  wg_fenced = false;
}

inline void wgmma_run(const WgmmaOp& op) {
  if (wg_operand_hash(op) != op.hash) {
    fprintf(stderr, "EMU: the shared memory a wgmma (thread %u) reads changed between its issue and "
            "its wgmma.wait_group\n", threadIdx.x);
    std::abort();
  }
  const unsigned i = threadIdx.x % kWarpgroup, w = i / kWarp, l = i % kWarp;
  const unsigned g = l / 4, t = l % 4;
  for (int j = 0; j < op.n / 8; ++j)
    for (int q = 0; q < 4; ++q) {
      const int row = static_cast<int>(16 * w + g + 8 * (q / 2)), col = 8 * j + 2 * t + q % 2;
      float acc = op.d[4 * j + q];
      for (int k = 0; k < 16; ++k)
        acc += half_bits_to_float(wg_element(op.da, row, k), op.bf16) *
               half_bits_to_float(wg_element(op.db, col, k), op.bf16);
      op.d[4 * j + q] = acc;
    }
}

inline void wgmma_wait(int pending) {
  ++wg_ops;
  wg_queue.wait(pending, wgmma_run);
}

// wgmma operations issued but never waited for when the thread leaves the block.
inline size_t wgmma_left() {
  wg_fenced = false;
  return wg_queue.discard();
}
}  // namespace emu

template <class F>
inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::kMaxDynSmem) return cudaErrorInvalidValue;
    emu::dyn_smem_limit[reinterpret_cast<const void*>(f)] = static_cast<size_t>(value);
  }
  return cudaSuccess;
}

// Every kernel's loaded code is the device's own architecture (sm_90 on device 0, sm_80 on device
// 2), and absent (no sm_75 code) on device 1.
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F*) {
  if (emu::kDeviceCcMajor[emu::device] < 8) return cudaErrorInvalidDeviceFunction;
  *attr = cudaFuncAttributes{};
  attr->binaryVersion = attr->ptxVersion = 10 * emu::kDeviceCcMajor[emu::device];
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

// __shfl_sync / __shfl_xor_sync on 32-bit values, as warp operations (every lane must take part: only
// the full mask is accepted). Lane l receives var of lane src (or of lane l ^ lane_mask).
template <class T>
inline T emu_shfl(unsigned mask, T var, unsigned src_of_lane_xor, bool is_xor) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xFFFFFFFFu) {
    fprintf(stderr, "EMU: shuffle with a partial mask %#x (only full warps are emulated)\n", mask);
    std::abort();
  }
  emu::Warp& w = emu::my_warp();
  const unsigned l = emu::lane_id();
  const int buf = emu::warp_exchange([&](int p) { memcpy(&w.a[p][l][0], &var, 4); });
  T r;
  memcpy(&r, &w.a[buf][(is_xor ? l ^ src_of_lane_xor : src_of_lane_xor) % emu::kWarp][0], 4);
  return r;
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane) { return emu_shfl(mask, var, src_lane, false); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask) { return emu_shfl(mask, var, lane_mask, true); }

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
    launch_log.push_back({grid, block, smem});
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
    // The shared window: kDynSmemOffset bytes, then exactly the launch's dynamic shared memory (so
    // that AddressSanitizer sees overruns past it).
    struct WindowFree {
      void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(kSmemWindowAlign)); }
    };
    smem_window_bytes = kDynSmemOffset + smem;
    std::unique_ptr<unsigned char[], WindowFree> window(static_cast<unsigned char*>(
        ::operator new[](smem_window_bytes, std::align_val_t(kSmemWindowAlign))));
    smem_window = window.get();
    dyn_smem = smem_window + kDynSmemOffset;
    smem_unfenced.assign(smem_window_bytes, 0);
    smem_inflight.assign(smem_window_bytes, 0);
    wg_desc.clear();
    blockDim = block;
    gridDim = grid;
    const unsigned nt = block.x;
    std::vector<long> counts(nt), wcounts(nt), wgcounts(nt);
    std::vector<size_t> cp_left(nt), wg_left(nt);
    const unsigned nw = (nt + kWarp - 1) / kWarp;
    std::unique_ptr<Warp[]> warp_state(new Warp[nw]);
    for (unsigned w = 0; w < nw; ++w)
      warp_state[w].bar = std::make_unique<Barrier<>>(std::min<unsigned>(kWarp, nt - w * kWarp),
                                                    "a warp operation of warp " + std::to_string(w));
    warps = warp_state.get();
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
      for (unsigned t = 0; t < nt; ++t) {
        if (wcounts[t] != wcounts[t - t % kWarp]) {
          fprintf(stderr, "EMU: divergent warp operations in block (%u,%u,%u): thread %u did %ld, "
                  "lane 0 of its warp %ld\n", at.x, at.y, at.z, t, wcounts[t], wcounts[t - t % kWarp]);
          std::abort();
        }
        if (cp_left[t]) {
          fprintf(stderr, "EMU: thread %u of block (%u,%u,%u) left %zu cp.async copies never waited "
                  "for\n", t, at.x, at.y, at.z, cp_left[t]);
          std::abort();
        }
        if (wgcounts[t] != wgcounts[t - t % kWarpgroup]) {
          fprintf(stderr, "EMU: divergent wgmma operations in block (%u,%u,%u): thread %u did %ld, "
                  "thread %u of its warpgroup %ld\n", at.x, at.y, at.z, t, wgcounts[t],
                  t - t % kWarpgroup, wgcounts[t - t % kWarpgroup]);
          std::abort();
        }
        if (wg_left[t]) {
          fprintf(stderr, "EMU: thread %u of block (%u,%u,%u) left %zu wgmma operations never "
                  "waited for\n", t, at.x, at.y, at.z, wg_left[t]);
          std::abort();
        }
      }
      std::fill(smem_window, smem_window + smem_window_bytes, 0xFF);
      std::fill(smem_unfenced.begin(), smem_unfenced.end(), 0);
      std::fill(smem_inflight.begin(), smem_inflight.end(), 0);
      wg_desc.clear();
      ++blocks_run;
    };
    std::fill(smem_window, smem_window + smem_window_bytes, 0xFF);
    Barrier<> sync_bar(nt, "__syncthreads");
    Barrier<decltype(between_blocks)> block_bar(nt, "the end of a block", between_blocks);
    bar = &sync_bar;
    // The watchdog: aborts when every thread has waited at some barrier, with no barrier completing,
    // for hang_seconds() (nothing can release them: a real deadlock, not a slow phase).
    std::atomic<unsigned> running[3] = {0, 0, 0};  // the block being run (thread 0 sets it)
    std::mutex done_mu;
    std::condition_variable done_cv;
    bool done = false;
    std::thread watchdog([&] {
      using clock = std::chrono::steady_clock;
      long seen = barrier_phases.load();
      auto since = clock::now();
      std::unique_lock<std::mutex> lock(done_mu);
      while (!done_cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return done; })) {
        long waiting = sync_bar.waiting() + block_bar.waiting();
        for (unsigned w = 0; w < nw; ++w) waiting += warp_state[w].bar->waiting();
        const long phases = barrier_phases.load();
        if (waiting < static_cast<long>(nt) || phases != seen) {
          seen = phases;
          since = clock::now();
          continue;
        }
        if (std::chrono::duration<double>(clock::now() - since).count() < hang_seconds()) continue;
        std::vector<std::string> parts = {sync_bar.waiters(), block_bar.waiters()};
        for (unsigned w = 0; w < nw; ++w) parts.push_back(warp_state[w].bar->waiters());
        std::string where;
        for (const std::string& p : parts)
          if (!p.empty()) where += (where.empty() ? "" : "; ") + p;
        fprintf(stderr, "EMU: hung at %s (block (%u,%u,%u); every thread waiting for %.0f s: a "
                "barrier behind a divergent branch, or threads that left the block early)\n",
                where.c_str(), running[0].load(), running[1].load(), running[2].load(),
                hang_seconds());
        std::abort();
      }
    });
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
              if (t == 0) running[0] = bx, running[1] = by, running[2] = bz;
              sync_count = 0;
              warp_ops = 0;
              wg_ops = 0;
              k(args...);
              counts[t] = sync_count;
              wcounts[t] = warp_ops;
              wgcounts[t] = wg_ops;
              cp_left[t] = cp_async_left();
              wg_left[t] = wgmma_left();
              if (t == 0) at = blockIdx;
              block_bar.arrive_and_wait();
            }
      });
    }
    for (auto& x : th) x.join();
    {
      std::lock_guard<std::mutex> lock(done_mu);
      done = true;
    }
    done_cv.notify_one();
    watchdog.join();
    bar = nullptr;
    warps = nullptr;
    dyn_smem = nullptr;
    smem_window = nullptr;
    smem_window_bytes = 0;
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
