// psg_gram (csrc/README.md):
//   F_i = sum_t m1[i,t] g1[i,t,:]^T x1[i,t,:]   (d_out, d_in)
//   kernel 0: out[i, j] += <F_i, F_j>;  1: <sign F_i, sign F_j>;  2: <F_i, sign F_j>
//
// Two phases per chunk of the (d_out, d_in) plane, so that no F element is computed more than once
// (per side) however many pairs use it:
//
// Phase 1 builds the chunk [o0, o0 + co) x [d0, d0 + cd) of every sample's F, sign applied where the
// kernel asks, into a stream-ordered scratch (cudaMallocAsync) as row-major matrices F1 (N x co*cd)
// and, in the cross form, F2 (M x co*cd), stored in tile_dtype: out's dtype (entries summed in its
// precision), fp32 with an fp64 out, or the inputs' 16-bit dtype (entries summed in fp32 and rounded
// once; a sign is that of the stored value). Per sample this is a GEMM g^T x with K = tokens, both
// operands token-major in memory. Masked tokens are staged as 0 (never multiplied: NaN there cannot
// leak), so a fully padded sample gives F = 0.
//   psg_f_mma_kernel (bf16 / fp16 inputs summed in fp32, sm_80+): tensor cores. A block computes a
//     128 (o) x 128 (d) tile of one sample's chunk; 8 warps as 2 x 4, each a 64x32 sub-tile as
//     4 x 4 mma.sync m16n8k16 with fp32 accumulators. Tokens advance in chunks of 32 staged in
//     shared memory token-major ([t][o], [t][d], rows padded by 16 bytes) by plain 16-bit loads (any
//     shape, alignment or mask), and fragments come out by ldmatrix.trans.
//   psg_f_kernel (every other case): CUDA cores, 64x64 tiles, 4x4 micro-tiles per thread, tokens
//     in chunks of 16, accumulation in the output's precision (fp64 FMA for an fp64 out).
// Phase 2 adds the Gram of the chunk's rows into out with linft::cuda::gram on F as stored (16-bit F
// into an fp32 out: its tensor-core kernel): symmetric form (F1 F1^T, upper tiles mirrored) for sgd
// and signgd without a second operand, cross form F1 F2^T otherwise. asymmetric-signgd without a second operand builds F once
// and stores it twice (F1 = F, F2 = sign F).
//
// Chunk size: the scratch holds (rows of F1 + F2) x co*cd elements of F within a bound (256 MiB, or
// LINFT_CUDA_PSG_SCRATCH_BYTES), preferring whole rows of d_in and o extents in multiples of 128;
// it is never smaller than min(d_out, 128) x min(d_in, 8) elements per row (that floor exceeds the
// bound only for very many samples).
#include <cstdlib>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "linft/cuda_kernels.h"

