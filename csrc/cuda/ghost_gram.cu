// ghost_gram (csrc/README.md):
//   out[i, j] += sum_{t<T, s<S} m1[i,t] m2[j,s] (x1[i,t,:] . x2[j,s,:]) (g1[i,t,:] . g2[j,s,:])
//
// Two kernels; the launcher picks one per call. Neither writes a T x S product to memory.
//
// ghost_gram_mma_kernel (bf16 / fp16 inputs, fp32 out, sm_80+, d_in and d_out multiples of 8, all
// operands 16-byte aligned): tensor cores over the token product. The rows of x1 (N*T of them) and
// x2 (M*S) are the rows of two matrices; a block takes one 64 x 128 tile of X1 X2^T and the same
// tile of G1 G2^T with mma.cuh's MmaBlock<2> (8 warps of 32x32 sub-tiles, 16-byte cp.async copies
// in a 3-stage pipeline, ldmatrix, mma.sync m16n8k16 into fp32 registers: 2 x 32 accumulators per
// thread), multiplies them entry by entry in registers and sums each kept entry (t, s) into the bin
// of its sample pair (t / T, s / S) in shared memory; the bins are then added into out atomically.
// A tile may hold part of one pair (long sequences) or many whole pairs (short ones), so short
// sequences do not pad the tensor-core tiles. Masked tokens are multiplied (a tensor-core product
// cannot skip rows) but their entries are never read: entry (t, s) depends only on rows t and s, so
// NaN there cannot leak. Symmetric form: only tiles reaching t <= s run, each entry t < s stands for
// its mirror too, and the bins go to an N x N workspace that ghost_mirror_kernel adds into out[i, j]
// and out[j, i] from the one value (exactly symmetric; up to N = 8192, beyond that directly into out).
// The atomic adds make the summation order, and so the last bits, vary run to run.
//
// ghost_gram_kernel (every other case): CUDA cores, one block per sample pair (i, j) (and per slice
// of its t tiles when there are few pairs). For each 32x32 (t, s) tile the block forms the
// activation product X1 X2^T and the gradient product G1 G2^T in registers (d chunks of 32 staged
// in shared memory; each of the 256 threads owns the 2x2 elements t = ty + 16*r, s = tx + 16*c),
// multiplies them elementwise, keeps unmasked entries (masked tokens are skipped, not multiplied
// by 0, so garbage there cannot leak in) and sums, accumulating in the output's precision. Its t tiles are what gets split over blocks.
#include <algorithm>

#include "common.cuh"
#include "mma.cuh"
#include "linft/cuda_kernels.h"

