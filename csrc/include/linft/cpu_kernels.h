// Declarations shared by the CPU kernels (csrc/cpu/*.cpp): the op entry points called by
// bindings.cpp, element conversions, and the packed GEMM engine (defined in gram.cpp) that
// gram, ghost_gram and psg_gram all run on.
//
// The GEMM engine is compiled several times for different instruction sets (AVX-512, AVX2+FMA and
// the baseline of the build flags) with function-level target attributes and picked at run time,
// so the library is fast without -march=native and still runs on any x86-64 (or other) CPU.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#include "linft/common.h"

namespace linft {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Op entry points (pointers as integers, see csrc/README.md); bindings.cpp validates arguments.
void gram(std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t N, int64_t M, int64_t P,
          int dtype, int out_dtype);
void ghost_gram(std::uintptr_t x1, std::uintptr_t g1, std::uintptr_t m1, std::uintptr_t x2,
                std::uintptr_t g2, std::uintptr_t m2, std::uintptr_t out, int64_t N, int64_t M,
                int64_t T, int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype);
// Intel AMX path of gram for bf16 inputs and an fp32 output (gram_amx.cpp): usable when the CPU has
// AMX-BF16 and the kernel grants the tile state (checked once); b == nullptr is the symmetric form.
bool amx_bf16_usable();
void gram_bf16_amx(const uint16_t* a, const uint16_t* b, float* out, int64_t N, int64_t M, int64_t P);
void psg_gram(std::uintptr_t x1, std::uintptr_t g1, std::uintptr_t m1, std::uintptr_t x2,
              std::uintptr_t g2, std::uintptr_t m2, std::uintptr_t out, int64_t N, int64_t M,
              int64_t T, int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype,
              int kernel, int tile_dtype);

// ---------------------------------------------------------------------------------------------
// Element conversions. fp16 is IEEE binary16, bf16 the upper half of a binary32; both as uint16.
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Exact for every binary16 value (normals, subnormals, zeros, inf, nan); branch-free so that
// packing loops vectorize (after F. Giesen's half_to_float_fast).
inline float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa
  const uint32_t exp = em & shifted_exp;
  uint32_t u = em + ((127u - 15u) << 23);              // rebias the exponent
  if (exp == shifted_exp) u += (128u - 16u) << 23;     // inf / nan: exponent all ones
  const float normal = bits_to_float(u);
  // zero / subnormal: renormalize through an exact float subtraction of 2^-14
  const float sub = bits_to_float(u + (1u << 23)) - 6.103515625e-05f;
  const float f = exp == 0 ? sub : normal;
  return bits_to_float(float_to_bits(f) | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

inline int64_t dtype_size(int dtype) {
  return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2;
}

// ---------------------------------------------------------------------------------------------
// 64-byte aligned, uninitialized scratch array.
template <class T>
class AlignedArray {
 public:
  AlignedArray() = default;
  explicit AlignedArray(std::size_t n) { resize(n); }
  void resize(std::size_t n) {
    if (n <= cap_) return;
    p_.reset(static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))));
    cap_ = n;
  }
  T* data() { return p_.get(); }
  T& operator[](std::size_t i) { return p_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t(64)); }
  };
  std::unique_ptr<T, Free> p_;
  std::size_t cap_ = 0;
};

// ---------------------------------------------------------------------------------------------
// The real (unmasked) tokens of n samples of T tokens: rows[start[i] .. start[i+1]) are the global
// token rows i*T + t of sample i with mask[i, t] != 0 (mask == nullptr: every token), in order.
struct TokenList {
  std::vector<int64_t> rows;
  std::vector<int64_t> start;
  int64_t count(int64_t i) const { return start[i + 1] - start[i]; }
};

inline TokenList real_tokens(const uint8_t* mask, int64_t n, int64_t T) {
  TokenList tl;
  tl.start.resize(n + 1);
  tl.rows.reserve(mask ? 0 : n * T);
  for (int64_t i = 0; i < n; ++i) {
    tl.start[i] = static_cast<int64_t>(tl.rows.size());
    for (int64_t t = 0; t < T; ++t)
      if (!mask || mask[i * T + t]) tl.rows.push_back(i * T + t);
  }
  tl.start[n] = static_cast<int64_t>(tl.rows.size());
  return tl;
}

// ---------------------------------------------------------------------------------------------
// The packed GEMM engine: C[m, n] += A[m, K] * B[n, K]^T in the accumulator type of C.
//
// An operand is a logical (rows, K) matrix read straight from an input tensor of any input dtype,
// in one of two layouts:
//   row mode  (kmajor == false): element (r, k) = base[row(r) * ld + k],  row(r) = idx ? idx[r] : r
//   k-major   (kmajor == true):  element (r, k) = base[row(k) * ld + r],  row(k) = idx ? idx[k] : k
// Row mode is a feature matrix (gram) or a list of token rows (ghost_gram); k-major is the
// transpose of a list of token rows, i.e. the g^T and x^T of a per-sample gradient F = g^T x
// (psg_gram). The index list is how masked (padding) tokens are skipped.
struct Operand {
  const unsigned char* base = nullptr;  // element (0, 0) of the logical matrix (before idx)
  int dtype = kFloat32;
  int64_t ld = 0;                    // elements between consecutive stored rows
  const int64_t* idx = nullptr;      // optional row (row mode) or token (k-major) index list
  bool kmajor = false;

