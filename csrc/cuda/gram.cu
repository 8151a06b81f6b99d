// gram: out[N, M] += a[N, P] @ b[M, P]^T (csrc/README.md).
//
// Three kernels; the launcher picks one per call.
//
// gram_wgmma_kernel (the same inputs as gram_mma_kernel below, on a compute capability 9.0 GPU
// running this library's sm_90a code): Hopper's warpgroup MMA. The same 128x128 output tiles,
// split-K and epilogue as gram_mma_kernel; two warpgroups each compute a 64x128 half as
// wgmma.mma_async m64n128k16 (64 fp32 accumulators per thread) with both operands read from shared
// memory through descriptors (wgmma.cuh). K advances in chunks of 64: one 128-byte swizzled row per
// operand row, staged by 16-byte cp.async copies in a 3-stage pipeline (96 KiB), two blocks per SM
// so that one block's copies and barriers overlap the other's MMAs.
//
// gram_mma_kernel (bf16 / fp16 inputs, fp32 out, sm_80+, 16-byte aligned a and b, P % 8 == 0):
// tensor cores. A block of 256 threads (8 warps, 2 x 4) computes a 128x128 output tile; each warp a
// 64x32 sub-tile as 4 x 4 mma.sync m16n8k16 (fp32 accumulators in registers, 64 per thread).
// K advances in chunks of 32 staged in shared memory by 16-byte cp.async copies, kGramMmaStages
// deep (the copy of chunk k+2 overlaps the mma of chunk k); rows past N / M are zero-filled by the
// copy. Fragments come from shared memory by ldmatrix (rows padded by 16 bytes: conflict-free).
// Split-K (few tiles, long P): each split stores its fp32 partial tile into a workspace, and
// gram_reduce_kernel adds the splits in a fixed order, so the result is deterministic. The
// symmetric form computes tiles on or above the diagonal; every element (i, j) with i <= j is
// added into out[i, j] and out[j, i] from the one value, so a symmetric out stays exactly symmetric.
//
// gram_kernel (every other case): classic shared-memory tiled GEMM on CUDA cores. A block computes
// a 64x64 output tile over a range of P (split-K when there are few tiles and P is long); each of
// its 256 threads owns a 4x4 micro-tile with rows ty + 16*r and columns tx + 16*c (tx = tid % 16,
// ty = tid / 16). K advances in chunks of 16 staged in shared memory in the accumulator type.
// Symmetric form: blocks below the diagonal return at once; an off-diagonal tile adds into
// out[i, j] and out[j, i]. Without split-K every output element has a single writer (plain add,
// deterministic); with split-K the adds are atomic.
//
// An fp64 out keeps gram_kernel for every input dtype: the interface promises accumulation in the
// output's precision, which fp32 tensor-core accumulators do not give.
#include <atomic>
#include <cstdlib>

#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"
#include "linft/cuda_kernels.h"

#define LINFT_STR2(...) #__VA_ARGS__
#define LINFT_STR(...) LINFT_STR2(__VA_ARGS__)

