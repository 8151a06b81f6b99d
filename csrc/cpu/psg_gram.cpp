// psg_gram: out[i, j] += <F1_i, F2_j>, F_i = sum_t m[i,t] g[i,t,:]^T x[i,t,:] (d_out x d_in), with
// kernel 0 (sgd) <F_i, F_j>, 1 (signgd) <sign F_i, sign F_j>, 2 (asymmetric-signgd)
// <F_i, sign F_j>.
//
// Blocking. The (d_out, d_in) plane is cut into tiles of Ob x Db. For each tile, in order:
//   phase 1 (OpenMP over samples): the tile of every per-sample gradient, F_n[o0:o0+Ob, d0:d0+Db] =
//     g_n[:, o0:]^T x_n[:, d0:] over the real tokens of n, is built by the GEMM engine (k-major
//     operands: K = tokens) into a buffer of N (+ M) rows of Ob*Db values, then signed if needed;
//   phase 2 (OpenMP over square output blocks, upper blocks only in the symmetric form): the Gram
//     of those rows, each block into a zeroed thread-local buffer, added to out (and mirrored).
// Only one tile of the per-sample gradients exists at a time (sized so the buffer is about 8 MiB).
// Each out element receives the tile results in tile order, each computed by one thread in a fixed
// order, so the result does not depend on the thread count.
//
// Kernel 2 is never symmetric: with x2 == 0 the second operand is sign(F1) (a second buffer).
//
// Precision: the tiles of F are built in TF and the Gram of phase 2 in the output type T. TF = T
// by default (exact to T's rounding); TF = float with a double output is the mixed mode of an fp32
// model with fp64 accumulation: each F entry is a sum over one sample's tokens in fp32 (as the
// model's own weight gradient would be), the Gram over all of F in fp64.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "linft/cpu_kernels.h"

