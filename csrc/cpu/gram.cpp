// gram: out[N, M] += a[N, P] @ b[M, P]^T, and the packed GEMM engine every CPU op runs on.
//
// Engine (gemm_nt, BLIS-style): C[m, n] += A[m, K] B[n, K]^T.
//   for jc over n in NC columns, pc over K in KC-long chunks:
//     pack B[jc:jc+NC, pc:pc+KC] into NR-wide k-major panels (converted to the accumulator type)
//     for ic over m in MC rows:
//       pack A[ic:ic+MC, pc:pc+KC] into MR-tall k-major panels
//       for each NR-panel of B (stays in L1), for each MR-panel of A (streams from L2):
//         micro-kernel: MR x NR register tile, rank-1 updates over the KC chunk (outer-product
//         form: one broadcast of A times NV vectors of B per row), then added to C.
// Packing reads the input dtype directly (fp32/fp64/fp16/bf16, rows through an optional index
// list), so conversion costs O(1/MC + 1/NC) of the FLOPs and no converted input copy ever exists.
// The micro-kernel uses GCC/Clang vector extensions and is instantiated per instruction set
// (AVX-512, AVX2+FMA, baseline) with function target attributes; the best one the CPU supports is
// picked once at run time.
//
// gram op: OpenMP over square output blocks (only blocks on/above the diagonal in the symmetric
// form); each block is computed by one thread into a zeroed thread-local buffer with the engine and
// then added to out (and, off the diagonal of the symmetric form, transposed into out[j, i]).
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "linft/cpu_kernels.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LINFT_X86_DISPATCH 1
#endif

#define LINFT_AI inline __attribute__((always_inline))

