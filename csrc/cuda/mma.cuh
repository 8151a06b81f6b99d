// Tensor-core building blocks of the linft CUDA kernels (sm_80 and newer): 16-byte cp.async copies
// into shared memory, ldmatrix, and mma.sync m16n8k16 with fp32 accumulators for bf16 and fp16
// inputs; a warp's accumulator tile; and MmaBlock, a block's pipelined tile of A B^T (gram and
// ghost_gram's main loop). Included by the .cu files only, after common.cuh.
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

// ---------------------------------------------------------------- a warp's (16 MT)x32 fp32 tile
// The tensor-core kernels split a block tile over 8 warps as 2 x 4; a warp owns 16 MT rows x 32
// columns: MT x 4 m16n8 accumulator tiles, acc[mt][nt][q] (C fragment layout above). gram and
// psg_gram's phase 1 use MT = 4 (128x128 block tiles), ghost_gram MT = 2 (64x128: two products live).
template <int MT>
__device__ __forceinline__ void zero_warp_tile(float (&acc)[MT][4][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;
}

// One k16 step of the warp tile: acc[mt][nt] += A_mt B_nt, with B of n8 tiles 2p and 2p + 1 in the
// registers bx4[p] of one ldmatrix.x4 each ((k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
// (k 8-15, n 8-15) as b[0..1] of tile 2p, then of tile 2p + 1).
template <class T, int MT>
__device__ __forceinline__ void mma_warp_tile(float (&acc)[MT][4][4], const uint32_t (&af)[MT][4],
                                              const uint32_t (&bx4)[2][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const uint32_t b[2] = {bx4[nt >> 1][(nt & 1) * 2], bx4[nt >> 1][(nt & 1) * 2 + 1]};
      mma_16816<T>(acc[mt][nt], af[mt], b);
    }
}

// ---------------------------------------------------------------- the cp.async pipeline
struct Nothing {
  __device__ void operator()() const {}
};

// Chunk k (of num_k) is copied by load(k, k % Stages) into that stage and handed to use(k % Stages)
// once every thread's copies of it have landed (and landed() has run in every thread after its
// own copies landed: wgmma's proxy fence); the copies of chunk k + Distance are issued before chunk
// k is used, so they overlap its mma. They go into the stage of chunk k + Distance - Stages, which
// must be free once every thread has returned from that chunk's use: with the default Distance =
// Stages - 1 that is the previous chunk, so use(s) must be done reading stage s when it returns;
// with Distance = Stages - 2, use may leave its reads in flight until the next use returns (wgmma
// with one batch pending). Contains barriers (call uniformly). Returns with no copy in flight; a
// caller that reuses the stages at once still needs a barrier (other warps may be reading the last one).
template <int Stages, int Distance = Stages - 1, class Load, class Use, class Landed = Nothing>
__device__ __forceinline__ void cp_async_pipeline(int num_k, Load&& load, Use&& use,
                                                  Landed&& landed = Landed{}) {
  static_assert(Distance >= 1 && Distance < Stages, "prefetch distance");
#pragma unroll
  for (int s = 0; s < Distance; ++s) {
    if (s < num_k) load(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k; ++kt) {
    cp_async_wait<Distance - 1>();  // this thread's copies of chunk kt have landed
    landed();
    __syncthreads();  // everyone's have; and chunk kt + Distance - Stages's stage is free again
    const int pre = kt + Distance;
    if (pre < num_k) load(pre, pre % Stages);
    cp_async_commit();
    use(kt % Stages);
  }
  cp_async_wait<0>();  // only empty groups are left; nothing in flight
}

// ---------------------------------------------------------------- a block's tile of A B^T
// MmaBlock<MT>: 256 threads (8 warps, 2 x 4) compute the kRows x 128 tile
//   acc = A[row0 : row0 + kRows, k_begin : k_end] B[col0 : col0 + 128, k_begin : k_end]^T
// of two row-major 16-bit matrices (rows of `ld` elements). K advances in chunks of 32 staged in
// shared memory by 16-byte cp.async copies, kStages deep (cp_async_pipeline); rows past a_rows /
// b_rows and chunks past k_end are zero-filled by the copy. Fragments come from shared memory by
// ldmatrix (rows padded by 16 bytes: conflict-free). Needs a, b 16-byte aligned, ld % 8 == 0,
// k_begin % 8 == 0 and k_end % 8 == 0 (a 16-byte chunk is all in or all out).
// Warp w owns rows warp_row() + [0, 16 MT) and columns warp_col() + [0, 32) of the tile.
template <int MT>
struct MmaBlock {
  static constexpr int kRows = 2 * 16 * MT;  // block tile: kRows x kCols
  static constexpr int kCols = 128;
  static constexpr int kK = 32;              // K chunk per pipeline stage
  static constexpr int kStages = 3;          // cp.async pipeline depth
  static constexpr int kLd = kK + 8;         // shared row: 32 elements + 16 bytes of padding
  static constexpr int kStageElems = (kRows + kCols) * kLd;  // a and b rows of one stage
  static constexpr size_t kSmemBytes = sizeof(uint16_t) * kStages * kStageElems;
  static_assert((kLd * 2) % 16 == 0, "shared rows must keep 16-byte alignment for cp.async");
  static_assert(kThreads == 256, "the warp grid (2 x 4) assumes 8 warps");

  __device__ static int warp_row(int warp) { return (warp >> 2) * 16 * MT; }
  __device__ static int warp_col(int warp) { return (warp & 3) * 32; }

  // Copies chunk [k0, k0 + 32) of rows [r0, r0 + Rows) of src (n_rows rows of ld elements) into dst
  // (Rows rows of kLd): 4 copies of 16 bytes per row, consecutive threads along k then rows.
  template <int Rows, class T>
  __device__ static void copy_rows(uint16_t* __restrict__ dst, const T* __restrict__ src, int64_t n_rows,
                                   int64_t ld, int64_t r0, int64_t k0, int64_t k_end, int tid) {
    static_assert((Rows * kK / 8) % kThreads == 0, "copy loop");
#pragma unroll
    for (int r = 0; r < (Rows * kK / 8) / kThreads; ++r) {
      const int c = tid + r * kThreads;
      const int row = c >> 2, kc = (c & 3) * 8;
      const int64_t k = k0 + kc, sr = r0 + row;
      const bool ok = k < k_end && sr < n_rows;
      cp_async16(dst + row * kLd + kc, ok ? src + sr * ld + k : src, ok ? 16 : 0);
    }
  }

  // acc += the tile (this warp's part). smem: kSmemBytes of dynamic shared memory. Contains
  // barriers (call uniformly) and ends with one, so the next call may reuse smem at once.
  template <class T>
  __device__ static void product(float (&acc)[MT][4][4], const T* __restrict__ a, const T* __restrict__ b,
                                 int64_t a_rows, int64_t b_rows, int64_t ld, int64_t row0, int64_t col0,
                                 int64_t k_begin, int64_t k_end, uint16_t* __restrict__ smem, int tid) {
    const int num_k = static_cast<int>((k_end - k_begin + kK - 1) / kK);
    const int lane = tid & 31, warp = tid >> 5;
    // ldmatrix row of this lane: matrix lane / 8, row lane % 8 of it.
    //   A (16x16 per m tile): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
    //   (rows 8-15, k 8-15) -> a[0..3].  B (two n8 tiles x k16): (n 0-7, k 0-7), (n 0-7, k 8-15),
    //   (n 8-15, k 0-7), (n 8-15, k 8-15) -> b[0..1] of tile 2p, b[0..1] of tile 2p + 1.
    const int lm = lane >> 3, lr = lane & 7;
    const int a_row = warp_row(warp) + (lm & 1) * 8 + lr, a_k = (lm >> 1) * 8;
    const int b_row = kRows + warp_col(warp) + (lm >> 1) * 8 + lr, b_k = (lm & 1) * 8;

    auto load = [&](int kt, int s) {  // chunk kt of a's and b's rows into stage s
      uint16_t* stage = smem + s * kStageElems;
      const int64_t k0 = k_begin + static_cast<int64_t>(kt) * kK;
      copy_rows<kRows>(stage, a, a_rows, ld, row0, k0, k_end, tid);
      copy_rows<kCols>(stage + kRows * kLd, b, b_rows, ld, col0, k0, k_end, tid);
    };
    auto use = [&](int s) {
      const uint16_t* st = smem + s * kStageElems;
#pragma unroll
      for (int ks = 0; ks < kK; ks += 16) {
        uint32_t af[MT][4], bx4[2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(af[mt], st + (a_row + mt * 16) * kLd + ks + a_k);
#pragma unroll
        for (int np = 0; np < 2; ++np) ldmatrix_x4(bx4[np], st + (b_row + np * 16) * kLd + ks + b_k);
        mma_warp_tile<T>(acc, af, bx4);
      }
    };
    cp_async_pipeline<kStages>(num_k, load, use);
    __syncthreads();  // every warp is done reading the stages
  }
};

// Whether the current device runs the tensor-core kernels (defined in gram.cu): compute capability
// 8.0 or newer with code compiled for sm_80 or newer loaded, and LINFT_CUDA_GRAM_MMA not set to 0.
bool mma_device(const char* op);

}  // namespace cuda_detail
}  // namespace linft