namespace linft {
namespace cuda_detail {
namespace {

constexpr int kGramTile = 64;  // output tile edge
constexpr int kGramK = 16;     // K chunk
constexpr int kGramMicro = 4;  // micro-tile edge per thread (16 x 16 threads x 4 = 64)
static_assert(kGramMicro == 4 && kGramTile == 64, "micro_tile_fma's thread mapping");

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads)
gram_kernel(const T* __restrict__ a, const T* __restrict__ b, Acc* __restrict__ out, int64_t N,
            int64_t M, int64_t P, int64_t k_per_split, int64_t tile_row_offset, int symmetric) {
  const int64_t ti = static_cast<int64_t>(blockIdx.y) + tile_row_offset;
  const int64_t tj = static_cast<int64_t>(blockIdx.x);
  if (symmetric && tj < ti) return;  // whole block: uniform, before any barrier

  const int64_t row0 = ti * kGramTile;
  const int64_t col0 = tj * kGramTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = (k_begin + k_per_split < P) ? k_begin + k_per_split : P;

  // [k][row], padded against bank conflicts on the transposing store.
  __shared__ Acc As[kGramK][kGramTile + 1];
  __shared__ Acc Bs[kGramK][kGramTile + 1];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;

  Acc c[kGramMicro][kGramMicro];
#pragma unroll
  for (int r = 0; r < kGramMicro; ++r)
#pragma unroll
    for (int s = 0; s < kGramMicro; ++s) c[r][s] = Acc(0);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kGramK) {
    // 64 rows x 16 k = 1024 elements per operand, 4 per thread; consecutive threads walk along k.
#pragma unroll
    for (int r = 0; r < (kGramTile * kGramK) / kThreads; ++r) {
      const int idx = tid + r * kThreads;
      const int kk = idx % kGramK;
      const int rr = idx / kGramK;
      const int64_t k = k0 + kk;
      const int64_t ar = row0 + rr;
      const int64_t br = col0 + rr;
      As[kk][rr] = (ar < N && k < k_end) ? load<Acc>(a, ar * P + k) : Acc(0);
      Bs[kk][rr] = (br < M && k < k_end) ? load<Acc>(b, br * P + k) : Acc(0);
    }
    __syncthreads();
    micro_tile_fma<kGramK, kGramTile + 1>(As, Bs, c, tx, ty);
    __syncthreads();
  }

  const bool atomic = gridDim.z > 1;
  const bool mirror = symmetric && ti != tj;
#pragma unroll
  for (int r = 0; r < kGramMicro; ++r) {
    const int64_t i = row0 + ty + 16 * r;
#pragma unroll
    for (int s = 0; s < kGramMicro; ++s) {
      const int64_t j = col0 + tx + 16 * s;
      if (i < N && j < M) {
        add_out(out, i * M + j, c[r][s], atomic);
        if (mirror) add_out(out, j * M + i, c[r][s], atomic);  // symmetric: M == N
      }
    }
  }
}


// ---------------------------------------------------------------- tensor-core path
using GramMma = MmaBlock<4>;  // 128x128 block tiles, 60 KiB of shared memory (mma.cuh)
constexpr int kMmaTile = GramMma::kRows;
static_assert(GramMma::kRows == GramMma::kCols, "gram's tiles are square (the symmetric form)");

// Block (blockIdx.x, blockIdx.y + tile_row_offset) of 128x128 tiles, K range blockIdx.z. splits == 1:
// adds into out; otherwise stores the partial tile into ws[blockIdx.z] (N x M, fp32).
template <class T>
__global__ void __launch_bounds__(kThreads)
gram_mma_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                float* __restrict__ ws, int64_t N, int64_t M, int64_t P, int64_t k_per_split,
                int64_t tile_row_offset, int symmetric) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass and emulation: the body parses
  const int64_t ti = static_cast<int64_t>(blockIdx.y) + tile_row_offset;
  const int64_t tj = static_cast<int64_t>(blockIdx.x);
  if (symmetric && tj < ti) return;  // whole block: uniform, before any barrier

  LINFT_DYNAMIC_SMEM(smem_raw);
  const int64_t row0 = ti * kMmaTile;
  const int64_t col0 = tj * kMmaTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = (k_begin + k_per_split < P) ? k_begin + k_per_split : P;
  const int tid = static_cast<int>(threadIdx.x);

  float acc[4][4][4];
  zero_warp_tile(acc);
  GramMma::product(acc, a, b, N, M, P, row0, col0, k_begin, k_end,
                   reinterpret_cast<uint16_t*>(smem_raw), tid);

  // Epilogue. Lane (g, t) holds rows g and g + 8, columns 2t and 2t + 1 of every 16x8 tile.
  const int lane = tid & 31, warp = tid >> 5;
  const int wm = GramMma::warp_row(warp), wn = GramMma::warp_col(warp);
  const int g = lane >> 2, t4 = lane & 3;
  const bool split = gridDim.z > 1;
  float* dst = split ? ws + static_cast<int64_t>(blockIdx.z) * N * M : out;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = row0 + wm + mt * 16 + g + (q >> 1) * 8;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int64_t j = col0 + wn + nt * 8 + 2 * t4 + (q & 1);
        if (i >= N || j >= M) continue;
        const float v = acc[mt][nt][q];
        if (split) {
          dst[i * M + j] = v;  // the reduce kernel adds (and mirrors) the splits
        } else if (!symmetric) {
          out[i * M + j] += v;
        } else if (i <= j) {  // (j, i) of a diagonal tile takes this value: exactly symmetric
          out[i * M + j] += v;
          if (i != j) out[j * M + i] += v;
        }
      }
    }
