// pybind11 bindings of the CPU library `_C_cpu` (binary interface: csrc/README.md).
// Pointers arrive as Python ints; cheap argument checks raise ValueError (std::invalid_argument);
// the GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "linft/common.h"
#include "linft/cpu_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using std::uintptr_t;

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

void check_nonneg(const char* op, const char* name, int64_t v) {
  if (v < 0) fail(std::string(op) + ": " + name + " must be >= 0, got " + std::to_string(v));
}

void check_dtypes(const char* op, int dtype, int out_dtype) {
  if (dtype < linft::kFloat32 || dtype > linft::kBFloat16)
    fail(std::string(op) + ": dtype code must be 0 (fp32), 1 (fp64), 2 (fp16) or 3 (bf16), got " +
         std::to_string(dtype));
  if (out_dtype != linft::kFloat32 && out_dtype != linft::kFloat64)
    fail(std::string(op) + ": out_dtype code must be 0 (fp32) or 1 (fp64), got " +
         std::to_string(out_dtype));
}

void check_ptr(const char* op, const char* name, uintptr_t p, bool needed) {
  if (needed && p == 0) fail(std::string(op) + ": " + name + " is a null pointer");
}

// Shared checks of ghost_gram and psg_gram. Returns whether the call is the symmetric form.
bool check_factors(const char* op, uintptr_t x1, uintptr_t g1, uintptr_t x2, uintptr_t g2,
                   uintptr_t m2, uintptr_t out, int64_t N, int64_t M, int64_t T, int64_t S,
                   int64_t d_in, int64_t d_out, int dtype, int out_dtype) {
  check_nonneg(op, "N", N);
  check_nonneg(op, "M", M);
  check_nonneg(op, "T", T);
  check_nonneg(op, "S", S);
  check_nonneg(op, "d_in", d_in);
  check_nonneg(op, "d_out", d_out);
  check_dtypes(op, dtype, out_dtype);
  const bool sym = x2 == 0;
  if (sym) {
    if (g2 != 0) fail(std::string(op) + ": g2 given without x2 (x2 == 0 means the symmetric form)");
    if (m2 != 0) fail(std::string(op) + ": m2 given without x2 (x2 == 0 means the symmetric form)");
    if (M != N) fail(std::string(op) + ": symmetric form (x2 == 0) needs M == N");
    if (S != T) fail(std::string(op) + ": symmetric form (x2 == 0) needs S == T");
  } else if (g2 == 0) {
    fail(std::string(op) + ": x2 given without g2");
  }
  check_ptr(op, "out", out, N > 0 && M > 0);
  check_ptr(op, "x1", x1, N > 0 && T > 0 && d_in > 0);
  check_ptr(op, "g1", g1, N > 0 && T > 0 && d_out > 0);
  return sym;
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "linft CPU kernels (raw pointers, OpenMP); see csrc/README.md";

  m.def(
      "gram",
      [](uintptr_t a, uintptr_t b, uintptr_t out, int64_t N, int64_t M, int64_t P, int dtype,
         int out_dtype) {
        check_nonneg("gram", "N", N);
        check_nonneg("gram", "M", M);
        check_nonneg("gram", "P", P);
        check_dtypes("gram", dtype, out_dtype);
        if (b == 0 && M != N) fail("gram: symmetric form (b == 0) needs M == N");
        check_ptr("gram", "out", out, N > 0 && M > 0);
        check_ptr("gram", "a", a, N > 0 && P > 0);
        py::gil_scoped_release release;
        linft::cpu::gram(a, b, out, N, M, P, dtype, out_dtype);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("N"), py::arg("M"), py::arg("P"),
      py::arg("dtype"), py::arg("out_dtype"),
      "out[N, M] += a[N, P] @ b[M, P]^T (b == 0: symmetric form, b = a)");

  m.def(
      "ghost_gram",
      [](uintptr_t x1, uintptr_t g1, uintptr_t m1, uintptr_t x2, uintptr_t g2, uintptr_t m2,
         uintptr_t out, int64_t N, int64_t M, int64_t T, int64_t S, int64_t d_in, int64_t d_out,
         int dtype, int out_dtype) {
        check_factors("ghost_gram", x1, g1, x2, g2, m2, out, N, M, T, S, d_in, d_out, dtype,
                      out_dtype);
        py::gil_scoped_release release;
        linft::cpu::ghost_gram(x1, g1, m1, x2, g2, m2, out, N, M, T, S, d_in, d_out, dtype,
                               out_dtype);
      },
      py::arg("x1"), py::arg("g1"), py::arg("m1"), py::arg("x2"), py::arg("g2"), py::arg("m2"),
      py::arg("out"), py::arg("N"), py::arg("M"), py::arg("T"), py::arg("S"), py::arg("d_in"),
      py::arg("d_out"), py::arg("dtype"), py::arg("out_dtype"),
      "out[i, j] += sum_{t,s} m1 m2 (x1[i,t].x2[j,s]) (g1[i,t].g2[j,s]) (x2 == 0: symmetric)");

  m.def(
      "psg_gram",
      [](uintptr_t x1, uintptr_t g1, uintptr_t m1, uintptr_t x2, uintptr_t g2, uintptr_t m2,
         uintptr_t out, int64_t N, int64_t M, int64_t T, int64_t S, int64_t d_in, int64_t d_out,
         int dtype, int out_dtype, int kernel, int tile_dtype) {
        check_factors("psg_gram", x1, g1, x2, g2, m2, out, N, M, T, S, d_in, d_out, dtype,
                      out_dtype);
        if (kernel < linft::kSGD || kernel > linft::kAsymmetricSignGD)
          fail("psg_gram: kernel code must be 0 (sgd), 1 (signgd) or 2 (asymmetric-signgd), got " +
               std::to_string(kernel));
        if (tile_dtype < 0) tile_dtype = out_dtype;
        if (tile_dtype != linft::kFloat32 && !(tile_dtype == linft::kFloat64 && out_dtype == linft::kFloat64))
          fail("psg_gram: tile_dtype code must be 0 (fp32) or, with an fp64 out, 1 (fp64), got " +
               std::to_string(tile_dtype));
        py::gil_scoped_release release;
        linft::cpu::psg_gram(x1, g1, m1, x2, g2, m2, out, N, M, T, S, d_in, d_out, dtype,
                             out_dtype, kernel, tile_dtype);
      },
      py::arg("x1"), py::arg("g1"), py::arg("m1"), py::arg("x2"), py::arg("g2"), py::arg("m2"),
      py::arg("out"), py::arg("N"), py::arg("M"), py::arg("T"), py::arg("S"), py::arg("d_in"),
      py::arg("d_out"), py::arg("dtype"), py::arg("out_dtype"), py::arg("kernel"),
      py::arg("tile_dtype") = -1,
      "out[i, j] += <F1_i, F2_j> with F = g^T x per sample (kernel 0 sgd, 1 signgd, "
      "2 asymmetric-signgd); F tiles built in tile_dtype (default: out_dtype), products and sums "
      "of the Gram in out_dtype");

  m.def(
      "build_info",
      []() {
        py::dict d;
#if defined(__clang__)
        d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
        d["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
        d["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
        d["compiler"] = "unknown";
#endif
#ifdef _OPENMP
        d["openmp"] = static_cast<long>(_OPENMP);
        d["omp_max_threads"] = omp_get_max_threads();
#else
        d["openmp"] = py::none();
        d["omp_max_threads"] = 1;
#endif
#ifdef LINFT_CXX_FLAGS
        d["cxx_flags"] = std::string(LINFT_CXX_FLAGS);
#endif
        d["cplusplus"] = static_cast<long>(__cplusplus);
        // Instruction set the GEMM engine dispatched to at run time; what the build flags allow.
        d["simd"] = std::string(linft::cpu::simd_name());
        d["amx_bf16"] = linft::cpu::amx_bf16_usable();  // bf16 gram on AMX tiles (LINFT_NO_AMX=1: off)
        py::list baseline;
#ifdef __AVX512F__
        baseline.append("avx512f");
#endif
#ifdef __AVX2__
        baseline.append("avx2");
#endif
#ifdef __FMA__
        baseline.append("fma");
#endif
#ifdef __SSE2__
        baseline.append("sse2");
#endif
#ifdef __ARM_NEON
        baseline.append("neon");
#endif
        d["simd_baseline"] = baseline;
        return d;
      },
      "Compiler, OpenMP and SIMD information of this build");
}
