// Host launchers of the linft CUDA kernels (defined in csrc/cuda/*.cu, called by bindings.cpp).
//
// The semantics are those of csrc/README.md. Pointers are device pointers of contiguous row-major
// tensors; `stream` is a cudaStream_t passed as an integer (0 = legacy default stream). Each
// launcher enqueues its kernels asynchronously on the current device and
//   * throws std::invalid_argument for bad sizes or dtype codes,
//   * throws std::runtime_error with the CUDA error string when a launch fails.
// This header needs no CUDA headers.
#pragma once
#include <cstdint>

namespace linft {
namespace cuda {

// out[N, M] += a[N, P] @ b[M, P]^T; b == nullptr: symmetric (b = a, M == N).
void gram(const void* a, const void* b, void* out, int64_t N, int64_t M, int64_t P, int dtype,
          int out_dtype, std::uintptr_t stream);

// out[i, j] += sum_{t,s} m1[i,t] m2[j,s] (x1[i,t,:].x2[j,s,:]) (g1[i,t,:].g2[j,s,:]);
// x2 == nullptr: symmetric (x2, g2, m2 = x1, g1, m1).
void ghost_gram(const void* x1, const void* g1, const std::uint8_t* m1, const void* x2,
                const void* g2, const std::uint8_t* m2, void* out, int64_t N, int64_t M, int64_t T,
                int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype,
                std::uintptr_t stream);

// F_i = sum_t m1[i,t] g1[i,t,:]^T x1[i,t,:];  kernel 0: <F_i, F_j>, 1: <sign F_i, sign F_j>,
// 2: <F_i, sign F_j> (never symmetric: x2 == nullptr then means x2, g2, m2 = x1, g1, m1).
// tile_dtype: the dtype F is stored in between the two phases: out_dtype (or -1), 0 (fp32) with an
// fp64 out, or the inputs' 16-bit dtype (entries summed in fp32, rounded once; the Gram on tensor cores).
void psg_gram(const void* x1, const void* g1, const std::uint8_t* m1, const void* x2,
              const void* g2, const std::uint8_t* m2, void* out, int64_t N, int64_t M, int64_t T,
              int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype, int kernel,
              int tile_dtype, std::uintptr_t stream);

// The tensor-core kernel gram runs on the current device for 16-bit inputs into an fp32 out:
// "wgmma" (sm_90a code on a 9.0 GPU; "wgmma overlap" with LINFT_CUDA_GRAM_WGMMA=2), "mma.sync"
// (sm_80+), or "cuda cores" (none). Makes CUDA calls
// (attribute queries; no launch).
const char* gram_tensor_core_path();

// Version of the nvcc that compiled the kernels, e.g. "13.0.88".
const char* nvcc_version();
// __CUDA_ARCH_LIST__ as seen by nvcc (e.g. "800,900,900"), or "unknown".
const char* compiled_arch_list();

}  // namespace cuda
}  // namespace linft