#else
  __trap();  // the launcher never picks this kernel below sm_80
#endif
}

// ---------------------------------------------------------------- Hopper path (sm_90a)
// Overlap = false (the default): 3 stages, each chunk's MMAs waited for before the next barrier, two
// blocks per SM (one block's copies and barriers overlap the other's MMAs). Overlap = true
// (LINFT_CUDA_GRAM_WGMMA=2, for A/B timing): 4 stages, copies two chunks ahead, each chunk's MMAs
// left in flight while the next chunk's are issued (wgmma.wait_group 1), one block per SM.
template <bool Overlap>
struct GramWg {
  static constexpr int kTile = 128;                       // output tile edge (= kMmaTile)
  static constexpr int kK = kSwizzleK;                    // K chunk: one 128-byte swizzled row
  static constexpr int kStages = Overlap ? 4 : 3;
  static constexpr int kDistance = Overlap ? kStages - 2 : kStages - 1;  // chunks loaded ahead
  static constexpr int kPending = Overlap ? 1 : 0;        // MMA batches left in flight per chunk
  static constexpr int kBlocksPerSm = Overlap ? 1 : 2;
  static constexpr int kOperandBytes = kTile * kK * 2;    // one operand's rows of one stage: 16 KiB
  static constexpr int kStageBytes = 2 * kOperandBytes;
  // the stages, plus the slack to align them to a swizzle atom (dynamic shared memory is only
  // 16-byte aligned)
  static constexpr size_t kSmemBytes = kStages * kStageBytes + kSwizzleAtom - 16;
  // a refill may only overwrite the stage of MMAs already waited for
  static_assert(kDistance + kPending < kStages, "the pipeline would refill a stage still being read");
  static_assert(kThreads == 2 * kWgThreads, "two warpgroups of 64 rows each");
  static_assert(kOperandBytes % kSwizzleAtom == 0, "every operand tile starts on a swizzle atom");
};
static_assert(GramWg<false>::kTile == kMmaTile, "both tensor-core kernels share the tile plan");

