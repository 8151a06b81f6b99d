// Hopper (sm_90a) warpgroup MMA building blocks of the linft CUDA kernels: wgmma.mma_async
// m64n128k16 with fp32 accumulators for bf16 and fp16 operands read from shared memory through
// matrix descriptors, its fence / commit / wait, the generic-to-async proxy fence, and the 128-byte
// swizzled tile layout both operands are stored in. Included by the .cu files only, after mma.cuh.
//
// Layout (PTX ISA, "Shared Memory Matrix Layout", K-major with the 128-byte swizzle): a tile of
// rows x 64 16-bit elements (K contiguous) is stored as rows of 128 bytes, row r at byte 128 r; a
// row's eight 16-byte chunks are permuted within it, chunk c at position c ^ (r % 8). Eight rows
// (1024 bytes) form one swizzle atom, so the tile must start 1024-byte aligned in the shared window.
// The hardware computes an element's address as if unswizzled,
//   start + (r / 8) * SBO + (r % 8) * 128 + 2 k        (SBO = 1024: atoms follow one another),
// then XORs address bits 4-6 with bits 7-9; a descriptor whose start is advanced by 32 bytes thus
// addresses the next 16 elements of K (the k16 steps within a 64-wide tile).
//
// Accumulator fragment of m64nNk16 (thread i of the warpgroup: warp w = i / 32, g = lane / 4,
// t = lane % 4):  d[4 j + q] = D[16 w + g + 8 (q / 2)][8 j + 2 t + q % 2],  j < N / 8.
//
// Everything here needs sm_90a code (nvcc -gencode arch=compute_90a,...): callers guard their use
// with LINFT_WGMMA_ENABLED. Under LINFT_CUDA_EMULATION the functions forward to the warpgroup
// emulation of tests/cuda_emu/emu.h (the product is carried out at wgmma.wait_group, from shared
// memory as it is then).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(LINFT_CUDA_EMULATION) || (defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define LINFT_WGMMA_ENABLED 1
#else
#define LINFT_WGMMA_ENABLED 0
#endif

namespace linft {
namespace cuda_detail {

constexpr int kWgThreads = 128;   // a warpgroup: 4 consecutive warps, the first a multiple of 4
constexpr int kSwizzleK = 64;     // 16-bit elements per 128-byte swizzled row
constexpr int kSwizzleAtom = 1024;

// Byte offset of 16-byte chunk c (elements 8c .. 8c + 7) of row r in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swizzle128(int r, int c) {
  return static_cast<uint32_t>(r) * 128u + (static_cast<uint32_t>(c ^ (r & 7)) << 4);
}

// The shared-window address of a pointer into shared memory (what descriptors hold).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#ifdef LINFT_CUDA_EMULATION
  return ::emu::smem_u32(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Matrix descriptor of a K-major, 128-byte-swizzled operand starting at shared address `addr`:
// bits 0-13 start >> 4, 16-29 leading-dimension byte offset >> 4 (unused for this layout, set to
// 1), 32-45 stride byte offset >> 4 (1024: one swizzle atom per 8 rows), 49-51 base offset (0:
// atoms 1024-byte aligned), 62-63 layout (1: 128-byte swizzle).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{kSwizzleAtom >> 4} << 32) | (uint64_t{1} << 62);
}

// Orders this thread's earlier generic-proxy shared-memory writes (cp.async copies that have landed)
// before later async-proxy reads (wgmma operands): call after cp.async.wait_group, before the
// barrier that hands the data to the warpgroups.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef LINFT_CUDA_EMULATION
  ::emu::fence_proxy_async();
#elif LINFT_WGMMA_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving accesses of the accumulators across this point (they are read and
// written by the asynchronous wgmma behind its back).
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[64]) {
#if !defined(LINFT_CUDA_EMULATION) && LINFT_WGMMA_ENABLED
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// Before the first wgmma.mma_async of a batch (orders the accumulator registers' earlier accesses).
__device__ __forceinline__ void wgmma_fence(float (&d)[64]) {
  wgmma_fence_operands(d);
#ifdef LINFT_CUDA_EMULATION
  ::emu::wgmma_fence();
#elif LINFT_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the batch of wgmma.mma_async issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
#ifdef LINFT_CUDA_EMULATION
  ::emu::wgmma_commit();
#elif LINFT_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most `Pending` committed batches are in flight; only then may the accumulators
// be read, or the shared memory they read be written.
template <int Pending>
__device__ __forceinline__ void wgmma_wait(float (&d)[64]) {
#ifdef LINFT_CUDA_EMULATION
  ::emu::wgmma_wait(Pending);
#elif LINFT_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
  wgmma_fence_operands(d);  // no read of the accumulators is hoisted above the wait
}

#define LINFT_WG_F8(i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define LINFT_WG_D64                                                                           \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

// One wgmma.mma_async m64n128k16 with fp32 accumulators d and 16-bit operands of PTX type AB ("bf16"
// or "f16"), scale-d 1 (accumulate), both operands K-major (transpose flags 0).
#define LINFT_WG_MMA(AB)                                                                          \
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." AB "." AB " " LINFT_WG_D64          \
               ", %64, %65, 1, 1, 1, 0, 0;\n"                                                     \
               : LINFT_WG_F8(0), LINFT_WG_F8(8), LINFT_WG_F8(16), LINFT_WG_F8(24), LINFT_WG_F8(32), \
                 LINFT_WG_F8(40), LINFT_WG_F8(48), LINFT_WG_F8(56)                                 \
               : "l"(da), "l"(db))

// d (64 x 128, fragment above) += A (64 x 16 at descriptor da) B^T (B: 128 x 16 at descriptor db),
// both K-major; asynchronous until wgmma_wait. T is __nv_bfloat16 or __half.
template <class T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db) {
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(bf16 || std::is_same_v<T, __half>, "16-bit operands: __nv_bfloat16 or __half");
#ifdef LINFT_CUDA_EMULATION
  ::emu::wgmma_m64nNk16(d, 128, da, db, bf16);
#elif LINFT_WGMMA_ENABLED
  if constexpr (bf16)
    LINFT_WG_MMA("bf16");
  else
    LINFT_WG_MMA("f16");
#else
  (void)d, (void)da, (void)db;
#endif
}

#undef LINFT_WG_MMA
#undef LINFT_WG_F8
#undef LINFT_WG_D64

}  // namespace cuda_detail
}  // namespace linft
