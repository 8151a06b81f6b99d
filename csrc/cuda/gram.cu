// gram: out[N, M] += a[N, P] @ b[M, P]^T (csrc/README.md).
//
// Two kernels; the launcher picks one per call.
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
template <class T>
void gram_mma(const T* pa, const T* pb, float* po, int64_t N, int64_t M, int64_t P, bool symmetric,
              cudaStream_t s, const char* op) {
  // Split K when there are few output tiles (aim at ~256 blocks, two per SM of an H100), keeping
  // >= 1024 of K per split. Not tuned on a GPU yet.
  const TilePlan tp = plan_tiles(N, M, P, symmetric, kMmaTile, GramMma::kK, 256, 1024, op);
  const int64_t tiles_n = tp.tiles_n, tiles_m = tp.tiles_m, k_per = tp.k_per, splits = tp.splits;

  // 60 KiB of dynamic shared memory: over the default 48 KiB, so opt in (per device; cheap).
  check_cuda(cudaFuncSetAttribute(gram_mma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(GramMma::kSmemBytes)),
             op, "cudaFuncSetAttribute");
  Scratch scratch{nullptr, s};  // freed also when a launch throws
  if (splits > 1)
    check_cuda(cudaMallocAsync(&scratch.p, sizeof(float) * static_cast<size_t>(splits * N * M), s), op,
               "cudaMallocAsync (split-K workspace)");
  float* ws = static_cast<float*>(scratch.p);
  for (int64_t row_off = 0; row_off < tiles_n; row_off += kMaxGridYZ) {
    const int64_t rows = (tiles_n - row_off < kMaxGridYZ) ? tiles_n - row_off : kMaxGridYZ;
    dim3 grid(static_cast<unsigned>(tiles_m), static_cast<unsigned>(rows), static_cast<unsigned>(splits));
    LINFT_LAUNCH(grid, kThreads, GramMma::kSmemBytes, s, gram_mma_kernel<T>)
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

}  // namespace

// Declared in mma.cuh. Compute capability 8.0 or newer, and the code loaded for it compiled for sm_80
// or newer (a build for older archs only holds __trap()); psg_gram.cu is built with the same
// architectures, so gram_mma_kernel stands for its kernels too. Cached per device;
// LINFT_CUDA_GRAM_MMA=0 in the environment turns every tensor-core path off (for A/B timing).
bool mma_device(const char* op) {
  static const bool disabled = [] {
    const char* e = std::getenv("LINFT_CUDA_GRAM_MMA");
    return e != nullptr && e[0] == '0';
  }();
  if (disabled) return false;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> major[kMaxDevices];  // per device: 0 not queried yet
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), op, "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) return false;
  int m = major[dev].load(std::memory_order_relaxed);  // 1: no, 2: yes
  if (m == 0) {
    int cc = 0;
    check_cuda(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev), op,
               "cudaDeviceGetAttribute");
    m = 1;
    if (cc >= 8) {
      cudaFuncAttributes attr{};
      if (cudaFuncGetAttributes(&attr, gram_mma_kernel<__nv_bfloat16>) == cudaSuccess)
        m = attr.binaryVersion >= 80 ? 2 : 1;
      else
        (void)cudaGetLastError();  // no loadable code for this device: the FFMA kernel serves
    }
    major[dev].store(m, std::memory_order_relaxed);
  }
  return m == 2;
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
    if (dtype == kBFloat16) {
      const auto* pa = static_cast<const __nv_bfloat16*>(a);
      gram_mma(pa, symmetric ? pa : static_cast<const __nv_bfloat16*>(b), po, N, M, P, symmetric, s, op);
    } else {
      const auto* pa = static_cast<const __half*>(a);
      gram_mma(pa, symmetric ? pa : static_cast<const __half*>(b), po, N, M, P, symmetric, s, op);
    }
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