namespace linft {
namespace cuda_detail {
namespace {

constexpr int kGhostTile = 32;  // t and s tile edge
constexpr int kGhostK = 32;     // feature chunk

// r[a][c] += sum_k p[p0 + ty + 16a, k] * q[q0 + tx + 16c, k] over k < d, with p (np, d), q (nq, d)
// the rows of one sample. Rows past np / nq read as 0. Contains barriers: call uniformly.
template <class T, class Acc>
__device__ __forceinline__ void tile_products(const T* __restrict__ p, const T* __restrict__ q,
                                              int64_t np, int64_t nq, int64_t d, int64_t p0,
                                              int64_t q0, Acc (*Ps)[kGhostTile + 1],
                                              Acc (*Qs)[kGhostTile + 1], Acc (&r)[2][2]) {
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  for (int64_t k0 = 0; k0 < d; k0 += kGhostK) {
    // 32 rows x 32 k per operand, 4 elements per thread; consecutive threads walk along k.
#pragma unroll
    for (int u = 0; u < (kGhostTile * kGhostK) / kThreads; ++u) {
      const int idx = tid + u * kThreads;
      const int kk = idx % kGhostK;
      const int row = idx / kGhostK;
      const int64_t k = k0 + kk;
      const int64_t pr = p0 + row;
      const int64_t qr = q0 + row;
      Ps[kk][row] = (pr < np && k < d) ? load<Acc>(p, pr * d + k) : Acc(0);
      Qs[kk][row] = (qr < nq && k < d) ? load<Acc>(q, qr * d + k) : Acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kGhostK; ++kk) {
      const Acc p_0 = Ps[kk][ty];
      const Acc p_1 = Ps[kk][ty + 16];
      const Acc q_0 = Qs[kk][tx];
      const Acc q_1 = Qs[kk][tx + 16];
      r[0][0] += p_0 * q_0;
      r[0][1] += p_0 * q_1;
      r[1][0] += p_1 * q_0;
      r[1][1] += p_1 * q_1;
    }
    __syncthreads();
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads)
ghost_gram_kernel(const T* __restrict__ x1, const T* __restrict__ g1,
                  const std::uint8_t* __restrict__ m1, const T* __restrict__ x2,
                  const T* __restrict__ g2, const std::uint8_t* __restrict__ m2,
                  Acc* __restrict__ out, int64_t N, int64_t M, int64_t nt, int64_t ns, int64_t d_in,
                  int64_t d_out, int64_t row_offset, int symmetric) {
  const int64_t i = static_cast<int64_t>(blockIdx.y) + row_offset;
  const int64_t j = static_cast<int64_t>(blockIdx.x);
  if (i >= N || j >= M) return;      // whole block (not expected with the launcher's grid)
  if (symmetric && j < i) return;    // whole block: uniform, before any barrier

  __shared__ Acc Ps[kGhostK][kGhostTile + 1];
  __shared__ Acc Qs[kGhostK][kGhostTile + 1];
  __shared__ Acc red[kThreads];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;

  const T* xi = x1 + i * nt * d_in;
  const T* gi = g1 + i * nt * d_out;
  const T* xj = x2 + j * ns * d_in;
  const T* gj = g2 + j * ns * d_out;
  const std::uint8_t* mi = m1 ? m1 + i * nt : nullptr;
  const std::uint8_t* mj = m2 ? m2 + j * ns : nullptr;

  Acc total = Acc(0);
  const int64_t n_ttiles = (nt + kGhostTile - 1) / kGhostTile;
  for (int64_t tt = blockIdx.z; tt < n_ttiles; tt += gridDim.z) {
    const int64_t t0 = tt * kGhostTile;
    for (int64_t s0 = 0; s0 < ns; s0 += kGhostTile) {
      Acc xp[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
      Acc gp[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
      tile_products<T, Acc>(xi, xj, nt, ns, d_in, t0, s0, Ps, Qs, xp);
      tile_products<T, Acc>(gi, gj, nt, ns, d_out, t0, s0, Ps, Qs, gp);
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const int64_t t = t0 + ty + 16 * a;
        const bool t_ok = t < nt && (mi == nullptr || mi[t] != 0);
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t s = s0 + tx + 16 * c;
          const bool s_ok = s < ns && (mj == nullptr || mj[s] != 0);
          if (t_ok && s_ok) total += xp[a][c] * gp[a][c];
        }
      }
    }
  }

  red[tid] = total;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off /= 2) {
    if (tid < off) red[tid] += red[tid + off];
    __syncthreads();
  }
  if (tid == 0) {
    const Acc v = red[0];
    const bool atomic = gridDim.z > 1;
    add_out(out, i * M + j, v, atomic);
    if (symmetric && i != j) add_out(out, j * M + i, v, atomic);  // symmetric: M == N
  }
}

// ---------------------------------------------------------------- tensor-core path
using GhostMma = MmaBlock<2>;  // 64 x 128 tiles of the token product, 45 KiB of shared memory
static_assert(sizeof(float) * GhostMma::kRows * GhostMma::kCols <= GhostMma::kSmemBytes,
              "the pair bins of a tile (at most one per entry) fit in the staging memory");

// Block (blockIdx.x, blockIdx.y + tile_row_offset): the tile [r0, r0 + 64) x [c0, c0 + 128) of the
// token product over rows X1 (N*nt x d_in) and X2 (M*ns x d_in), and of G1 G2^T alike. Entry (t, s)
// belongs to the sample pair (t / nt, s / ns); the tile's pairs get one bin each in shared memory.
// Symmetric form: only entries with t <= s count (tiles wholly below the diagonal return at once);
// an entry t < s stands for (s, t) too and t == s is counted half, so a bin (i, j), i <= j, is added
// into ws[i, j] (twice when i == j; ghost_mirror_kernel then adds ws into out[i, j] and out[j, i]),
// or without ws into out[i, j] and out[j, i] directly.
template <class T>
__global__ void __launch_bounds__(kThreads)
ghost_gram_mma_kernel(const T* __restrict__ x1, const T* __restrict__ g1,
                      const std::uint8_t* __restrict__ m1, const T* __restrict__ x2,
                      const T* __restrict__ g2, const std::uint8_t* __restrict__ m2,
                      float* __restrict__ out, float* __restrict__ ws, int64_t N, int64_t M,
                      int64_t nt, int64_t ns, int64_t d_in, int64_t d_out, int64_t tile_row_offset,
                      int symmetric) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass and emulation: the body parses
  const int64_t r0 = (static_cast<int64_t>(blockIdx.y) + tile_row_offset) * GhostMma::kRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * GhostMma::kCols;
  if (symmetric && c0 + GhostMma::kCols <= r0) return;  // whole block: uniform, before any barrier
  const int64_t rows = N * nt, cols = M * ns;

