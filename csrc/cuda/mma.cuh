// Warp-level tensor-core primitives of the linft CUDA kernels (sm_80 and newer): 16-byte cp.async
// copies into shared memory, ldmatrix, and mma.sync m16n8k16 with fp32 accumulators for bf16 and
// fp16 inputs. Included by the .cu files only, after common.cuh.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" with .bf16/.f16), with
// g = lane / 4 and t = lane % 4, each 32-bit register holding two consecutive-k 16-bit elements:
//   A (16 x 16, row-major):  a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                            a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, "col": stored n-major, k contiguous):  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8, fp32):     c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8 (8 x 8 16-bit elements, rows
// of 16 contiguous bytes); register m of lane l receives row l / 4, elements 2(l % 4), 2(l % 4) + 1
// of matrix m.
//
// Under LINFT_CUDA_EMULATION the same functions forward to the warp emulation of
// tests/cuda_emu/emu.h (same per-lane semantics; cp.async copies complete at cp_async_wait).
#pragma once

#include <cstdint>

namespace linft {
namespace cuda_detail {

// 16 bytes from global `src` into shared `dst` (both 16-byte aligned); src_bytes is 16 or 0
// (0: dst is zero-filled and src, which must still be a valid address, is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#ifdef LINFT_CUDA_EMULATION
  ::emu::cp_async16(dst, src, src_bytes);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}

// Closes the group of this thread's cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef LINFT_CUDA_EMULATION
  ::emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `Pending` of this thread's committed groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LINFT_CUDA_EMULATION
  ::emu::cp_async_wait(Pending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

// Four 8x8 16-bit matrices from shared memory (layout above); row_addr: this lane's row.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
#ifdef LINFT_CUDA_EMULATION
  ::emu::ldmatrix_x4(r, row_addr);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

// The same four matrices, each transposed on the way: register m of lane l receives elements
// (row 2(l % 4), column l / 4) and (row 2(l % 4) + 1, column l / 4) of stored matrix m. Loads mma
// fragments from k-major tiles (rows of k, the m or n index contiguous).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
#ifdef LINFT_CUDA_EMULATION
  ::emu::ldmatrix_x4(r, row_addr, /*trans=*/true);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row_addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

// c += A(16x16) B(16x8) on the tensor cores; T is __nv_bfloat16 or __half.
template <class T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
#ifdef LINFT_CUDA_EMULATION
  ::emu::mma_16816(c, a, b, /*bf16=*/true);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#ifdef LINFT_CUDA_EMULATION
  ::emu::mma_16816(c, a, b, /*bf16=*/false);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---------------------------------------------------------------- a warp's 64x32 fp32 tile
// The tensor-core kernels split a 128x128 block tile over 8 warps as 2 x 4; a warp owns 64 rows x
// 32 columns: 4 x 4 m16n8 accumulator tiles, acc[mt][nt][q] (C fragment layout above).
__device__ __forceinline__ void zero_warp_tile(float (&acc)[4][4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
}

// One k16 step of the warp tile: acc[mt][nt] += A_mt B_nt, with B of n8 tiles 2p and 2p + 1 in the
// registers bx4[p] of one ldmatrix.x4 each ((k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
// (k 8-15, n 8-15) as b[0..1] of tile 2p, then of tile 2p + 1).
template <class T>
__device__ __forceinline__ void mma_warp_tile(float (&acc)[4][4][4], const uint32_t (&af)[4][4],
                                              const uint32_t (&bx4)[2][4]) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const uint32_t b[2] = {bx4[nt >> 1][(nt & 1) * 2], bx4[nt >> 1][(nt & 1) * 2 + 1]};
      mma_16816<T>(acc[mt][nt], af[mt], b);
    }
}

// Whether the current device runs the tensor-core kernels (defined in gram.cu): compute capability
// 8.0 or newer with code compiled for sm_80 or newer loaded, and LINFT_CUDA_GRAM_MMA not set to 0.
bool mma_device(const char* op);

}  // namespace cuda_detail
}  // namespace linft