// Block (blockIdx.x, blockIdx.y + tile_row_offset) of 128x128 tiles, K range blockIdx.z; splits == 1
// adds into out, otherwise the partial tile goes to ws[blockIdx.z] (as gram_mma_kernel).
template <class T, bool Overlap>
__global__ void __launch_bounds__(kThreads, GramWg<Overlap>::kBlocksPerSm)
gram_wgmma_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                  float* __restrict__ ws, int64_t N, int64_t M, int64_t P, int64_t k_per_split,
                  int64_t tile_row_offset, int symmetric) {
#if LINFT_WGMMA_ENABLED || !defined(__CUDA_ARCH__)  // host pass and emulation: the body parses
  const int64_t ti = static_cast<int64_t>(blockIdx.y) + tile_row_offset;
  const int64_t tj = static_cast<int64_t>(blockIdx.x);
  if (symmetric && tj < ti) return;  // whole block: uniform, before any barrier

  using Wg = GramWg<Overlap>;
  LINFT_DYNAMIC_SMEM(smem_raw);
  const uint32_t raw = smem_u32(smem_raw);
  unsigned char* const smem = smem_raw + (kSwizzleAtom - raw % kSwizzleAtom) % kSwizzleAtom;
  const uint32_t base = smem_u32(smem);
  const int64_t row0 = ti * Wg::kTile;
  const int64_t col0 = tj * Wg::kTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = (k_begin + k_per_split < P) ? k_begin + k_per_split : P;
  const int num_k = static_cast<int>((k_end - k_begin + Wg::kK - 1) / Wg::kK);
  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid / kWgThreads;

  // Stage s of chunk kt: rows [row0, row0 + 128) of a and [col0, col0 + 128) of b, K [k0, k0 + 64),
  // into two swizzled operand tiles: 1024 chunks of 16 bytes per operand, 4 per thread; thread tid
  // copies chunk tid % 8 of rows tid / 8 + 32 r (8 consecutive threads: one row's 128 bytes), whose
  // swizzled place differs by r only in the row offset. Rows past N / M and chunks past k_end are
  // zero-filled. Everything that stays the same over the chunks is computed once (registers: the
  // 64 accumulators leave few).
  const int rt = tid >> 3, ch = tid & 7;
  const uint32_t dst0 = swizzle128(rt, ch);
  const int64_t k_first = k_begin + ch * 8;
  const T* const a_src = a + (row0 + rt) * P + k_first;
  const T* const b_src = b + (col0 + rt) * P + k_first;
  const int64_t a_left = N - row0 - rt, b_left = M - col0 - rt;  // rows this thread may copy: r * 32 < left
  auto load = [&](int kt, int s) {
    unsigned char* stage = smem + s * Wg::kStageBytes + dst0;
    const int64_t kk = static_cast<int64_t>(kt) * Wg::kK;
    const bool k_ok = k_first + kk < k_end;
#pragma unroll
    for (int r = 0; r < (Wg::kTile * 8) / kThreads; ++r) {
      const int64_t off = static_cast<int64_t>(r) * 32 * P + kk;
      const bool a_ok = k_ok && r * 32 < a_left, b_ok = k_ok && r * 32 < b_left;
      cp_async16(stage + r * 32 * 128, a_ok ? a_src + off : a, a_ok ? 16 : 0);
      cp_async16(stage + Wg::kOperandBytes + r * 32 * 128, b_ok ? b_src + off : b, b_ok ? 16 : 0);
    }
  };
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  auto use = [&](int s) {
    // this warpgroup's 64 rows of the A tile (8 swizzle atoms further per warpgroup), all of B
    const uint32_t sa = base + s * Wg::kStageBytes + wg * 64 * 128;
    const uint32_t sb = base + s * Wg::kStageBytes + Wg::kOperandBytes;
    wgmma_fence(acc);
#pragma unroll
    for (int ks = 0; ks < Wg::kK / 16; ++ks)  // k16 steps: the descriptors' start moves 32 bytes
      wgmma_m64n128k16<T>(acc, wgmma_desc(sa + ks * 32), wgmma_desc(sb + ks * 32));
    wgmma_commit();
    // default: done reading stage s (the pipeline refills it next); Overlap: the previous chunk's
    // MMAs are done (the pipeline refills their stage next)
    wgmma_wait<Wg::kPending>(acc);
  };
  cp_async_pipeline<Wg::kStages, Wg::kDistance>(num_k, load, use, [] { fence_proxy_async(); });
  wgmma_wait<0>(acc);

  // Epilogue through shared memory (the stages are free once both warpgroups are done): the tile
  // is staged as 128 rows of 129 floats (padded: column reads are conflict-free), then added into
  // out row by row, coalesced; the symmetric form's mirror is added column by column of the tile,
  // which is again row by row of out. Thread (warp w of its warpgroup, g = lane / 4, t = lane % 4)
  // holds rows g and g + 8 of the warp's 16 rows, columns 8 j + 2 t and 8 j + 2 t + 1 (wgmma.cuh).
  __syncthreads();  // the other warpgroup may still be reading the last stage
  constexpr int kLdT = Wg::kTile + 1;
  static_assert(sizeof(float) * Wg::kTile * kLdT <= Wg::kStages * Wg::kStageBytes,
                "the staged tile fits in the pipeline's stages");
  float* const tile = reinterpret_cast<float*>(smem);
  {
    const int lane = tid & 31, w = (tid % kWgThreads) >> 5;
    const int r = wg * 64 + w * 16 + (lane >> 2), c = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) tile[(r + (q >> 1) * 8) * kLdT + 8 * j + c + (q & 1)] = acc[4 * j + q];
  }
  __syncthreads();
  const bool split = gridDim.z > 1;
  float* const dst = split ? ws + static_cast<int64_t>(blockIdx.z) * N * M : out;
  const int rows = static_cast<int>(N - row0 < Wg::kTile ? N - row0 : Wg::kTile);
  const int cols = static_cast<int>(M - col0 < Wg::kTile ? M - col0 : Wg::kTile);
  // out[row0 + r, col0 + c] (+)= tile[r][c]; symmetric: only where row0 + r <= col0 + c (the
  // reduce kernel of a split mirrors the splits' sum itself)
  for (int e = tid; e < Wg::kTile * Wg::kTile; e += kThreads) {
    const int r = e / Wg::kTile, c = e % Wg::kTile;
    if (r >= rows || c >= cols) continue;
    const int64_t i = row0 + r, jj = col0 + c;
    const float v = tile[r * kLdT + c];
    if (split)
      dst[i * M + jj] = v;
    else if (!symmetric || i <= jj)
      dst[i * M + jj] += v;
  }
  if (symmetric && !split) {
    // out[col0 + c, row0 + r] += tile[r][c] where row0 + r < col0 + c: the same value as above, so
    // a symmetric out stays exactly symmetric
    for (int e = tid; e < Wg::kTile * Wg::kTile; e += kThreads) {
      const int c = e / Wg::kTile, r = e % Wg::kTile;
      if (r >= rows || c >= cols) continue;
      const int64_t i = row0 + r, jj = col0 + c;
      if (i < jj) out[jj * M + i] += tile[r * kLdT + c];
    }
  }
