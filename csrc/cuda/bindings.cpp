// pybind11 module linft_kernels._C_cuda: the CUDA kernels behind raw device pointers
// (csrc/README.md). Compiled by the host compiler; links only the CUDA runtime.
//
// Importing this module makes no CUDA call (so it never initializes CUDA); device_count() never
// raises. Launch errors surface as RuntimeError, bad sizes or dtype codes as ValueError.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "linft/cuda_kernels.h"

namespace py = pybind11;

#ifndef LINFT_CUDA_ARCHS
#define LINFT_CUDA_ARCHS "unknown"
#endif

namespace {

using u8p = const std::uint8_t*;

inline const void* vp(std::uintptr_t p) { return reinterpret_cast<const void*>(p); }
inline u8p mp(std::uintptr_t p) { return reinterpret_cast<u8p>(p); }

std::string host_compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error so that it does not surface in a later launch
    return 0;
  }
  return n;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "linft CUDA kernels (raw device pointers; see csrc/README.md)";

  m.def(
      "gram",
      [](std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t N, int64_t M, int64_t P,
         int dtype, int out_dtype, std::uintptr_t stream) {
        linft::cuda::gram(vp(a), vp(b), reinterpret_cast<void*>(out), N, M, P, dtype, out_dtype,
                          stream);
      },
      "out[N, M] += a[N, P] @ b[M, P]^T (b == 0: symmetric, b = a)", py::arg("a"), py::arg("b"),
      py::arg("out"), py::arg("N"), py::arg("M"), py::arg("P"), py::arg("dtype"),
      py::arg("out_dtype"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>());

  m.def(
      "ghost_gram",
      [](std::uintptr_t x1, std::uintptr_t g1, std::uintptr_t m1, std::uintptr_t x2,
         std::uintptr_t g2, std::uintptr_t m2, std::uintptr_t out, int64_t N, int64_t M, int64_t T,
         int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype, std::uintptr_t stream) {
        linft::cuda::ghost_gram(vp(x1), vp(g1), mp(m1), vp(x2), vp(g2), mp(m2),
                                reinterpret_cast<void*>(out), N, M, T, S, d_in, d_out, dtype,
                                out_dtype, stream);
      },
      "out[i, j] += sum_{t,s} m1[i,t] m2[j,s] (x1[i,t].x2[j,s]) (g1[i,t].g2[j,s])", py::arg("x1"),
      py::arg("g1"), py::arg("m1"), py::arg("x2"), py::arg("g2"), py::arg("m2"), py::arg("out"),
      py::arg("N"), py::arg("M"), py::arg("T"), py::arg("S"), py::arg("d_in"), py::arg("d_out"),
      py::arg("dtype"), py::arg("out_dtype"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "psg_gram",
      [](std::uintptr_t x1, std::uintptr_t g1, std::uintptr_t m1, std::uintptr_t x2,
         std::uintptr_t g2, std::uintptr_t m2, std::uintptr_t out, int64_t N, int64_t M, int64_t T,
         int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype, int kernel,
         int tile_dtype, std::uintptr_t stream) {
        linft::cuda::psg_gram(vp(x1), vp(g1), mp(m1), vp(x2), vp(g2), mp(m2),
                              reinterpret_cast<void*>(out), N, M, T, S, d_in, d_out, dtype,
                              out_dtype, kernel, tile_dtype, stream);
      },
      "out[i, j] += <phi(F_i), psi(F_j)>, F_i = sum_t m1[i,t] g1[i,t]^T x1[i,t]; kernel 0 sgd, "
      "1 signgd, 2 asymmetric-signgd; F stored in tile_dtype (default: out_dtype; 0 with an fp64 "
      "out; or the inputs' 16-bit dtype)",
      py::arg("x1"), py::arg("g1"), py::arg("m1"), py::arg("x2"), py::arg("g2"), py::arg("m2"),
      py::arg("out"), py::arg("N"), py::arg("M"), py::arg("T"), py::arg("S"), py::arg("d_in"),
      py::arg("d_out"), py::arg("dtype"), py::arg("out_dtype"), py::arg("kernel"),
      py::arg("tile_dtype") = -1, py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>());

  m.def(
      "gram_tensor_core_path", []() { return std::string(linft::cuda::gram_tensor_core_path()); },
      "The tensor-core kernel gram runs for 16-bit inputs into an fp32 out on the current device: "
      "'wgmma' (sm_90a code on a 9.0 GPU; 'wgmma overlap' with LINFT_CUDA_GRAM_WGMMA=2), 'mma.sync' "
      "(sm_80+) or 'cuda cores'. Makes CUDA calls (no launch); LINFT_CUDA_GRAM_WGMMA=0 turns wgmma off");

  m.def("device_count", &device_count,
        "Number of visible CUDA devices; 0 when no GPU or driver is present (never raises)");

  m.def(
      "build_info",
      []() {
        py::dict d;
        d["cuda_runtime_version"] = static_cast<int>(CUDART_VERSION);
        d["archs"] = std::string(LINFT_CUDA_ARCHS);
        d["cuda_arch_list"] = std::string(linft::cuda::compiled_arch_list());
        d["nvcc"] = std::string(linft::cuda::nvcc_version());
        d["compiler"] = host_compiler();
        return d;
      },
      "How this library was built (no CUDA call)");
}