namespace linft {
namespace cuda_detail {
namespace {

// The chunk of the (d_out, d_in) plane phase 1 builds: o in [o0, o0 + co), d in [d0, d0 + cd);
// F row e = (o - o0) * cd + (d - d0). tiles_d: the block tiles along d of the chunk.
struct PsgChunk {
  int64_t o0, d0, co, cd, tiles_d;
};

// Stages tokens [t0, t0 + K) of sample n: Gs[kk * LD + c] = g[n, t0 + kk, o0 + ol0 + c] and
// Xs[kk * LD + c] = x[n, t0 + kk, d0 + dl0 + c] for c < W, in S (the accumulator type, or uint16_t:
// the raw bits of a bf16 / fp16 input); consecutive threads walk along o / d. Tokens past nt or
// masked, and columns past the chunk, are S(0) (for uint16_t the bits of +0 in bf16 and fp16).
template <int K, int W, int LD, class S, class T>
__device__ __forceinline__ void stage_tokens(const T* __restrict__ x, const T* __restrict__ g,
                                             const std::uint8_t* __restrict__ m, int64_t n,
                                             int64_t nt, int64_t t0, int64_t d_in, int64_t d_out,
                                             const PsgChunk& ch, int64_t ol0, int64_t dl0,
                                             S* __restrict__ Gs, S* __restrict__ Xs, int tid) {
  static_assert((K * W) % kThreads == 0, "staging loop");
#pragma unroll 4
  for (int u = 0; u < (K * W) / kThreads; ++u) {
    const int idx = tid + u * kThreads;
    const int col = idx % W;
    const int kk = idx / W;
    const int64_t t = t0 + kk;
    const int64_t row = n * nt + t;  // only used when ok
    const bool ok = t < nt && (m == nullptr || m[row] != 0);
    const int64_t gi = row * d_out + ch.o0 + ol0 + col, xi = row * d_in + ch.d0 + dl0 + col;
    if constexpr (std::is_same_v<S, T>) {
      Gs[kk * LD + col] = (ok && ol0 + col < ch.co) ? g[gi] : S(0);
      Xs[kk * LD + col] = (ok && dl0 + col < ch.cd) ? x[xi] : S(0);
    } else {
      Gs[kk * LD + col] = (ok && ol0 + col < ch.co) ? load<S>(g, gi) : S(0);
      Xs[kk * LD + col] = (ok && dl0 + col < ch.cd) ? load<S>(x, xi) : S(0);
    }
  }
}

// ---------------------------------------------------------------- phase 1 on CUDA cores
constexpr int kF1Tile = 64;  // o x d tile edge
constexpr int kF1K = 16;     // tokens per staged chunk

// Block (blockIdx.x = tile of the chunk, blockIdx.y + sample_offset = sample n): writes F_n's tile
// into f (if not null) and sign(F_n) into fs (if not null), rows of co * cd.
template <class T, class Acc, class F>
__global__ void __launch_bounds__(kThreads)
psg_f_kernel(const T* __restrict__ x, const T* __restrict__ g, const std::uint8_t* __restrict__ m,
             int64_t nt, int64_t d_in, int64_t d_out, PsgChunk ch, F* __restrict__ f,
             F* __restrict__ fs, int64_t sample_offset) {
  const int64_t n = static_cast<int64_t>(blockIdx.y) + sample_offset;
  const int64_t ol0 = (static_cast<int64_t>(blockIdx.x) / ch.tiles_d) * kF1Tile;  // in the chunk
  const int64_t dl0 = (static_cast<int64_t>(blockIdx.x) % ch.tiles_d) * kF1Tile;

  // [token][o or d], padded against bank conflicts.
  __shared__ Acc Gs[kF1K][kF1Tile + 1];
  __shared__ Acc Xs[kF1K][kF1Tile + 1];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  Acc c[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int s = 0; s < 4; ++s) c[r][s] = Acc(0);

  for (int64_t t0 = 0; t0 < nt; t0 += kF1K) {
    // 16 tokens x 64 columns per operand, 4 elements per thread.
    stage_tokens<kF1K, kF1Tile, kF1Tile + 1>(x, g, m, n, nt, t0, d_in, d_out, ch, ol0, dl0, &Gs[0][0],
                                             &Xs[0][0], tid);
    __syncthreads();
    micro_tile_fma<kF1K, kF1Tile + 1>(Gs, Xs, c, tx, ty);
    __syncthreads();
  }

  const int64_t P = ch.co * ch.cd;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t ol = ol0 + ty + 16 * r;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int64_t dl = dl0 + tx + 16 * s;
      if (ol < ch.co && dl < ch.cd) {
        const int64_t e = n * P + ol * ch.cd + dl;
        if (f != nullptr) f[e] = from_acc<F>(c[r][s]);
        if (fs != nullptr) fs[e] = sign_as<F>(c[r][s]);
      }
    }
  }
}

// ---------------------------------------------------------------- phase 1 on tensor cores
constexpr int kF1MmaTile = 128;                 // o x d tile edge
constexpr int kF1MmaK = 32;                     // tokens per staged chunk
constexpr int kF1MmaLd = kF1MmaTile + 8;        // shared row: 128 elements + 16 bytes of padding
constexpr int kF1MmaStageElems = 2 * kF1MmaK * kF1MmaLd;  // g and x tokens of one stage
constexpr size_t kF1MmaSmemBytes = sizeof(uint16_t) * kF1MmaStageElems;  // 17408
constexpr int kF1MmaStages = 3;                 // cp.async pipeline depth (the Async form)
constexpr size_t kF1MmaAsyncSmemBytes = kF1MmaStages * kF1MmaSmemBytes;  // 52224: opt-in above 48 KiB
constexpr int kF1MmaWarpM = 64;                 // warp sub-tile: 64 o x 32 d
constexpr int kF1MmaWarpN = 32;
static_assert((kF1MmaLd * 2) % 16 == 0, "shared rows must keep 16-byte alignment for ldmatrix");
static_assert(kThreads == 256, "psg_f_mma_kernel's warp grid (2 x 4) assumes 8 warps");

// Copies tokens [t0, t0 + 32) of sample n into one stage ([token][o] then [token][d], kF1MmaLd per
// row) by 16-byte cp.async copies: 16 per token row and operand, 4 per thread. Tokens past nt or
// masked, and 8-column groups past the chunk, are zero-filled (never read from memory). Needs
// 16-byte aligned rows: d_in, d_out, the chunk's origin and extents multiples of 8.
template <class T>
__device__ __forceinline__ void psg_load_stage(uint16_t* __restrict__ stage, const T* __restrict__ x,
                                               const T* __restrict__ g, const std::uint8_t* __restrict__ m,
                                               int64_t n, int64_t nt, int64_t t0, int64_t d_in,
                                               int64_t d_out, const PsgChunk& ch, int64_t ol0,
                                               int64_t dl0, int tid) {
  constexpr int kGroups = kF1MmaTile / 8;  // 16-byte groups per token row
  static_assert((kF1MmaK * kGroups) % kThreads == 0, "copy loop");
#pragma unroll
  for (int r = 0; r < (kF1MmaK * kGroups) / kThreads; ++r) {
    const int c = tid + r * kThreads;
    const int kk = c / kGroups, col = (c % kGroups) * 8;
    const int64_t t = t0 + kk;
    const int64_t row = n * nt + t;  // only used when ok
    const bool ok = t < nt && (m == nullptr || m[row] != 0);
    const bool g_ok = ok && ol0 + col < ch.co, x_ok = ok && dl0 + col < ch.cd;
    cp_async16(stage + kk * kF1MmaLd + col, g_ok ? g + row * d_out + ch.o0 + ol0 + col : g, g_ok ? 16 : 0);
    cp_async16(stage + (kF1MmaK + kk) * kF1MmaLd + col, x_ok ? x + row * d_in + ch.d0 + dl0 + col : x,
               x_ok ? 16 : 0);
  }
}

// Same blocks and outputs as psg_f_kernel (fp32 sums stored as F: fp32 or T), tiles of 128.
// Async = false: each chunk of 32 tokens staged by plain 16-bit loads (any shape, alignment or
// mask), one buffer. Async = true: 16-byte cp.async copies, kF1MmaStages deep (the copy of chunk
// k+2 overlaps the mma of chunk k), under psg_load_stage's alignment conditions.
template <class T, class F, bool Async>
__global__ void __launch_bounds__(kThreads)
psg_f_mma_kernel(const T* __restrict__ x, const T* __restrict__ g,
                 const std::uint8_t* __restrict__ m, int64_t nt, int64_t d_in, int64_t d_out,
                 PsgChunk ch, F* __restrict__ f, F* __restrict__ fs, int64_t sample_offset) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass and emulation: the body parses
  const int64_t n = static_cast<int64_t>(blockIdx.y) + sample_offset;
  const int64_t ol0 = (static_cast<int64_t>(blockIdx.x) / ch.tiles_d) * kF1MmaTile;
  const int64_t dl0 = (static_cast<int64_t>(blockIdx.x) % ch.tiles_d) * kF1MmaTile;