#else
  __trap();  // the launcher picks this kernel only where the sm_90a code is what runs
#endif
}

// Never launched: its launch bounds are 64 threads in the sm_90a build and 32 in every other, so
// its function attributes tell which of this module's builds the driver loaded for a device (no
// launch and no synchronization: safe under CUDA graph capture). It must stay in the module of
// gram_wgmma_kernel, whose code comes from the same build.
constexpr int kProbeThreadsSm90a = 64;
__global__ void __launch_bounds__(LINFT_WGMMA_ENABLED ? kProbeThreadsSm90a : 32) sm90a_probe_kernel() {}

// out[i, j] += sum over splits s (in order) of ws[s, i, j]; symmetric: only i <= j, mirrored.
__global__ void __launch_bounds__(kThreads)
gram_reduce_kernel(const float* __restrict__ ws, float* __restrict__ out, int64_t N, int64_t M,
                   int64_t splits, int symmetric) {
  const int64_t total = N * M;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / M, j = e % M;
    if (symmetric && i > j) continue;
    float v = 0.f;
    for (int64_t s = 0; s < splits; ++s) v += ws[s * total + e];
    out[e] += v;
    if (symmetric && i != j) out[j * M + i] += v;
  }
}


// Output tiles of edge `tile` and the split of K (= P) over grid z, shared by both gram launches:
// with few output tiles K is split to reach about `target_blocks` blocks, keeping at least `min_k`
// of K per split; each split's length is a multiple of `k_step` and there are at most kMaxGridYZ.
struct TilePlan {
  int64_t tiles_n, tiles_m, k_per, splits;
};

