// psg_gram (csrc/README.md):
//   F_i = sum_t m1[i,t] g1[i,t,:]^T x1[i,t,:]   (d_out, d_in), never written to memory
//   kernel 0: out[i, j] += <F_i, F_j>;  1: <sign F_i, sign F_j>;  2: <F_i, sign F_j>
//
// Grid: x = one 16x16 (o, d) tile of F, y = a block of 16 "j" samples, z = a block of 16 "i" samples.
// A block builds the F tiles of its 16 i samples and of its 16 j samples in shared memory (t in
// chunks of 8 staged in shared memory; thread (sample = tid / 16, q = tid % 16) owns the 4x4
// elements o = q/4 + 4a, d = q%4 + 4b of its sample's tile), applies sign where the kernel asks,
// then thread (pi = tid / 16, pj = tid % 16) contracts F_i0+pi with F_j0+pj over the 256 tile
// elements and atomically adds the partial sum into out (every (o, d) tile adds into the same
// outputs). Symmetric form: sample blocks with bj < bi return at once; the diagonal sample block
// reuses its F tiles for both sides and adds all its 16x16 pairs; off-diagonal blocks also add
// into out[j, i]. Masked tokens are skipped (their g and x are staged as 0).
#include "common.cuh"
#include "linft/cuda_kernels.h"

namespace linft {
namespace cuda_detail {
namespace {

constexpr int kPsgSamples = 16;                      // samples per side of a block
constexpr int kPsgTileO = 16;                        // o extent of an F tile
constexpr int kPsgTileD = 16;                        // d extent of an F tile
constexpr int kPsgElems = kPsgTileO * kPsgTileD;     // 256 elements per F tile
constexpr int kPsgStride = kPsgElems + 1;            // padded row of the F tile store
constexpr int kPsgTChunk = 8;                        // tokens staged per step
constexpr int kPsgStage = kPsgSamples * kPsgTChunk * 16;  // staged elements per operand (2048)

static_assert(kPsgSamples * 16 == kThreads, "one sample per 16 threads");
static_assert(kPsgSamples * kPsgSamples == kThreads, "one pair per thread");
static_assert(kPsgTileO == 16 && kPsgTileD == 16, "thread mapping assumes 16x16 tiles");
static_assert(kPsgStage % kThreads == 0, "staging loop");

template <class Acc>
constexpr size_t psg_smem_bytes() {
  return sizeof(Acc) * (2 * static_cast<size_t>(kPsgSamples) * kPsgStride + 2 * kPsgStage);
}

// Fout[sample][e] = phi(F_{s0+sample}[o0 + e/16, dd0 + e%16]) for the 16 samples from s0, where phi
// is sign when use_sign, else the identity. Samples >= n_samples and elements outside (d_out, d_in)
// come out 0. Contains barriers: call uniformly. Fout must not alias Gs or Xs.
template <class T, class Acc>
__device__ __forceinline__ void build_f_tiles(const T* __restrict__ x, const T* __restrict__ g,
                                              const std::uint8_t* __restrict__ m,
                                              int64_t n_samples, int64_t nt, int64_t d_in,
                                              int64_t d_out, int64_t s0, int64_t o0, int64_t dd0,
                                              Acc* __restrict__ Gs, Acc* __restrict__ Xs,
                                              Acc* __restrict__ Fout, bool use_sign) {
  const int tid = static_cast<int>(threadIdx.x);
  const int sample = tid / 16;
  const int q = tid % 16;
  const int qo = q / 4;
  const int qd = q % 4;

  Acc f[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) f[a][b] = Acc(0);

  for (int64_t t0 = 0; t0 < nt; t0 += kPsgTChunk) {
    // Stage g[s, t0:t0+8, o0:o0+16] and x[s, t0:t0+8, dd0:dd0+16] for the 16 samples, as
    // [sample][t][c]; 8 elements per thread per operand.
#pragma unroll 4  // full unrolling doubles the registers (128) and spills with fp64 accumulators
    for (int u = 0; u < kPsgStage / kThreads; ++u) {
      const int idx = tid + u * kThreads;
      const int c = idx % 16;
      const int tl = (idx / 16) % kPsgTChunk;
      const int sl = idx / (16 * kPsgTChunk);
      const int64_t smp = s0 + sl;
      const int64_t t = t0 + tl;
      const bool ok = smp < n_samples && t < nt && (m == nullptr || m[smp * nt + t] != 0);
      const int64_t o = o0 + c;
      const int64_t dd = dd0 + c;
      const int64_t row = smp * nt + t;  // only used when ok
      Gs[idx] = (ok && o < d_out) ? load<Acc>(g, row * d_out + o) : Acc(0);
      Xs[idx] = (ok && dd < d_in) ? load<Acc>(x, row * d_in + dd) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int tl = 0; tl < kPsgTChunk; ++tl) {
      const int base = (sample * kPsgTChunk + tl) * 16;
      Acc gv[4], xv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) gv[a] = Gs[base + qo + 4 * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) xv[b] = Xs[base + qd + 4 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) f[a][b] += gv[a] * xv[b];
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int e = (qo + 4 * a) * kPsgTileD + (qd + 4 * b);
      const Acc v = f[a][b];
      Fout[sample * kPsgStride + e] = use_sign ? sign_of(v) : v;
    }
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads)
psg_gram_kernel(const T* __restrict__ x1, const T* __restrict__ g1,
                const std::uint8_t* __restrict__ m1, const T* __restrict__ x2,
                const T* __restrict__ g2, const std::uint8_t* __restrict__ m2,
                Acc* __restrict__ out, int64_t N, int64_t M, int64_t nt, int64_t ns, int64_t d_in,
                int64_t d_out, int64_t n_d_tiles, int64_t bj_offset, int64_t bi_offset,
                int symmetric, int kind) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x);
  const int64_t bj = static_cast<int64_t>(blockIdx.y) + bj_offset;
  const int64_t bi = static_cast<int64_t>(blockIdx.z) + bi_offset;
  if (symmetric && bj < bi) return;  // whole block: uniform, before any barrier

