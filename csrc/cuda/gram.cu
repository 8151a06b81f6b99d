// gram: out[N, M] += a[N, P] @ b[M, P]^T (csrc/README.md).
//
// Classic shared-memory tiled GEMM. A block computes a 64x64 output tile over a range of P (split-K
// when there are few tiles and P is long); each of its 256 threads owns a 4x4 micro-tile with rows
// ty + 16*r and columns tx + 16*c (tx = tid % 16, ty = tid / 16). K advances in chunks of 16 staged
// in shared memory in the accumulator type. Symmetric form: blocks below the diagonal return at once;
// an off-diagonal tile adds into out[i, j] and out[j, i]. Without split-K every output element has a
// single writer (plain add, deterministic); with split-K the adds are atomic.
#include "common.cuh"
#include "linft/cuda_kernels.h"

#define LINFT_STR2(...) #__VA_ARGS__
#define LINFT_STR(...) LINFT_STR2(__VA_ARGS__)

namespace linft {
namespace cuda_detail {
namespace {

constexpr int kGramTile = 64;  // output tile edge
constexpr int kGramK = 16;     // K chunk
constexpr int kGramMicro = 4;  // micro-tile edge per thread (16 x 16 threads x 4 = 64)

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
#pragma unroll
    for (int kk = 0; kk < kGramK; ++kk) {
      Acc av[kGramMicro], bv[kGramMicro];
#pragma unroll
      for (int r = 0; r < kGramMicro; ++r) av[r] = As[kk][ty + 16 * r];
#pragma unroll
      for (int s = 0; s < kGramMicro; ++s) bv[s] = Bs[kk][tx + 16 * s];
#pragma unroll
      for (int r = 0; r < kGramMicro; ++r)
#pragma unroll
        for (int s = 0; s < kGramMicro; ++s) c[r][s] += av[r] * bv[s];
    }
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

}  // namespace
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

  const int64_t tiles_n = ceil_div(N, kGramTile);
  const int64_t tiles_m = ceil_div(M, kGramTile);
  require(tiles_m <= kMaxGridX, op, "M too large");
  const int64_t tiles = symmetric ? tiles_n * (tiles_n + 1) / 2 : tiles_n * tiles_m;

  // Split K when there are few output tiles (aim at ~1024 blocks), keeping >= 512 of K per split.
  int64_t splits = ceil_div(1024, tiles);
  const int64_t max_splits = ceil_div(P, 512);
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  int64_t k_per = ceil_div(ceil_div(P, splits), kGramK) * kGramK;
  const int64_t k_min = ceil_div(ceil_div(P, kMaxGridYZ), kGramK) * kGramK;
  if (k_per < k_min) k_per = k_min;
  splits = ceil_div(P, k_per);

  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
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
