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

}  // namespace cuda_detail
}  // namespace linft