namespace linft {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Vector types (GCC vector extensions) by element type and lane count.
template <class T, int L>
struct Vec;
template <>
struct Vec<float, 4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct Vec<float, 8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<float, 16> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double, 2> {
  typedef double type __attribute__((vector_size(16)));
};
template <>
struct Vec<double, 4> {
  typedef double type __attribute__((vector_size(32)));
};
template <>
struct Vec<double, 8> {
  typedef double type __attribute__((vector_size(64)));
};

// Storage types of the 16-bit inputs.
struct f16s {
  uint16_t v;
};
struct bf16s {
  uint16_t v;
};

template <class T>
LINFT_AI T load_as(const float* p) {
  return static_cast<T>(*p);
}
template <class T>
LINFT_AI T load_as(const double* p) {
  return static_cast<T>(*p);
}
template <class T>
LINFT_AI T load_as(const bf16s* p) {
  return static_cast<T>(bf16_to_float(p->v));
}
template <class T>
LINFT_AI T load_as(const f16s* p) {
  return static_cast<T>(half_to_float(p->v));
}

// ---------------------------------------------------------------------------------------------
// Packing: `rows` logical rows x `kc` columns of an operand (already offset to the block) into
// ceil(rows / R) panels of kc x R (k-major), zero-padded to R rows.
template <class T, class S, int R>
LINFT_AI void pack(const Operand& op, int64_t rows, int64_t kc, T* __restrict dst) {
  const S* base = reinterpret_cast<const S*>(op.base);
  const int64_t np = (rows + R - 1) / R;
  if (op.kmajor) {
    // k-major: each k is a stored row whose R consecutive elements are a panel's rows. k outer, so
    // that each stored row is read once, contiguously (panel-outer order would re-read every
    // cache line once per panel, at a large stride that conflicts in L1).
    for (int64_t k = 0; k < kc; ++k) {
      const S* src = base + (op.idx ? op.idx[k] : k) * op.ld;
      for (int64_t p = 0; p < np; ++p) {
        const int64_t valid = std::min<int64_t>(R, rows - p * R);
        const S* sp = src + p * R;
        T* __restrict dk = dst + p * kc * R + k * R;
        if (valid == R) {
          // Fixed-size copy / conversion, inlined (a plain loop here becomes a memmove call).
          if constexpr (std::is_same<T, S>::value) {
            __builtin_memcpy(dk, sp, R * sizeof(T));
          } else {
            alignas(64) T t[R];
#pragma GCC unroll 32
            for (int r = 0; r < R; ++r) t[r] = load_as<T>(sp + r);
            __builtin_memcpy(dk, t, R * sizeof(T));
          }
        } else {
          for (int r = 0; r < R; ++r) dk[r] = r < valid ? load_as<T>(sp + r) : T(0);
        }
      }
    }
    return;
  }
  for (int64_t p = 0; p < np; ++p) {
    T* __restrict d = dst + p * kc * R;
    const int64_t valid = std::min<int64_t>(R, rows - p * R);
    {
      // Row mode: each logical row is contiguous along k. Converted in 16-column strips through a
      // small R x 16 tile (contiguous reads), then written k-major (contiguous writes). Padding
      // rows read the last valid row (always in bounds) and are then zeroed.
      const S* src[R];
      for (int r = 0; r < R; ++r) {
        const int64_t row = p * R + std::min<int64_t>(r, valid - 1);
        src[r] = base + (op.idx ? op.idx[row] : row) * op.ld;
      }
      alignas(64) T tile[R][16];
      for (int64_t k0 = 0; k0 < kc; k0 += 16) {
        const int64_t kb = std::min<int64_t>(16, kc - k0);
        if (kb == 16) {
          for (int r = 0; r < R; ++r)
            for (int kk = 0; kk < 16; ++kk) tile[r][kk] = load_as<T>(src[r] + k0 + kk);
        } else {
          for (int r = 0; r < R; ++r)
            for (int kk = 0; kk < kb; ++kk) tile[r][kk] = load_as<T>(src[r] + k0 + kk);
        }
        for (int r = static_cast<int>(valid); r < R; ++r)
          for (int kk = 0; kk < 16; ++kk) tile[r][kk] = T(0);
        for (int64_t kk = 0; kk < kb; ++kk)
          for (int r = 0; r < R; ++r) d[(k0 + kk) * R + r] = tile[r][kk];
      }
    }
  }
}

template <class T, int R>
LINFT_AI void pack_any(const Operand& op, int64_t rows, int64_t kc, T* dst) {
  switch (op.dtype) {
    case kFloat32: pack<T, float, R>(op, rows, kc, dst); break;
    case kFloat64: pack<T, double, R>(op, rows, kc, dst); break;
    case kFloat16: pack<T, f16s, R>(op, rows, kc, dst); break;
    default: pack<T, bf16s, R>(op, rows, kc, dst); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Micro-kernel: C[MR x NR] (leading dimension ldc) += sum_k Ap[k, :]^T Bp[k, :], NR = NV * L lanes.
// MR * NV accumulators stay in registers (24 zmm for AVX-512, 12 ymm/xmm otherwise). Consecutive k
// of A are AS elements apart: MR in an A panel, NR when A's rows are read from a B panel (syrk_impl).
template <class T, int L, int MR, int NV, int AS = MR>
LINFT_AI void micro(int64_t kc, const T* __restrict Ap, const T* __restrict Bp, T* __restrict C,
                    int64_t ldc) {
  typedef typename Vec<T, L>::type V;
  constexpr int NR = NV * L;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const V*>(Bp + k * NR + v * L);
    const T* a = Ap + k * AS;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V ar = a[r] - V{};  // broadcast (x - 0 == x for every x, folded away)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      V c;
      std::memcpy(&c, C + r * ldc + v * L, sizeof(V));
      c += acc[r][v];
      std::memcpy(C + r * ldc + v * L, &c, sizeof(V));
    }
}

// One mr x nr (at most MR x NR) tile of C: the micro-kernel straight into C when the tile is whole;
// at the edges the full tile into the zeroed scratch tmp (MR * NR values) and its valid part into C.
template <class T, int L, int MR, int NV, int AS = MR>
LINFT_AI void tile(int64_t kc, const T* __restrict Ap, const T* __restrict Bp, T* __restrict C,
                   int64_t ldc, int64_t mr, int64_t nr, T* __restrict tmp) {
  constexpr int NR = NV * L;
  if (mr == MR && nr == NR) {
    micro<T, L, MR, NV, AS>(kc, Ap, Bp, C, ldc);
    return;
  }
  for (int i = 0; i < MR * NR; ++i) tmp[i] = T(0);
  micro<T, L, MR, NV, AS>(kc, Ap, Bp, tmp, NR);
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) C[i * ldc + j] += tmp[i * NR + j];
}

// Per-thread packing buffers (kept between calls; bounded by MC*KC + NC*KC elements).
thread_local AlignedArray<unsigned char> tls_apack, tls_bpack;

constexpr int64_t kKC = 256;  // k chunk of every product: C gets each chunk's sum, in k order

// Symmetric product of few rows (m <= kSyrkRows): C[i, j] += A_i . A_j for i <= j, with the
// operand packed once per k chunk. gemm_impl packs it twice, as A panels and as B panels, which for
// a Gram of ~128 rows costs about what the skipped lower triangle saves. Here the rows are packed
// into NR-wide k-major panels; each NR-column panel of C is computed for the rows up to its last
// column, MR rows at a time, whose values the micro-kernel broadcasts straight from their panel (MR
// divides NR, so MR rows never straddle two panels). With NR = 32, about 62% of the full product
// at 128 rows. Each element is summed in the same order as by gemm_impl (kKC chunks, k ascending).
constexpr int64_t kSyrkRows = 384;

template <class T, int L, int MR, int NV>
LINFT_AI void syrk_impl(const Operand& A, int64_t m, int64_t K, T* __restrict C, int64_t ldc) {
  constexpr int NR = NV * L;
  static_assert(NR % MR == 0, "MR rows must lie in one NR-wide panel");
  const int64_t np = (m + NR - 1) / NR;
  const int64_t kcap = std::min<int64_t>(kKC, K);
  tls_bpack.resize(np * NR * kcap * sizeof(T));
  T* Pk = reinterpret_cast<T*>(tls_bpack.data());
  alignas(64) T tmp[MR * NR];
  for (int64_t pc = 0; pc < K; pc += kKC) {
    const int64_t kc = std::min(kKC, K - pc);
    pack_any<T, NR>(A.cols_from(pc), m, kc, Pk);
    for (int64_t jp = 0; jp < np; ++jp) {
      const int64_t c0 = jp * NR, nr = std::min<int64_t>(NR, m - c0);
      const T* bp = Pk + jp * kc * NR;
      for (int64_t r0 = 0; r0 < c0 + nr; r0 += MR) {
        const int64_t mr = std::min<int64_t>(MR, m - r0);
        const T* ap = Pk + (r0 / NR) * kc * NR + r0 % NR;  // rows past m are packed as zeros
        T* c = C + r0 * ldc + c0;
        tile<T, L, MR, NV, NR>(kc, ap, bp, c, ldc, mr, nr, tmp);
      }
    }
  }
}

bool same_rows(const Operand& A, const Operand& B) {
  return A.base == B.base && A.dtype == B.dtype && A.ld == B.ld && A.idx == B.idx &&
         A.kmajor == B.kmajor;
}

// SMR x SNV: the register tile of syrk_impl, which gemm_nt(upper) takes for few rows of one operand.
template <class T, int L, int MR, int NV, int SMR, int SNV>
LINFT_AI void gemm_impl(const Operand& A, const Operand& B, int64_t m, int64_t n, int64_t K,
                        T* __restrict C, int64_t ldc, bool upper) {
  if (upper && m == n && m <= kSyrkRows && same_rows(A, B)) {
    syrk_impl<T, L, SMR, SNV>(A, m, K, C, ldc);
    return;
  }
  constexpr int NR = NV * L;
  constexpr int64_t KC = kKC;      // k chunk: an NR x KC panel of B stays in L1
  constexpr int64_t MC = 16 * MR;  // an MC x KC block of A stays in L2
  constexpr int64_t NC = 64 * NR;  // an NC x KC block of B stays in L2/L3
  if (m <= 0 || n <= 0 || K <= 0) return;
  const int64_t mcap = std::min<int64_t>(MC, (m + MR - 1) / MR * MR);
  const int64_t ncap = std::min<int64_t>(NC, (n + NR - 1) / NR * NR);
  const int64_t kcap = std::min<int64_t>(KC, K);
  tls_apack.resize(mcap * kcap * sizeof(T));
  tls_bpack.resize(ncap * kcap * sizeof(T));
  T* Ap = reinterpret_cast<T*>(tls_apack.data());
  T* Bp = reinterpret_cast<T*>(tls_bpack.data());
  alignas(64) T tmp[MR * NR];
  for (int64_t jc = 0; jc < n; jc += NC) {
    const int64_t nc = std::min(NC, n - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      bool packed_b = false;
      for (int64_t ic = 0; ic < m; ic += MC) {
        const int64_t mc = std::min(MC, m - ic);
        if (upper && ic >= jc + nc) break;  // whole block below the diagonal
        if (!packed_b) {
          pack_any<T, NR>(B.rows_from(jc).cols_from(pc), nc, kc, Bp);
          packed_b = true;
        }
        pack_any<T, MR>(A.rows_from(ic).cols_from(pc), mc, kc, Ap);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t nr = std::min<int64_t>(NR, nc - jr);
          const T* bp = Bp + jr * kc;
          for (int64_t ir = 0; ir < mc; ir += MR) {
            const int64_t r0 = ic + ir, c0 = jc + jr;
            if (upper && r0 >= c0 + nr) break;  // this and later row panels are below the diagonal
            const int64_t mr = std::min<int64_t>(MR, mc - ir);
            const T* ap = Ap + ir * kc;
            T* c = C + r0 * ldc + c0;
            tile<T, L, MR, NV>(kc, ap, bp, c, ldc, mr, nr, tmp);
          }
        }
      }
    }
  }
}