TilePlan plan_tiles(int64_t N, int64_t M, int64_t P, bool symmetric, int64_t tile, int64_t k_step,
                    int64_t target_blocks, int64_t min_k, const char* op) {
  TilePlan tp;
  tp.tiles_n = ceil_div(N, tile);
  tp.tiles_m = ceil_div(M, tile);
  require(tp.tiles_m <= kMaxGridX, op, "M too large");
  const int64_t tiles = symmetric ? tp.tiles_n * (tp.tiles_n + 1) / 2 : tp.tiles_n * tp.tiles_m;
  int64_t splits = ceil_div(target_blocks, tiles);
  const int64_t max_splits = ceil_div(P, min_k);
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  tp.k_per = ceil_div(ceil_div(P, splits), k_step) * k_step;
  const int64_t k_min = ceil_div(ceil_div(P, kMaxGridYZ), k_step) * k_step;
  if (tp.k_per < k_min) tp.k_per = k_min;
  tp.splits = ceil_div(P, tp.k_per);
  return tp;
}

// Tensor-core launch (see the top of the file); the caller checked dtype, alignment and P % 8.
// Kind: 0 gram_mma_kernel, 1 gram_wgmma_kernel, 2 its Overlap form (the caller checked wgmma_device).
template <class T, int Kind>
void gram_mma(const T* pa, const T* pb, float* po, int64_t N, int64_t M, int64_t P, bool symmetric,
              cudaStream_t s, const char* op) {
  // Split K when there are few output tiles (aim at ~256 blocks, two per SM of an H100), keeping
  // >= 1024 of K per split. Not tuned on a GPU yet.
  constexpr bool Wg = Kind > 0, Overlap = Kind == 2;
  const int64_t k_step = Wg ? GramWg<Overlap>::kK : GramMma::kK;
  const TilePlan tp = plan_tiles(N, M, P, symmetric, kMmaTile, k_step, 256, 1024, op);
  const int64_t tiles_n = tp.tiles_n, tiles_m = tp.tiles_m, k_per = tp.k_per, splits = tp.splits;

  // 60 / 97 KiB of dynamic shared memory: over the default 48 KiB, so opt in (per device; cheap).
  const size_t smem = Wg ? GramWg<Overlap>::kSmemBytes : GramMma::kSmemBytes;
  if constexpr (Wg) {
    check_cuda(cudaFuncSetAttribute(gram_wgmma_kernel<T, Overlap>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               op, "cudaFuncSetAttribute");
    // two blocks of 97 KiB (Overlap: one of 129 KiB) per SM need the largest shared-memory
    // carveout (a hint the driver may otherwise size for one smaller block)
    check_cuda(cudaFuncSetAttribute(gram_wgmma_kernel<T, Overlap>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    static_cast<int>(cudaSharedmemCarveoutMaxShared)),
               op, "cudaFuncSetAttribute");
  } else
    check_cuda(cudaFuncSetAttribute(gram_mma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               op, "cudaFuncSetAttribute");
  Scratch scratch{nullptr, s};  // freed also when a launch throws
  if (splits > 1)
    check_cuda(cudaMallocAsync(&scratch.p, sizeof(float) * static_cast<size_t>(splits * N * M), s), op,
               "cudaMallocAsync (split-K workspace)");
  float* ws = static_cast<float*>(scratch.p);
  for (int64_t row_off = 0; row_off < tiles_n; row_off += kMaxGridYZ) {
    const int64_t rows = (tiles_n - row_off < kMaxGridYZ) ? tiles_n - row_off : kMaxGridYZ;
    dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(rows), static_cast<unsigned>(splits));
    if constexpr (Wg)
      LINFT_LAUNCH(grid, kThreads, smem, s, gram_wgmma_kernel<T, Overlap>)
      (pa, pb, po, ws, N, M, P, k_per, row_off, symmetric ? 1 : 0);
    else
      LINFT_LAUNCH(grid, kThreads, smem, s, gram_mma_kernel<T>)
      (pa, pb, po, ws, N, M, P, k_per, row_off, symmetric ? 1 : 0);
    check_launch(op);
  }
  if (ws != nullptr) {
    int64_t blocks = ceil_div(N * M, kThreads);
    if (blocks > 4096) blocks = 4096;
    LINFT_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, s, gram_reduce_kernel)
    (ws, po, N, M, splits, symmetric ? 1 : 0);
    check_launch(op);
    scratch.p = nullptr;
    check_cuda(cudaFreeAsync(ws, s), op, "cudaFreeAsync (split-K workspace)");
  }
}