  LINFT_DYNAMIC_SMEM(smem_raw);
  uint16_t* smem = reinterpret_cast<uint16_t*>(smem_raw);  // stages of [token][o], then [token][d]
  const uint16_t* g16 = reinterpret_cast<const uint16_t*>(g);
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = (warp >> 2) * kF1MmaWarpM;  // warp grid 2 (o) x 4 (d)
  const int wn = (warp & 3) * kF1MmaWarpN;

  float acc[4][4][4];
  zero_warp_tile(acc);

  // ldmatrix.trans row of this lane: row lane % 8 of stored matrix lane / 8 (8 tokens x 8 columns).
  //   A (16 o x 16 k per m tile): matrices (o 0-7, k 0-7), (o 8-15, k 0-7), (o 0-7, k 8-15),
  //   (o 8-15, k 8-15) -> a[0..3].  B (two n8 tiles x k16): (k 0-7, n 0-7), (k 8-15, n 0-7),
  //   (k 0-7, n 8-15), (k 8-15, n 8-15) -> b[0..1] of tile 2p, b[0..1] of tile 2p + 1.
  const int lm = lane >> 3, lr = lane & 7;
  const int a_k = (lm >> 1) * 8 + lr, a_col = wm + (lm & 1) * 8;
  const int b_k = (lm & 1) * 8 + lr, b_col = wn + (lm >> 1) * 8;