using GemmF32 = void (*)(const Operand&, const Operand&, int64_t, int64_t, int64_t, float*, int64_t,
                         bool);
using GemmF64 = void (*)(const Operand&, const Operand&, int64_t, int64_t, int64_t, double*,
                         int64_t, bool);

// Baseline (whatever the build flags allow; 16-byte vectors, 16 registers).
void gemm_generic_f32(const Operand& A, const Operand& B, int64_t m, int64_t n, int64_t K, float* C,
                      int64_t ldc, bool upper) {
  gemm_impl<float, 4, 6, 2, 4, 2>(A, B, m, n, K, C, ldc, upper);
}
void gemm_generic_f64(const Operand& A, const Operand& B, int64_t m, int64_t n, int64_t K,
                      double* C, int64_t ldc, bool upper) {
  gemm_impl<double, 2, 6, 2, 2, 2>(A, B, m, n, K, C, ldc, upper);
}

#ifdef LINFT_X86_DISPATCH
#define LINFT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define LINFT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))

LINFT_TARGET_AVX2 void gemm_avx2_f32(const Operand& A, const Operand& B, int64_t m, int64_t n,
                                     int64_t K, float* C, int64_t ldc, bool upper) {
  gemm_impl<float, 8, 6, 2, 4, 2>(A, B, m, n, K, C, ldc, upper);
}
LINFT_TARGET_AVX2 void gemm_avx2_f64(const Operand& A, const Operand& B, int64_t m, int64_t n,
                                     int64_t K, double* C, int64_t ldc, bool upper) {
  gemm_impl<double, 4, 6, 2, 4, 2>(A, B, m, n, K, C, ldc, upper);
}
LINFT_TARGET_AVX512 void gemm_avx512_f32(const Operand& A, const Operand& B, int64_t m, int64_t n,
                                         int64_t K, float* C, int64_t ldc, bool upper) {
  gemm_impl<float, 16, 12, 2, 8, 2>(A, B, m, n, K, C, ldc, upper);
}
LINFT_TARGET_AVX512 void gemm_avx512_f64(const Operand& A, const Operand& B, int64_t m, int64_t n,
                                         int64_t K, double* C, int64_t ldc, bool upper) {
  gemm_impl<double, 8, 12, 2, 8, 2>(A, B, m, n, K, C, ldc, upper);
}
#endif