  LINFT_DYNAMIC_SMEM(smem_raw);
  const int tid = static_cast<int>(threadIdx.x);
  float xp[2][4][4], gp[2][4][4];
  zero_warp_tile(xp);
  zero_warp_tile(gp);
  uint16_t* stages = reinterpret_cast<uint16_t*>(smem_raw);
  GhostMma::product(xp, x1, x2, rows, cols, d_in, r0, c0, 0, d_in, stages, tid);
  GhostMma::product(gp, g1, g2, rows, cols, d_out, r0, c0, 0, d_out, stages, tid);

  // The pair bins (the staging memory is free: product() ends with a barrier).
  const int64_t pr0 = r0 / nt, pc0 = c0 / ns;
  const int64_t r_last = (r0 + GhostMma::kRows < rows ? r0 + GhostMma::kRows : rows) - 1;
  const int64_t c_last = (c0 + GhostMma::kCols < cols ? c0 + GhostMma::kCols : cols) - 1;
  const int nb_c = static_cast<int>(c_last / ns - pc0 + 1);
  const int nbins = static_cast<int>(r_last / nt - pr0 + 1) * nb_c;
  float* bins = reinterpret_cast<float*>(smem_raw);
  for (int b = tid; b < nbins; b += kThreads) bins[b] = 0.f;
  __syncthreads();

  // Lane (g, t4) holds rows g, g + 8 and columns 2 t4, 2 t4 + 1 of every 16x8 tile: 4 rows x 8
  // columns per thread. Kept entries are summed in registers while the bin stays the same (every
  // lane reaches the shuffles below: the loops only skip entries).
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t wr = r0 + GhostMma::warp_row(warp) + (lane >> 2);
  const int64_t wc = c0 + GhostMma::warp_col(warp) + 2 * (lane & 3);
  int64_t s_of[4][2];
  int col_bin[4][2];  // -1: column dropped (past the end or masked)
#pragma unroll
  for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t s = wc + n8 * 8 + c;
      s_of[n8][c] = s;
      const bool ok = s < cols && (m2 == nullptr || m2[s] != 0);
      col_bin[n8][c] = ok ? static_cast<int>(s / ns - pc0) : -1;
    }
  int cur = -1;
  float run = 0.f;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t t = wr + mt * 16 + h * 8;
      if (t >= rows || (m1 != nullptr && m1[t] == 0)) continue;
      const int row_bin = static_cast<int>(t / nt - pr0) * nb_c;
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (col_bin[n8][c] < 0 || (symmetric && t > s_of[n8][c])) continue;
          float v = xp[mt][n8][h * 2 + c] * gp[mt][n8][h * 2 + c];
          if (symmetric && t == s_of[n8][c]) v *= 0.5f;
          const int b = row_bin + col_bin[n8][c];
          if (b != cur) {
            if (cur >= 0) atomicAdd(bins + cur, run);
            cur = b;
            run = 0.f;
          }
          run += v;
        }
    }
  // The last run: when every lane of the warp ends in one bin (a tile inside one pair: long
  // sequences) the warp sums its runs by shuffles and adds once, instead of 32 atomics on one address.
  const int lead = __shfl_sync(0xFFFFFFFFu, cur, 0);
  int same = cur == lead;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) same &= __shfl_xor_sync(0xFFFFFFFFu, same, off);
  if (same) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) run += __shfl_xor_sync(0xFFFFFFFFu, run, off);
    if (lane == 0 && cur >= 0) atomicAdd(bins + cur, run);
  } else if (cur >= 0) {
    atomicAdd(bins + cur, run);
  }
  __syncthreads();

  for (int b = tid; b < nbins; b += kThreads) {
    const float v = bins[b];
    if (v == 0.f) continue;  // pairs the tile does not reach (and exact zeros: nothing to add)
    const int64_t i = pr0 + b / nb_c, j = pc0 + b % nb_c;  // i <= j in the symmetric form
    if (!symmetric) {
      atomicAdd(out + i * M + j, v);
    } else if (ws != nullptr) {  // the upper triangle, added into out mirrored afterwards
      atomicAdd(ws + i * M + j, i == j ? 2.f * v : v);
    } else if (i == j) {
      atomicAdd(out + i * M + i, 2.f * v);
    } else {
      atomicAdd(out + i * M + j, v);
      atomicAdd(out + j * M + i, v);
    }
  }