  // acc += the products of one staged chunk of 32 tokens.
  auto mma_chunk = [&](const uint16_t* Gs, const uint16_t* Xs) {
#pragma unroll
    for (int ks = 0; ks < kF1MmaK; ks += 16) {
      uint32_t af[4][4], bx4[2][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) ldmatrix_x4_trans(af[mt], Gs + (ks + a_k) * kF1MmaLd + a_col + mt * 16);
#pragma unroll
      for (int np = 0; np < 2; ++np) ldmatrix_x4_trans(bx4[np], Xs + (ks + b_k) * kF1MmaLd + b_col + np * 16);
      mma_warp_tile<T>(acc, af, bx4);
    }
  };

  if constexpr (Async) {
    const int num_k = static_cast<int>((nt + kF1MmaK - 1) / kF1MmaK);
    cp_async_pipeline<kF1MmaStages>(
        num_k,
        [&](int kt, int st) {
          psg_load_stage(smem + st * kF1MmaStageElems, x, g, m, n, nt, int64_t(kt) * kF1MmaK, d_in, d_out,
                         ch, ol0, dl0, tid);
        },
        [&](int st) {
          const uint16_t* stage = smem + st * kF1MmaStageElems;
          mma_chunk(stage, stage + kF1MmaK * kF1MmaLd);
        });
  } else {
    uint16_t* Gs = smem;                     // [token][o]
    uint16_t* Xs = smem + kF1MmaK * kF1MmaLd;  // [token][d]
    for (int64_t t0 = 0; t0 < nt; t0 += kF1MmaK) {
      // 32 tokens x 128 columns per operand as raw 16-bit values, 16 elements per thread.
      stage_tokens<kF1MmaK, kF1MmaTile, kF1MmaLd>(x16, g16, m, n, nt, t0, d_in, d_out, ch, ol0, dl0,
                                                  Gs, Xs, tid);
      __syncthreads();
      mma_chunk(Gs, Xs);
      __syncthreads();
    }
  }