struct Engine {
  GemmF32 f32;
  GemmF64 f64;
  const char* name;
  int mr, nr32, nr64;
};

Engine pick_engine() {
  std::string cap;
  if (const char* e = std::getenv("LINFT_CPU_ISA")) cap = e;
  const Engine generic{gemm_generic_f32, gemm_generic_f64, "generic", 6, 8, 4};
  if (cap == "generic") return generic;
#ifdef LINFT_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw");
  if (avx512 && cap != "avx2") return {gemm_avx512_f32, gemm_avx512_f64, "avx512", 12, 32, 16};
  if (avx2) return {gemm_avx2_f32, gemm_avx2_f64, "avx2", 6, 16, 8};
#endif
  return generic;
}

const Engine& engine() {
  static const Engine e = pick_engine();
  return e;
}

// ---------------------------------------------------------------------------------------------
// gram op: one thread per output block (see plan_blocks), computed into a zeroed thread-local
// buffer and then added to out.
template <class T>
void gram_run(const Operand& A, const Operand& B, bool sym, int64_t N, int64_t M, int64_t P,
              T* out) {
  // Few rows, long P (at most 256 x 256 outputs, P >= 16384): output blocks alone give too little
  // parallel work (and tiny blocks waste register tiles), so P is cut into S chunks (lengths
  // multiples of 4096, S <= 16, fixed by the shape alone). Each chunk's N x M product goes to its
  // own partial (at most 16 x 256 KiB in fp32), and the partials are added to out in chunk order:
  // the result depends on the shape only, not on the thread count.
  if (N * M <= 256 * 256 && P >= 16384) {
    const int64_t S = std::min<int64_t>(16, P / 8192);
    const int64_t len = (P / S + 4095) / 4096 * 4096;
    const int64_t nchunk = (P + len - 1) / len;
    AlignedArray<T> part(static_cast<std::size_t>(nchunk * N * M));
#pragma omp parallel
    {
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < nchunk; ++c) {
        const int64_t k0 = c * len, kl = std::min(len, P - k0);
        T* pc = part.data() + c * N * M;
        std::fill(pc, pc + N * M, T(0));
        gemm_nt(A.cols_from(k0), B.cols_from(k0), N, M, kl, pc, M, sym);
        if (sym) mirror_upper(pc, N, M);  // only the upper triangle was computed
      }
      add_partials(out, part.data(), nchunk, N, M);
    }
    return;
  }
  const BlockPlan plan = plan_blocks(N, M, sym, omp_get_max_threads(), sizeof(T));
  const int64_t bs = plan.bs, nw = static_cast<int64_t>(plan.blocks.size());