  LINFT_DYNAMIC_SMEM(smem_raw);
  Acc* FI = reinterpret_cast<Acc*>(smem_raw);
  Acc* FJ = FI + kPsgSamples * kPsgStride;
  Acc* Gs = FJ + kPsgSamples * kPsgStride;
  Acc* Xs = Gs + kPsgStage;

  const int64_t o0 = (tile / n_d_tiles) * kPsgTileO;
  const int64_t dd0 = (tile % n_d_tiles) * kPsgTileD;
  const int64_t i0 = bi * kPsgSamples;
  const int64_t j0 = bj * kPsgSamples;
  const bool sign_i = (kind == kSignGD);
  const bool sign_j = (kind == kSignGD || kind == kAsymmetricSignGD);

  build_f_tiles<T, Acc>(x1, g1, m1, N, nt, d_in, d_out, i0, o0, dd0, Gs, Xs, FI, sign_i);
  const bool same = symmetric && bi == bj;  // then F_J == F_I (symmetric implies sign_i == sign_j)
  if (!same) {
    build_f_tiles<T, Acc>(x2, g2, m2, M, ns, d_in, d_out, j0, o0, dd0, Gs, Xs, FJ, sign_j);
  }
  __syncthreads();

  const int tid = static_cast<int>(threadIdx.x);
  const int pi = tid / kPsgSamples;
  const int pj = tid % kPsgSamples;
  const Acc* fi = FI + pi * kPsgStride;
  const Acc* fj = (same ? FI : FJ) + pj * kPsgStride;
  Acc sum = Acc(0);
#pragma unroll 16
  for (int e = 0; e < kPsgElems; ++e) sum += fi[e] * fj[e];

  const int64_t i = i0 + pi;
  const int64_t j = j0 + pj;
  if (i < N && j < M && sum != Acc(0)) {
    atomicAdd(out + i * M + j, sum);
    if (symmetric && !same) atomicAdd(out + j * M + i, sum);  // symmetric: M == N
  }
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

void psg_gram(const void* x1, const void* g1, const std::uint8_t* m1, const void* x2,
              const void* g2, const std::uint8_t* m2, void* out, int64_t N, int64_t M, int64_t T,
              int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype, int kernel,
              std::uintptr_t stream) {
  using namespace cuda_detail;
  const char* op = "psg_gram";
  require(N >= 0 && M >= 0 && T >= 0 && S >= 0 && d_in >= 0 && d_out >= 0, op, "negative size");
  require(kernel == kSGD || kernel == kSignGD || kernel == kAsymmetricSignGD, op,
          "kernel must be 0 (sgd), 1 (signgd) or 2 (asymmetric-signgd), got " +
              std::to_string(kernel));
  dispatch_types(dtype, out_dtype, op, [](auto, auto) {});
  // T == 0 or S == 0 makes F zero, hence every kernel zero (sign(0) = 0).
  if (N == 0 || M == 0 || T == 0 || S == 0 || d_in == 0 || d_out == 0) return;
  require(x1 != nullptr && g1 != nullptr && out != nullptr, op, "null pointer");
  bool symmetric = false;
  if (x2 == nullptr) {
    require(M == N && S == T, op, "x2 == 0 (second operand = first) needs M == N and S == T");
    x2 = x1;
    g2 = g1;
    m2 = m1;
    symmetric = (kernel != kAsymmetricSignGD);  // <F_i, sign F_j> is not symmetric
  } else {
    require(g2 != nullptr, op, "g2 is null while x2 is not");
  }

  const int64_t n_o_tiles = ceil_div(d_out, kPsgTileO);
  const int64_t n_d_tiles = ceil_div(d_in, kPsgTileD);
  const int64_t n_tiles = n_o_tiles * n_d_tiles;
  require(n_tiles <= kMaxGridX, op, "d_out * d_in too large");
  const int64_t n_bi = ceil_div(N, kPsgSamples);
  const int64_t n_bj = ceil_div(M, kPsgSamples);

  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_types(dtype, out_dtype, op, [&](auto ttag, auto atag) {
    using Tin = typename decltype(ttag)::type;
    using Acc = typename decltype(atag)::type;
    const size_t smem = psg_smem_bytes<Acc>();
    check_cuda(cudaFuncSetAttribute(psg_gram_kernel<Tin, Acc>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               op, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    for (int64_t bi_off = 0; bi_off < n_bi; bi_off += kMaxGridYZ) {
      const int64_t nz = (n_bi - bi_off < kMaxGridYZ) ? n_bi - bi_off : kMaxGridYZ;
      for (int64_t bj_off = 0; bj_off < n_bj; bj_off += kMaxGridYZ) {
        const int64_t ny = (n_bj - bj_off < kMaxGridYZ) ? n_bj - bj_off : kMaxGridYZ;
        dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(ny),
                  static_cast<unsigned>(nz));
        LINFT_LAUNCH(grid, kThreads, smem, s, psg_gram_kernel<Tin, Acc>)
        (static_cast<const Tin*>(x1), static_cast<const Tin*>(g1), m1,
         static_cast<const Tin*>(x2), static_cast<const Tin*>(g2), m2, static_cast<Acc*>(out), N,
         M, T, S, d_in, d_out, n_d_tiles, bj_off, bi_off, symmetric ? 1 : 0, kernel);
        check_launch(op);
      }
    }
  });
}

}  // namespace cuda
}  // namespace linft
