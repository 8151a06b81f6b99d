// Shared helpers of the linft CUDA kernels: element loads, sign, output adds, dtype dispatch and
// launch error checks. Included by the .cu files only (never by bindings.cpp).
//
// Defining LINFT_CUDA_EMULATION (together with a force-included emulation header that provides
// the CUDA built-ins, the launch macro and the runtime calls used here) compiles the kernels as
// plain host C++ so that they can be checked on a machine without a GPU.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "linft/common.h"

#ifndef LINFT_CUDA_EMULATION
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// LINFT_LAUNCH(grid, block, smem_bytes, stream, kernel<...>)(args...)
#define LINFT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
// Declares the dynamic shared memory of a kernel as `unsigned char name[]`.
#define LINFT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace linft {
namespace cuda_detail {

// Every kernel of this library runs 256 threads per block (1-D).
constexpr int kThreads = 256;

// ---------------------------------------------------------------- element conversion
template <class Acc>
__device__ __forceinline__ Acc to_acc(float v) { return static_cast<Acc>(v); }
template <class Acc>
__device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }
template <class Acc>
__device__ __forceinline__ Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <class Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) { return static_cast<Acc>(__bfloat162float(v)); }

// An accumulator value stored as F (round to nearest even for the 16-bit types).
template <class F>
__device__ __forceinline__ F from_acc(float v) {
  if constexpr (std::is_same_v<F, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else if constexpr (std::is_same_v<F, __half>) return __float2half_rn(v);
  else return static_cast<F>(v);
}
template <class F>
__device__ __forceinline__ F from_acc(double v) { return static_cast<F>(v); }

// p[idx] converted to the accumulator type. The caller guarantees idx is in bounds.
template <class Acc, class T>
__device__ __forceinline__ Acc load(const T* __restrict__ p, int64_t idx) {
  return to_acc<Acc>(p[idx]);
}

// sign(v) with sign(+-0) = +-0 and sign(NaN) = NaN (like torch.sign).
template <class Acc>
__device__ __forceinline__ Acc sign_of(Acc v) {
  return v > Acc(0) ? Acc(1) : (v < Acc(0) ? Acc(-1) : v);
}

// out[idx] += v; atomically when several blocks may add into the same element.
template <class Acc>
__device__ __forceinline__ void add_out(Acc* __restrict__ out, int64_t idx, Acc v, bool atomic) {
  if (atomic) {
    atomicAdd(out + idx, v);
  } else {
    out[idx] += v;
  }
}

// ---------------------------------------------------------------- CUDA-core tile step
// c[r][s] += sum_{kk < K} As[kk][ty + 16 r] * Bs[kk][tx + 16 s]: the 4x4 micro-tile of thread
// (tx, ty) = (tid % 16, tid / 16) in a 64x64 output tile whose operands are staged k-major in
// shared memory (gram_kernel, and psg_gram's phase 1 on CUDA cores).
template <int K, int LD, class Acc>
__device__ __forceinline__ void micro_tile_fma(const Acc (*As)[LD], const Acc (*Bs)[LD],
                                               Acc (&c)[4][4], int tx, int ty) {
#pragma unroll
  for (int kk = 0; kk < K; ++kk) {
    Acc av[4], bv[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) av[r] = As[kk][ty + 16 * r];
#pragma unroll
    for (int s = 0; s < 4; ++s) bv[s] = Bs[kk][tx + 16 * s];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int s = 0; s < 4; ++s) c[r][s] += av[r] * bv[s];
  }
}

// ---------------------------------------------------------------- host helpers
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    // The runtime keeps a non-sticky error (a failed allocation) as its "last error" too; left there,
    // the next launch check (this library's, or torch's in the same runtime) would report it.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("linft ") + op + ": " + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// Call right after a kernel launch.
inline void check_launch(const char* op) { check_cuda(cudaGetLastError(), op, "kernel launch"); }

inline void require(bool cond, const char* op, const std::string& msg) {
  if (!cond) throw std::invalid_argument(std::string("linft ") + op + ": " + msg);
}

// A stream-ordered allocation (cudaMallocAsync) freed at scope exit, also when a launch throws.
struct Scratch {
  void* p = nullptr;
  cudaStream_t s;
  Scratch(void* p_, cudaStream_t s_) : p(p_), s(s_) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (p != nullptr) (void)cudaFreeAsync(p, s);
  }
};

// sign(v) as stored in F: the sign of v rounded to F (an fp32 sum too small for fp16 has sign 0), as
// when the sign is taken of an F that was stored first.
template <class F, class Acc>
__device__ __forceinline__ F sign_as(Acc v) {
  return from_acc<F>(sign_of(to_acc<Acc>(from_acc<F>(v))));
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<Input>{}, Tag<Acc>{}) for the input dtype code and the output dtype code.
template <class F>
void dispatch_types(int dtype, int out_dtype, const char* op, F&& f) {
  auto with_acc = [&](auto acc_tag) {
    switch (dtype) {
      case kFloat32: f(Tag<float>{}, acc_tag); return;
      case kFloat64: f(Tag<double>{}, acc_tag); return;
      case kFloat16: f(Tag<__half>{}, acc_tag); return;
      case kBFloat16: f(Tag<__nv_bfloat16>{}, acc_tag); return;
      default: require(false, op, "unknown input dtype code " + std::to_string(dtype));
    }
  };
  switch (out_dtype) {
    case kFloat32: with_acc(Tag<float>{}); return;
    case kFloat64: with_acc(Tag<double>{}); return;
    default: require(false, op, "out_dtype must be 0 (fp32) or 1 (fp64), got " + std::to_string(out_dtype));
  }
}

// Grid dimensions y and z are limited to 65535 blocks; launches larger than that are chunked.
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace cuda_detail
}  // namespace linft