  // The same operand starting at logical row r0.
  Operand rows_from(int64_t r0) const {
    Operand o = *this;
    if (kmajor) {
      o.base += r0 * dtype_size(dtype);
    } else if (idx) {
      o.idx += r0;
    } else {
      o.base += r0 * ld * dtype_size(dtype);
    }
    return o;
  }
  // The same operand starting at logical column k0 (k0 < K).
  Operand cols_from(int64_t k0) const {
    Operand o = *this;
    if (!kmajor) {
      o.base += k0 * dtype_size(dtype);
    } else if (idx) {
      o.idx += k0;
    } else {
      o.base += k0 * ld * dtype_size(dtype);
    }
    return o;
  }
};

// C (m x n, leading dimension ldc) += A (m x K) * B (n x K)^T. Single-threaded: callers parallelize
// over independent output blocks. Every C element is summed over k in increasing order (in chunks
// of a fixed size), so the result does not depend on how callers block or thread the work.
// upper: A and B index the same rows; micro-tiles strictly below the diagonal of C may be skipped
// (elements with row > column are then unspecified; callers read only row <= column).
void gemm_nt(const Operand& A, const Operand& B, int64_t m, int64_t n, int64_t K, float* C,
             int64_t ldc, bool upper = false);
void gemm_nt(const Operand& A, const Operand& B, int64_t m, int64_t n, int64_t K, double* C,
             int64_t ldc, bool upper = false);

// Name of the instruction set the engine dispatched to ("avx512", "avx2", "generic").
// LINFT_CPU_ISA=generic|avx2|avx512 in the environment caps it (for testing the fallbacks).
const char* simd_name();

// Register tile of the engine for accumulator type T (rows MR of A, columns NR of B): output blocks
// whose sizes are multiples of these waste no work.
int gemm_mr(bool fp64);
int gemm_nr(bool fp64);

// Square output blocks of an N x M result for one thread each: only blocks on/above the diagonal
// when sym (a diagonal block is then computed with gemm_nt(upper = true)). blocks holds their
// (row, column) origins, largest first; each is at most bs x bs. (Defined in gram.cpp.)
struct BlockPlan {
  int64_t bs = 0;
  std::vector<std::pair<int64_t, int64_t>> blocks;
};
BlockPlan plan_blocks(int64_t N, int64_t M, bool sym, int threads, int64_t elem_bytes);

// Partial products (gram's P chunks, psg_gram's tiles), each N x M and contiguous, one after another.
// mirror_upper: copy the strict upper triangle of an N x N partial (leading dimension M, as left by
// gemm_nt(upper = true)) into its lower triangle.
template <class T>
void mirror_upper(T* c, int64_t N, int64_t M) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = i + 1; j < N; ++j) c[j * M + i] = c[i * M + j];
}

// out[N x M] += partials 0 .. count-1, in that order for every element, so the result does not depend
// on the thread count. An OpenMP worksharing loop over out's rows: call it inside a parallel region.
template <class T>
void add_partials(T* out, const T* part, int64_t count, int64_t N, int64_t M) {
#pragma omp for schedule(static)
  for (int64_t i = 0; i < N; ++i) {
    T* o = out + i * M;
    for (int64_t c = 0; c < count; ++c) {
      const T* pc = part + c * N * M + i * M;
      for (int64_t j = 0; j < M; ++j) o[j] += pc[j];
    }
  }
}

// out (leading dimension M) += block c (m x n, contiguous) at (i0, j0). Symmetric form: a diagonal
// block (i0 == j0) holds only its upper triangle, mirrored here; any other block also goes,
// transposed, to (j0, i0).
template <class T>
void add_block(T* out, int64_t M, const T* c, int64_t i0, int64_t j0, int64_t m, int64_t n,
               bool sym) {
  if (!sym) {
    for (int64_t i = 0; i < m; ++i) {
      T* o = out + (i0 + i) * M + j0;
      const T* s = c + i * n;
      for (int64_t j = 0; j < n; ++j) o[j] += s[j];
    }
  } else if (i0 == j0) {
    for (int64_t i = 0; i < m; ++i) {
      out[(i0 + i) * M + i0 + i] += c[i * n + i];
      for (int64_t j = i + 1; j < n; ++j) {
        out[(i0 + i) * M + i0 + j] += c[i * n + j];
        out[(i0 + j) * M + i0 + i] += c[i * n + j];
      }
    }
  } else {
    for (int64_t i = 0; i < m; ++i) {
      T* o = out + (i0 + i) * M + j0;
      const T* s = c + i * n;
      for (int64_t j = 0; j < n; ++j) o[j] += s[j];
    }
    for (int64_t j = 0; j < n; ++j) {  // transposed, written row by row of out
      T* o = out + (j0 + j) * M + i0;
      for (int64_t i = 0; i < m; ++i) o[i] += c[i * n + j];
    }
  }
}

}  // namespace cpu
}  // namespace linft
