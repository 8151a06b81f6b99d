// ghost_gram (csrc/README.md):
//   out[i, j] += sum_{t<T, s<S} m1[i,t] m2[j,s] (x1[i,t,:] . x2[j,s,:]) (g1[i,t,:] . g2[j,s,:])
//
// One block per sample pair (i, j) (and per slice of t tiles when there are few pairs). For each
// 32x32 (t, s) tile the block forms the activation product X1 X2^T and the gradient product
// G1 G2^T in registers (d chunks of 32 staged in shared memory; each of the 256 threads owns the 2x2
// elements t = ty + 16*r, s = tx + 16*c), multiplies them elementwise, keeps unmasked entries
// (masked tokens are skipped, not multiplied by 0, so garbage there cannot leak in) and sums. The
// T x S products never reach global memory. A shared-memory tree reduction gives the block's value;
// thread 0 adds it into out[i, j] (and out[j, i] for an off-diagonal symmetric pair). Adds are
// atomic only when the t range is split over several blocks.
#include "common.cuh"
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

  // Split the t tiles over blocks when there are few pairs (aim at ~1024 blocks).
  const int64_t pairs = symmetric ? N * (N + 1) / 2 : N * M;
  const int64_t n_ttiles = ceil_div(T, kGhostTile);
  int64_t splits = ceil_div(1024, pairs);
  if (splits > n_ttiles) splits = n_ttiles;
  if (splits > kMaxGridYZ) splits = kMaxGridYZ;
  if (splits < 1) splits = 1;

  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
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