#else
  __trap();  // the launcher never picks this kernel below sm_80
#endif
}

// out[i, j] += ws[i, j] and out[j, i] += ws[i, j] for i < j, out[i, i] += ws[i, i] (N x N): every
// element of out has one writer, so a symmetric out stays exactly symmetric.
__global__ void __launch_bounds__(kThreads)
ghost_mirror_kernel(const float* __restrict__ ws, float* __restrict__ out, int64_t N) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < N * N; e += stride) {
    const int64_t i = e / N, j = e % N;
    if (i > j) continue;
    out[e] += ws[e];
    if (i != j) out[j * N + i] += ws[e];
  }
}

// Symmetric outputs of at most this many bytes take the workspace (N <= 8192); larger ones are
// added into directly (out[i, j] and out[j, i] may then differ in the last bits).
constexpr size_t kMirrorBytes = size_t(256) << 20;

// Launches ghost_gram_mma_kernel over the tiles of the token product (row tiles chunked by the
// grid's y limit), and for the symmetric form the mirror of its workspace.
template <class Tin>
void ghost_mma_launch(const void* x1, const void* g1, const std::uint8_t* m1, const void* x2,
                      const void* g2, const std::uint8_t* m2, void* out, int64_t N, int64_t M,
                      int64_t T, int64_t S, int64_t d_in, int64_t d_out, bool symmetric,
                      cudaStream_t s, const char* op) {
  static_assert(GhostMma::kSmemBytes <= 48 * 1024, "within the default dynamic shared memory limit");
  const int64_t tiles_r = ceil_div(N * T, GhostMma::kRows), tiles_c = ceil_div(M * S, GhostMma::kCols);
  require(tiles_c <= kMaxGridX, op, "M * S too large");
  const size_t ws_bytes = sizeof(float) * static_cast<size_t>(N * N);
  Scratch scratch{nullptr, s};
  if (symmetric && ws_bytes <= kMirrorBytes) {
    if (cudaMallocAsync(&scratch.p, ws_bytes, s) == cudaSuccess) {
      check_cuda(cudaMemsetAsync(scratch.p, 0, ws_bytes, s), op, "cudaMemsetAsync (symmetric workspace)");
    } else {  // short of memory: the bins go straight into out (correct, maybe not bitwise symmetric)
      scratch.p = nullptr;
      (void)cudaGetLastError();
    }
  }
  float* ws = static_cast<float*>(scratch.p);
  for (int64_t row_off = 0; row_off < tiles_r; row_off += kMaxGridYZ) {
    const int64_t rows = (tiles_r - row_off < kMaxGridYZ) ? tiles_r - row_off : kMaxGridYZ;
    dim3 grid(static_cast<unsigned>(tiles_c), static_cast<unsigned>(rows));
    LINFT_LAUNCH(grid, kThreads, GhostMma::kSmemBytes, s, ghost_gram_mma_kernel<Tin>)
    (static_cast<const Tin*>(x1), static_cast<const Tin*>(g1), m1, static_cast<const Tin*>(x2),
     static_cast<const Tin*>(g2), m2, static_cast<float*>(out), ws, N, M, T, S, d_in, d_out, row_off,
     symmetric ? 1 : 0);
    check_launch(op);
  }
  if (ws != nullptr) {
    const int64_t blocks = std::min<int64_t>(ceil_div(N * N, kThreads), 4096);
    LINFT_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, s, ghost_mirror_kernel)
    (ws, static_cast<float*>(out), N);
    check_launch(op);
    scratch.p = nullptr;
    check_cuda(cudaFreeAsync(ws, s), op, "cudaFreeAsync (symmetric workspace)");
  }
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