#pragma omp parallel if (nw > 1)
  {
    thread_local AlignedArray<T> cl;
    cl.resize(bs * bs);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < nw; ++w) {
      const int64_t i0 = plan.blocks[w].first, j0 = plan.blocks[w].second;
      const int64_t m = std::min(bs, N - i0), n = std::min(bs, M - j0);
      const bool diag = sym && i0 == j0;
      T* c = cl.data();
      std::fill(c, c + m * n, T(0));
      gemm_nt(A.rows_from(i0), B.rows_from(j0), m, n, P, c, n, diag);
      add_block(out, M, c, i0, j0, m, n, sym);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void gemm_nt(const Operand& A, const Operand& B, int64_t m, int64_t n, int64_t K, float* C,
             int64_t ldc, bool upper) {
  engine().f32(A, B, m, n, K, C, ldc, upper);
}
void gemm_nt(const Operand& A, const Operand& B, int64_t m, int64_t n, int64_t K, double* C,
             int64_t ldc, bool upper) {
  engine().f64(A, B, m, n, K, C, ldc, upper);
}
const char* simd_name() { return engine().name; }
int gemm_mr(bool) { return engine().mr; }
int gemm_nr(bool fp64) { return fp64 ? engine().nr64 : engine().nr32; }

BlockPlan plan_blocks(int64_t N, int64_t M, bool sym, int threads, int64_t elem_bytes) {
  // Candidates are mostly multiples of 96 (a multiple of every register tile), then 48. Larger blocks
  // read the inputs fewer times (traffic ~ N M P (2 / bs) elements), but the thread-local block
  // must stay in L2 (at most 1.25 MiB). The largest block size whose list schedule over `threads`
  // is within 15% of perfect balance wins. The choice changes no result (see gemm_nt).
  // 512 and 256 (multiples of NR, not of every MR) split power-of-two sizes evenly.
  static const int64_t cand[] = {576, 512, 480, 384, 288, 256, 192, 96, 48};
  BlockPlan best;
  for (int64_t bs : cand) {
    if (bs * bs * elem_bytes > (int64_t(5) << 18) && bs > 96) continue;
    BlockPlan plan;
    plan.bs = bs;
    std::vector<std::pair<double, std::pair<int64_t, int64_t>>> work;
    double total = 0;
    for (int64_t i0 = 0; i0 < N; i0 += bs)
      for (int64_t j0 = sym ? i0 : 0; j0 < M; j0 += bs) {
        const double m = static_cast<double>(std::min(bs, N - i0));
        const double n = static_cast<double>(std::min(bs, M - j0));
        const double w = (sym && i0 == j0) ? m * (n + 1) / 2 : m * n;
        work.push_back({w, {i0, j0}});
        total += w;
      }
    // Longest first, then the dynamic schedule is a list schedule: simulate it.
    std::stable_sort(work.begin(), work.end(),
                     [](const auto& x, const auto& y) { return x.first > y.first; });
    std::vector<double> load(static_cast<std::size_t>(std::max(threads, 1)), 0.0);
    for (const auto& w : work) {
      *std::min_element(load.begin(), load.end()) += w.first;
      plan.blocks.push_back(w.second);
    }
    const double makespan = *std::max_element(load.begin(), load.end());
    best = std::move(plan);
    if (makespan <= 1.15 * total / static_cast<double>(load.size())) break;
  }
  return best;
}

void gram(std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, int64_t N, int64_t M, int64_t P,
          int dtype, int out_dtype) {
  if (N <= 0 || M <= 0 || P <= 0) return;
  const bool sym = b == 0;
  if (dtype == kBFloat16 && out_dtype == kFloat32 && amx_bf16_usable()) {
    gram_bf16_amx(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b),
                  reinterpret_cast<float*>(out), N, M, P);
    return;
  }
  Operand A;
  A.base = reinterpret_cast<const unsigned char*>(a);
  A.dtype = dtype;
  A.ld = P;
  Operand B = A;
  if (!sym) B.base = reinterpret_cast<const unsigned char*>(b);
  if (out_dtype == kFloat64)
    gram_run<double>(A, B, sym, N, M, P, reinterpret_cast<double*>(out));
  else
    gram_run<float>(A, B, sym, N, M, P, reinterpret_cast<float*>(out));
}

}  // namespace cpu
}  // namespace linft