  // Epilogue. Lane (g, t) holds rows (o) g and g + 8, columns (d) 2t and 2t + 1 of every 16x8 tile.
  const int gq = lane >> 2, t4 = lane & 3;
  const int64_t P = ch.co * ch.cd;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t ol = ol0 + wm + mt * 16 + gq + (q >> 1) * 8;
#pragma unroll
      for (int nt8 = 0; nt8 < 4; ++nt8) {
        const int64_t dl = dl0 + wn + nt8 * 8 + 2 * t4 + (q & 1);
        if (ol >= ch.co || dl >= ch.cd) continue;
        const int64_t e = n * P + ol * ch.cd + dl;
        const float v = acc[mt][nt8][q];
        if (f != nullptr) f[e] = from_acc<F>(v);
        if (fs != nullptr) fs[e] = sign_as<F>(v);
      }
    }
#else
  __trap();  // the launcher never picks this kernel below sm_80
#endif
}

// ---------------------------------------------------------------- host side
constexpr size_t kScratchBytes = size_t(256) << 20;
constexpr int64_t kChunkAlign = 128;  // o / d extents of a partial chunk: multiples of the mma tile

// LINFT_CUDA_PSG_SCRATCH_BYTES (read on every call: tests force small chunks), else 256 MiB.
size_t scratch_bound() {
  const char* e = std::getenv("LINFT_CUDA_PSG_SCRATCH_BYTES");
  if (e == nullptr || *e == '\0') return kScratchBytes;
  const long long v = std::atoll(e);
  return v > 0 ? static_cast<size_t>(v) : kScratchBytes;
}

// (co, cd) of the chunks for `rows` F rows of `esize` bytes within `bound` bytes (see the top).
void chunk_shape(int64_t d_out, int64_t d_in, int64_t rows, size_t esize, size_t bound,
                 int64_t& co, int64_t& cd) {
  const int64_t elems = static_cast<int64_t>(bound / (static_cast<size_t>(rows) * esize));
  const int64_t co_min = d_out < kChunkAlign ? d_out : kChunkAlign;
  if (d_out <= elems / d_in) {  // the whole plane
    co = d_out;
    cd = d_in;
  } else if (co_min <= elems / d_in) {  // whole rows of d_in: then co >= 128
    cd = d_in;
    co = elems / d_in;
    co -= co % kChunkAlign;
  } else {
    co = co_min;
    cd = elems / co;
    if (cd >= kChunkAlign) cd -= cd % kChunkAlign;
    const int64_t cd_min = d_in < 8 ? d_in : 8;
    if (cd < cd_min) cd = cd_min;
  }
}

// Phase 1 of one side: F rows of the chunk for samples [0, n_samples) into f / fs (either may be 0),
// each entry summed in Acc and stored as F.
template <class Tin, class Acc, class F>
void build_f(const Tin* x, const Tin* g, const std::uint8_t* m, int64_t n_samples, int64_t nt,
             int64_t d_in, int64_t d_out, PsgChunk ch, F* f, F* fs, bool use_mma,
             cudaStream_t s, const char* op) {
  for (int64_t off = 0; off < n_samples; off += kMaxGridYZ) {
    const int64_t ny = (n_samples - off < kMaxGridYZ) ? n_samples - off : kMaxGridYZ;
    if constexpr (std::is_same_v<Acc, float> &&
                  (std::is_same_v<Tin, __nv_bfloat16> || std::is_same_v<Tin, __half>)) {
      if (use_mma) {
        ch.tiles_d = ceil_div(ch.cd, kF1MmaTile);
        dim3 grid(static_cast<unsigned>(ceil_div(ch.co, kF1MmaTile) * ch.tiles_d),
                  static_cast<unsigned>(ny));
        // 16-byte copies: every token row of the chunk starts and ends on a 16-byte boundary
        const bool async = d_in % 8 == 0 && d_out % 8 == 0 && ch.o0 % 8 == 0 && ch.d0 % 8 == 0 &&
                           ch.co % 8 == 0 && ch.cd % 8 == 0 &&
                           reinterpret_cast<std::uintptr_t>(x) % 16 == 0 &&
                           reinterpret_cast<std::uintptr_t>(g) % 16 == 0;
        if (async) {
          check_cuda(cudaFuncSetAttribute(psg_f_mma_kernel<Tin, F, true>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(kF1MmaAsyncSmemBytes)),
                     op, "cudaFuncSetAttribute");
          LINFT_LAUNCH(grid, kThreads, kF1MmaAsyncSmemBytes, s, psg_f_mma_kernel<Tin, F, true>)
          (x, g, m, nt, d_in, d_out, ch, f, fs, off);
        } else {
          LINFT_LAUNCH(grid, kThreads, kF1MmaSmemBytes, s, psg_f_mma_kernel<Tin, F, false>)
          (x, g, m, nt, d_in, d_out, ch, f, fs, off);
        }
        check_launch(op);
        continue;
      }
    }
    ch.tiles_d = ceil_div(ch.cd, kF1Tile);
    dim3 grid(static_cast<unsigned>(ceil_div(ch.co, kF1Tile) * ch.tiles_d), static_cast<unsigned>(ny));
    LINFT_LAUNCH(grid, kThreads, 0, s, psg_f_kernel<Tin, Acc, F>)(x, g, m, nt, d_in, d_out, ch, f, fs, off);
    check_launch(op);
  }
}