namespace linft {
namespace cpu {
namespace {

// dst = sign(src) elementwise, src == dst allowed (sign(0) = 0, nan stays nan). Branch-free so that
// it vectorizes (gradient signs are random: a branch would mispredict half the time).
template <class T>
inline void to_sign(const T* src, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const T v = src[k];
    const T s = static_cast<T>(v > T(0)) - static_cast<T>(v < T(0));
    dst[k] = v == v ? s : v;
  }
}

struct Side {
  Operand x, g;  // k-major operands over the token rows (idx set per sample)
  TokenList tok;
  int64_t n = 0;
};

void build_side(Side& sd, const unsigned char* x, const unsigned char* g, const uint8_t* mask,
                int64_t n, int64_t T, int64_t d_in, int64_t d_out, int dtype) {
  sd.n = n;
  sd.tok = real_tokens(mask, n, T);
  sd.x.base = x;
  sd.x.dtype = dtype;
  sd.x.ld = d_in;
  sd.x.kmajor = true;
  sd.g = sd.x;
  sd.g.base = g;
  sd.g.ld = d_out;
}

// F (ob x db, leading dimension db) = tile (o0, d0) of the per-sample gradient of sample i.
template <class T>
void build_tile(const Side& sd, int64_t i, int64_t o0, int64_t d0, int64_t ob, int64_t db, T* F) {
  std::fill(F, F + ob * db, T(0));
  const int64_t cnt = sd.tok.count(i);
  if (cnt == 0) return;
  Operand g = sd.g.rows_from(o0), x = sd.x.rows_from(d0);
  g.idx = x.idx = sd.tok.rows.data() + sd.tok.start[i];
  gemm_nt(g, x, ob, db, cnt, F, db);
}

template <class TF, class T>
void psg_run(const Side& s1, const Side* s2, bool sym, int kernel, int64_t M, int64_t d_in,
             int64_t d_out, T* out) {
  const int64_t N = s1.n;
  const int nt = omp_get_max_threads();
  const bool fp64 = sizeof(T) == 8;
  const int tile_code = sizeof(TF) == 8 ? kFloat64 : kFloat32;
  const int64_t mr = gemm_mr(fp64), nr = gemm_nr(fp64);
  // Second operand of phase 2: F1 itself (symmetric sgd/signgd), sign(F1) (symmetric asymmetric-
  // signgd), or side 2's own buffer.
  const bool gram_sym = sym && kernel != kAsymmetricSignGD;
  const int64_t rows2 = gram_sym ? 0 : M;
  const bool sign1 = kernel == kSignGD, sign2 = kernel != kSGD;

  // Tile shape. Phase 1 reads every x and g row once per tile column / row, so it wants large
  // tiles; phase 2 reads the whole buffer at least twice per tile, so it should stay cache-sized.
  // Hence a buffer of about 8 MiB, with 96 x 96 to 256 x 256 values per sample (and never more than
  // 64 MiB). Ob is a multiple of MR and Db of NR, split evenly over d_out and d_in.
  const int64_t rows = N + rows2, esz = static_cast<int64_t>(sizeof(TF));
  auto round_up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
  int64_t E = std::min<int64_t>(65536, std::max<int64_t>(9216, (int64_t(8) << 20) / (rows * esz)));
  E = std::max(mr * nr, std::min(E, (int64_t(64) << 20) / (rows * esz)));
  int64_t Db = 1;
  while ((Db + 1) * (Db + 1) <= E) ++Db;  // about sqrt(E)
  Db = std::min(d_in, round_up(Db, nr));
  int64_t Ob = std::min(d_out, std::max(mr, E / Db / mr * mr));
  if (Ob == d_out) Db = std::min(d_in, std::max(nr, E / Ob / nr * nr));  // room left: widen
  {  // even splits (fewer ragged edge tiles)
    const int64_t n_o = (d_out + Ob - 1) / Ob, n_d = (d_in + Db - 1) / Db;
    Ob = std::min(d_out, round_up((d_out + n_o - 1) / n_o, mr));
    Db = std::min(d_in, round_up((d_in + n_d - 1) / n_d, nr));
  }
  E = Ob * Db;  // buffer row stride (edge tiles use a prefix)

  // The tiles, in the order their results are added to out.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t o0 = 0; o0 < d_out; o0 += Ob)
    for (int64_t d0 = 0; d0 < d_in; d0 += Db) tiles.push_back({o0, d0});
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  const int64_t n_build = N + ((s2 != nullptr) ? M : 0);
  const int64_t brows = N + rows2;  // buffer rows of one tile: F1 (N), then F2 / sign(F1) (rows2)

  // Tile-parallel path (used when there are at least two tiles per thread and the per-thread
  // buffers fit 64 MiB in all): each tile is one work unit of one thread, which builds the tile of
  // every per-sample gradient into its own buffer (brows x E, the ~8 MiB above) and multiplies it
  // into a private N x M partial (mirrored when symmetric). No barrier between the two phases, and
  // both run on all threads at once. Partials of a batch of tiles (at most 32 MiB of them, at least
  // one tile) are then added to out in tile order, so every out element receives exactly the same
  // sequence of additions as in the phase-synchronized path below: results are identical between
  // the two paths and independent of the thread count.
  const int64_t pbytes = N * M * static_cast<int64_t>(sizeof(T));
  if (ntiles >= 2 * nt && int64_t(nt) * brows * E * esz <= (int64_t(64) << 20)) {
    const int64_t batch = std::max<int64_t>(1, std::min(ntiles, (int64_t(32) << 20) / pbytes));
    AlignedArray<T> part(static_cast<std::size_t>(batch * N * M));
#pragma omp parallel
    {
      thread_local AlignedArray<TF> buf;
      buf.resize(brows * E);
      Operand A;
      A.base = reinterpret_cast<const unsigned char*>(buf.data());
      A.dtype = tile_code;
      A.ld = E;
      Operand B = A;
      if (!gram_sym) B.base = reinterpret_cast<const unsigned char*>(buf.data() + N * E);
      for (int64_t t0 = 0; t0 < ntiles; t0 += batch) {
        const int64_t t1 = std::min(ntiles, t0 + batch);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t o0 = tiles[t].first, d0 = tiles[t].second;
          const int64_t ob = std::min(Ob, d_out - o0), db = std::min(Db, d_in - d0);
          const int64_t e = ob * db;
          for (int64_t s = 0; s < n_build; ++s) {
            TF* f = buf.data() + s * E;
            if (s < N) {
              build_tile(s1, s, o0, d0, ob, db, f);
              if (sym && kernel == kAsymmetricSignGD)
                to_sign(f, buf.data() + (N + s) * E, e);
              else if (sign1)
                to_sign(f, f, e);
            } else {
              build_tile(*s2, s - N, o0, d0, ob, db, f);
              if (sign2) to_sign(f, f, e);
            }
          }
          T* c = part.data() + (t - t0) * N * M;
          std::fill(c, c + N * M, T(0));
          gemm_nt(A, B, N, M, e, c, M, gram_sym);
          if (gram_sym) mirror_upper(c, N, M);  // only the upper triangle was computed
        }
        add_partials(out, part.data(), t1 - t0, N, M);  // in tile order
      }
    }
    return;
  }