void ghost_gram(const void* x1, const void* g1, const std::uint8_t* m1, const void* x2,
                const void* g2, const std::uint8_t* m2, void* out, int64_t N, int64_t M, int64_t T,
                int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype,
                std::uintptr_t stream) {
  using namespace cuda_detail;
  const char* op = "ghost_gram";
  require(N >= 0 && M >= 0 && T >= 0 && S >= 0 && d_in >= 0 && d_out >= 0, op, "negative size");
  dispatch_types(dtype, out_dtype, op, [](auto, auto) {});
  if (N == 0 || M == 0 || T == 0 || S == 0 || d_in == 0 || d_out == 0) return;
  require(x1 != nullptr && g1 != nullptr && out != nullptr, op, "null pointer");
  const bool symmetric = (x2 == nullptr);
  if (symmetric) {
    require(M == N && S == T, op, "symmetric form (x2 == 0) needs M == N and S == T");
    x2 = x1;
    g2 = g1;
    m2 = m1;
  } else {
    require(g2 != nullptr, op, "g2 is null while x2 is not");
  }
  require(M <= kMaxGridX, op, "M too large");

  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);

  // Tensor cores: 16-bit inputs, fp32 out, rows of 16-byte multiples at 16-byte aligned addresses.
  auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const bool mma_shape = (dtype == kBFloat16 || dtype == kFloat16) && out_dtype == kFloat32 &&
                         d_in % 8 == 0 && d_out % 8 == 0 && aligned(x1) && aligned(g1) &&
                         aligned(x2) && aligned(g2);
  if (mma_shape && mma_device(op)) {
    if (dtype == kBFloat16)
      ghost_mma_launch<__nv_bfloat16>(x1, g1, m1, x2, g2, m2, out, N, M, T, S, d_in, d_out, symmetric, s, op);
    else
      ghost_mma_launch<__half>(x1, g1, m1, x2, g2, m2, out, N, M, T, S, d_in, d_out, symmetric, s, op);
    return;
  }

  // Split the t tiles over blocks when there are few pairs (aim at ~1024 blocks).
  const int64_t pairs = symmetric ? N * (N + 1) / 2 : N * M;
  const int64_t splits = std::max<int64_t>(1, std::min({ceil_div(1024, pairs), ceil_div(T, kGhostTile), kMaxGridYZ}));
  dispatch_types(dtype, out_dtype, op, [&](auto ttag, auto atag) {
    using Tin = typename decltype(ttag)::type;
    using Acc = typename decltype(atag)::type;
    for (int64_t row_off = 0; row_off < N; row_off += kMaxGridYZ) {
      const int64_t rows = (N - row_off < kMaxGridYZ) ? N - row_off : kMaxGridYZ;
      dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(rows),
                static_cast<unsigned>(splits));
      LINFT_LAUNCH(grid, kThreads, 0, s, ghost_gram_kernel<Tin, Acc>)
      (static_cast<const Tin*>(x1), static_cast<const Tin*>(g1), m1, static_cast<const Tin*>(x2),
       static_cast<const Tin*>(g2), m2, static_cast<Acc*>(out), N, M, T, S, d_in, d_out, row_off,
       symmetric ? 1 : 0);
      check_launch(op);
    }
  });
}

}  // namespace cuda
}  // namespace linft