// The answer of yes(device) for the current device, asked once per device (cache: 0 not asked yet,
// 1 no, 2 yes).
constexpr int kMaxDevices = 64;
template <class Yes>
bool per_device(std::atomic<int> (&cache)[kMaxDevices], const char* op, Yes&& yes) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), op, "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) return false;
  int m = cache[dev].load(std::memory_order_relaxed);
  if (m == 0) {
    m = yes(dev) ? 2 : 1;
    cache[dev].store(m, std::memory_order_relaxed);
  }
  return m == 2;
}

bool env_is(const char* name, char first) {
  const char* e = std::getenv(name);
  return e != nullptr && e[0] == first;
}
// Whether the current device runs gram_wgmma_kernel: mma_device, compute capability exactly 9.0,
// and the code loaded for this library's kernels is its sm_90a build (binaryVersion says 90 for
// sm_90 and sm_90a code alike, so sm90a_probe_kernel's launch bounds tell them apart: a build
// without 90a in LINFT_CUDA_ARCHS, or one whose plain sm_90 code the driver loads, says no; the
// emulated 9.0 device runs the sm_90a code). Cached per device. LINFT_CUDA_GRAM_WGMMA=0 turns it
// off; unlike the other switches it is read at every call, so one process can time both kernels.
bool wgmma_device(const char* op) {
  if (env_is("LINFT_CUDA_GRAM_WGMMA", '0') || !mma_device(op)) return false;
  static std::atomic<int> cache[kMaxDevices];
  return per_device(cache, op, [op](int dev) {
    int major = 0, minor = 0;
    check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), op,
               "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), op,
               "cudaDeviceGetAttribute");
    if (major != 9 || minor != 0) return false;
#ifdef LINFT_CUDA_EMULATION
    (void)&sm90a_probe_kernel;
    return true;
#else
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, sm90a_probe_kernel) != cudaSuccess) {
      (void)cudaGetLastError();  // no loadable code: no
      return false;
    }
    return attr.maxThreadsPerBlock == kProbeThreadsSm90a;
#endif
  });
}

// LINFT_CUDA_GRAM_WGMMA=2: the Overlap form of gram_wgmma_kernel (read at every call, like =0: the
// process environment must then not be written by other threads while kernels launch, as glibc's
// getenv and setenv are not synchronized; LINFT_CUDA_PSG_SCRATCH_BYTES is read the same way).
bool wgmma_overlap() { return env_is("LINFT_CUDA_GRAM_WGMMA", '2'); }

}  // namespace

// Declared in mma.cuh. Compute capability 8.0 or newer, and the code loaded for it compiled for sm_80
// or newer (a build for older archs only holds __trap()); psg_gram.cu is built with the same
// architectures, so gram_mma_kernel stands for its kernels too. Cached per device;
// LINFT_CUDA_GRAM_MMA=0 in the environment turns every tensor-core path off (for A/B timing).
bool mma_device(const char* op) {
  static const bool disabled = env_is("LINFT_CUDA_GRAM_MMA", '0');
  if (disabled) return false;
  static std::atomic<int> cache[kMaxDevices];
  return per_device(cache, op, [op](int dev) {
    int cc = 0;
    check_cuda(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev), op,
               "cudaDeviceGetAttribute");
    if (cc < 8) return false;
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, gram_mma_kernel<__nv_bfloat16>) != cudaSuccess) {
      (void)cudaGetLastError();  // no loadable code for this device: the FFMA kernel serves
      return false;
    }
    return attr.binaryVersion >= 80;
  });
}

}  // namespace cuda_detail