  // Phase-synchronized path (few tiles: the parallelism is over samples, then output blocks).
  AlignedArray<TF> F1(N * E), F2(std::max<int64_t>(rows2, 1) * E);
  Operand A;
  A.base = reinterpret_cast<const unsigned char*>(F1.data());
  A.dtype = tile_code;
  A.ld = E;
  Operand B = A;
  if (!gram_sym) B.base = reinterpret_cast<const unsigned char*>(F2.data());

  // Output blocks of phase 2 (as in gram).
  const BlockPlan plan = plan_blocks(N, M, gram_sym, nt, sizeof(T));
  const int64_t bs = plan.bs, nw = static_cast<int64_t>(plan.blocks.size());

#pragma omp parallel
  {
    thread_local AlignedArray<T> cl;
    cl.resize(bs * bs);
    for (int64_t ti = 0; ti < ntiles; ++ti) {
      {
        const int64_t o0 = tiles[ti].first, d0 = tiles[ti].second;
        const int64_t ob = std::min(Ob, d_out - o0), db = std::min(Db, d_in - d0);
        const int64_t e = ob * db;
        // Phase 1: per-sample gradient tiles (and signs).
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < n_build; ++s) {
          if (s < N) {
            TF* f = F1.data() + s * E;
            build_tile(s1, s, o0, d0, ob, db, f);
            if (sym && kernel == kAsymmetricSignGD) {
              TF* g = F2.data() + s * E;
              to_sign(f, g, e);
            } else if (sign1) {
              to_sign(f, f, e);
            }
          } else {
            TF* f = F2.data() + (s - N) * E;
            build_tile(*s2, s - N, o0, d0, ob, db, f);
            if (sign2)
              to_sign(f, f, e);
          }
        }
        // Phase 2: Gram of the tile rows, K = e.
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < nw; ++w) {
          const int64_t i0 = plan.blocks[w].first, j0 = plan.blocks[w].second;
          const int64_t m = std::min(bs, N - i0), n = std::min(bs, M - j0);
          T* c = cl.data();
          std::fill(c, c + m * n, T(0));
          gemm_nt(A.rows_from(i0), B.rows_from(j0), m, n, e, c, n, gram_sym && i0 == j0);
          add_block(out, M, c, i0, j0, m, n, gram_sym);
        }
      }
    }
  }
}

}  // namespace

void psg_gram(std::uintptr_t x1, std::uintptr_t g1, std::uintptr_t m1, std::uintptr_t x2,
              std::uintptr_t g2, std::uintptr_t m2, std::uintptr_t out, int64_t N, int64_t M,
              int64_t T, int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype,
              int kernel, int tile_dtype) {
  if (N <= 0 || M <= 0 || T <= 0 || S <= 0 || d_in <= 0 || d_out <= 0) return;
  const bool sym = x2 == 0;
  Side s1, s2;
  build_side(s1, reinterpret_cast<const unsigned char*>(x1),
             reinterpret_cast<const unsigned char*>(g1), reinterpret_cast<const uint8_t*>(m1), N, T,
             d_in, d_out, dtype);
  if (!sym)
    build_side(s2, reinterpret_cast<const unsigned char*>(x2),
               reinterpret_cast<const unsigned char*>(g2), reinterpret_cast<const uint8_t*>(m2), M,
               S, d_in, d_out, dtype);
  const Side* second = sym ? nullptr : &s2;
  if (out_dtype == kFloat64 && tile_dtype == kFloat32)
    psg_run<float, double>(s1, second, sym, kernel, M, d_in, d_out, reinterpret_cast<double*>(out));
  else if (out_dtype == kFloat64)
    psg_run<double, double>(s1, second, sym, kernel, M, d_in, d_out, reinterpret_cast<double*>(out));
  else
    psg_run<float, float>(s1, second, sym, kernel, M, d_in, d_out, reinterpret_cast<float*>(out));
}

}  // namespace cpu
}  // namespace linft