// The dtype code of F.
template <class F>
constexpr int dtype_code() {
  if constexpr (std::is_same_v<F, float>) return kFloat32;
  else if constexpr (std::is_same_v<F, double>) return kFloat64;
  else if constexpr (std::is_same_v<F, __half>) return kFloat16;
  else return kBFloat16;
}

// Both phases over every chunk of the (d_out, d_in) plane with F entries summed in Acc and stored as
// F (the scratch's element type and the dtype of phase 2's Gram).
template <class Tin, class Acc, class F>
void run_chunks(const Tin* x1, const Tin* g1, const std::uint8_t* m1, const Tin* x2, const Tin* g2,
                const std::uint8_t* m2, void* out, int64_t N, int64_t M, int64_t T, int64_t S,
                int64_t d_in, int64_t d_out, int out_dtype, int kernel, bool mma, cudaStream_t s,
                const char* op) {
  const bool self = (x2 == nullptr);
  const bool symmetric = self && kernel != kAsymmetricSignGD;  // <F_i, sign F_j> is not symmetric
  const bool sign1 = (kernel == kSignGD);
  const bool sign2 = (kernel != kSGD);
  const int64_t rows = symmetric ? N : N + M;
  int64_t co = 0, cd = 0;
  chunk_shape(d_out, d_in, rows, sizeof(F), scratch_bound(), co, cd);
  Scratch scratch{nullptr, s};
  check_cuda(cudaMallocAsync(&scratch.p, sizeof(F) * static_cast<size_t>(rows * co * cd), s), op,
             "cudaMallocAsync (F scratch)");
  for (int64_t o0 = 0; o0 < d_out; o0 += co)
    for (int64_t d0 = 0; d0 < d_in; d0 += cd) {
      const PsgChunk ch{o0, d0, (d_out - o0 < co) ? d_out - o0 : co, (d_in - d0 < cd) ? d_in - d0 : cd, 0};
      const int64_t P = ch.co * ch.cd;
      F* F1 = static_cast<F*>(scratch.p);
      F* F2 = symmetric ? nullptr : F1 + N * P;
      if (self) {  // one pass over the input; asymmetric-signgd keeps F and sign F
        build_f<Tin, Acc, F>(x1, g1, m1, N, T, d_in, d_out, ch, sign1 ? nullptr : F1,
                             sign1 ? F1 : (symmetric ? nullptr : F2), mma, s, op);
      } else {
        build_f<Tin, Acc, F>(x1, g1, m1, N, T, d_in, d_out, ch, sign1 ? nullptr : F1,
                             sign1 ? F1 : nullptr, mma, s, op);
        build_f<Tin, Acc, F>(x2, g2, m2, M, S, d_in, d_out, ch, sign2 ? nullptr : F2,
                             sign2 ? F2 : nullptr, mma, s, op);
      }
      linft::cuda::gram(F1, F2, out, N, M, P, dtype_code<F>(), out_dtype, reinterpret_cast<std::uintptr_t>(s));
    }
  void* p = scratch.p;
  scratch.p = nullptr;
  check_cuda(cudaFreeAsync(p, s), op, "cudaFreeAsync (F scratch)");
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

void psg_gram(const void* x1, const void* g1, const std::uint8_t* m1, const void* x2,
              const void* g2, const std::uint8_t* m2, void* out, int64_t N, int64_t M, int64_t T,
              int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype, int kernel,
              int tile_dtype, std::uintptr_t stream) {
  using namespace cuda_detail;
  const char* op = "psg_gram";
  require(N >= 0 && M >= 0 && T >= 0 && S >= 0 && d_in >= 0 && d_out >= 0, op, "negative size");
  require(kernel == kSGD || kernel == kSignGD || kernel == kAsymmetricSignGD, op,
          "kernel must be 0 (sgd), 1 (signgd) or 2 (asymmetric-signgd), got " +
              std::to_string(kernel));
  dispatch_types(dtype, out_dtype, op, [](auto, auto) {});
  if (tile_dtype < 0) tile_dtype = out_dtype;
  const bool half_in = (dtype == kBFloat16 || dtype == kFloat16);
  require(tile_dtype == out_dtype || (tile_dtype == kFloat32 && out_dtype == kFloat64) ||
              (half_in && tile_dtype == dtype),
          op, "tile_dtype code must be out_dtype, 0 (fp32) with an fp64 out, or the inputs' 16-bit "
              "dtype, got " + std::to_string(tile_dtype));
  // T == 0 or S == 0 makes F zero, hence every kernel zero (sign(0) = 0).
  if (N == 0 || M == 0 || T == 0 || S == 0 || d_in == 0 || d_out == 0) return;
  require(x1 != nullptr && g1 != nullptr && out != nullptr, op, "null pointer");
  if (x2 == nullptr) {
    require(M == N && S == T, op, "x2 == 0 (second operand = first) needs M == N and S == T");
  } else {
    require(g2 != nullptr, op, "g2 is null while x2 is not");
  }

  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  // Phase 1 on tensor cores: 16-bit inputs whose F entries are summed in fp32 (an fp32 out, or
  // coarser tiles than an fp64 out).
  const bool mma = half_in && (out_dtype == kFloat32 || tile_dtype != out_dtype) && mma_device(op);
  dispatch_types(dtype, out_dtype, op, [&](auto ttag, auto atag) {
    using Tin = typename decltype(ttag)::type;
    using Acc = typename decltype(atag)::type;
    const Tin *px1 = static_cast<const Tin*>(x1), *pg1 = static_cast<const Tin*>(g1);
    const Tin *px2 = static_cast<const Tin*>(x2), *pg2 = static_cast<const Tin*>(g2);
    if (tile_dtype == out_dtype) {  // F in out's precision
      run_chunks<Tin, Acc, Acc>(px1, pg1, m1, px2, pg2, m2, out, N, M, T, S, d_in, d_out, out_dtype,
                                kernel, mma, s, op);
    } else if (tile_dtype == kFloat32) {  // fp32 F, its Gram in fp64
      run_chunks<Tin, float, float>(px1, pg1, m1, px2, pg2, m2, out, N, M, T, S, d_in, d_out,
                                    out_dtype, kernel, mma, s, op);
    } else if constexpr (std::is_same_v<Tin, __nv_bfloat16> || std::is_same_v<Tin, __half>) {
      // F rounded once to the inputs' dtype: phase 2 is a 16-bit Gram (tensor cores into fp32)
      run_chunks<Tin, float, Tin>(px1, pg1, m1, px2, pg2, m2, out, N, M, T, S, d_in, d_out,
                                  out_dtype, kernel, mma, s, op);
    }
  });
}

}  // namespace cuda
}  // namespace linft