namespace cuda {

void gram(const void* a, const void* b, void* out, int64_t N, int64_t M, int64_t P, int dtype,
          int out_dtype, std::uintptr_t stream) {
  using namespace cuda_detail;
  const char* op = "gram";
  require(N >= 0 && M >= 0 && P >= 0, op, "negative size");
  // Validate the codes even when there is nothing to do.
  dispatch_types(dtype, out_dtype, op, [](auto, auto) {});
  if (N == 0 || M == 0 || P == 0) return;
  require(a != nullptr && out != nullptr, op, "null pointer");
  const bool symmetric = (b == nullptr);
  require(!symmetric || M == N, op, "symmetric form (b == 0) needs M == N");

  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  // Tensor cores: 16-bit inputs, fp32 out, rows of 16-byte multiples at 16-byte aligned addresses.
  const bool mma_shape = (dtype == kBFloat16 || dtype == kFloat16) && out_dtype == kFloat32 &&
                         P % 8 == 0 && reinterpret_cast<std::uintptr_t>(a) % 16 == 0 &&
                         reinterpret_cast<std::uintptr_t>(symmetric ? a : b) % 16 == 0;
  if (mma_shape && mma_device(op)) {
    float* po = static_cast<float*>(out);
    const bool wg = wgmma_device(op);
    auto run = [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* pa = static_cast<const T*>(a);
      const T* pb = symmetric ? pa : static_cast<const T*>(b);
      if (!wg)
        gram_mma<T, 0>(pa, pb, po, N, M, P, symmetric, s, op);
      else if (wgmma_overlap())
        gram_mma<T, 2>(pa, pb, po, N, M, P, symmetric, s, op);
      else
        gram_mma<T, 1>(pa, pb, po, N, M, P, symmetric, s, op);
    };
    if (dtype == kBFloat16)
      run(Tag<__nv_bfloat16>{});
    else
      run(Tag<__half>{});
    return;
  }

  // Split K when there are few output tiles (aim at ~1024 blocks), keeping >= 512 of K per split.
  const TilePlan tp = plan_tiles(N, M, P, symmetric, kGramTile, kGramK, 1024, 512, op);
  const int64_t tiles_n = tp.tiles_n, tiles_m = tp.tiles_m, k_per = tp.k_per, splits = tp.splits;

  dispatch_types(dtype, out_dtype, op, [&](auto ttag, auto atag) {
    using T = typename decltype(ttag)::type;
    using Acc = typename decltype(atag)::type;
    const T* pa = static_cast<const T*>(a);
    const T* pb = symmetric ? pa : static_cast<const T*>(b);
    Acc* po = static_cast<Acc*>(out);
    for (int64_t row_off = 0; row_off < tiles_n; row_off += kMaxGridYZ) {
      const int64_t rows = (tiles_n - row_off < kMaxGridYZ) ? tiles_n - row_off : kMaxGridYZ;
      dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(rows),
                static_cast<unsigned>(splits));
      LINFT_LAUNCH(grid, kThreads, 0, s, gram_kernel<T, Acc>)
      (pa, pb, po, N, M, P, k_per, row_off, symmetric ? 1 : 0);
      check_launch(op);
    }
  });
}

const char* gram_tensor_core_path() {
  using namespace cuda_detail;
  if (!mma_device("gram")) return "cuda cores";
  if (!wgmma_device("gram")) return "mma.sync";
  return wgmma_overlap() ? "wgmma overlap" : "wgmma";
}

const char* nvcc_version() {
#if defined(__CUDACC_VER_MAJOR__)
  return LINFT_STR(__CUDACC_VER_MAJOR__) "." LINFT_STR(__CUDACC_VER_MINOR__) "." LINFT_STR(
      __CUDACC_VER_BUILD__);
#else
  return "unknown";
#endif
}

const char* compiled_arch_list() {
#if defined(__CUDA_ARCH_LIST__)
  return LINFT_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace linft
