// ghost_gram: out[i, j] += sum_{t,s} m1[i,t] m2[j,s] (x1[i,t].x2[j,s]) (g1[i,t].g2[j,s]).
//
// Blocking. The real tokens of each side are compacted into one list (masked tokens are never
// read).
// Samples are then grouped into "token tiles" of at most R rows:
//   * consecutive short samples share one tile (a group of several whole samples), so short
//     sequences (down to T = 1) still give the GEMM engine R x R tiles;
//   * a sample longer than R forms a group of its own, split into ceil(count / R) tiles.
// An item is a pair of groups (A, B) (B >= A in the symmetric form). For each row tile a of A and
// each column tile b of B the engine computes the two small products Xp = X_a X_b^T (K = d_in) and
// Gp = G_a G_b^T (K = d_out) into R x R buffers, and the sum of Xp * Gp over each (sample, sample)
// segment goes to the item's |A| x |B| partial. No T x S matrix larger than a tile ever exists.
//
// Parallel work units are (item, row tile a); each writes its own partial, and the partials of an
// item are added in the order of a. Units are processed in batches to bound that storage. The
// arithmetic is fixed by the shapes and masks alone, so results do not depend on the thread count.
//
// Symmetric form: only items with B >= A; an off-diagonal item is added to out[A, B] and,
// transposed, to out[B, A]. A diagonal item of several samples sums only sample pairs i <= j and
// mirrors them; a diagonal item of one long sample uses tile pairs b >= a only (weight 2 for
// b > a). The result is exactly symmetric.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "linft/cpu_kernels.h"

namespace linft {
namespace cpu {
namespace {

constexpr int64_t kTile = 192;  // token rows per tile (a multiple of every engine register tile)

struct Seg {  // rows [r0, r1) of a tile belong to sample `local` of the tile's group
  int64_t r0, r1, local;
};
struct Tile {
  int64_t pos;         // first row in the compacted token list
  int64_t rows;        // number of rows
  int64_t seg0, seg1;  // its segments
};
struct Group {
  int64_t s0, s1;      // samples [s0, s1)
  int64_t tl0, tl1;    // its tiles
};

struct Side {
  Operand x, g;        // row-mode operands over the compacted token rows
  TokenList tok;
  std::vector<Tile> tiles;
  std::vector<Seg> segs;
  std::vector<Group> groups;
};

void build_side(Side& sd, const unsigned char* x, const unsigned char* g, const uint8_t* mask,
                int64_t n, int64_t T, int64_t d_in, int64_t d_out, int dtype) {
  sd.tok = real_tokens(mask, n, T);
  sd.x.base = x;
  sd.x.dtype = dtype;
  sd.x.ld = d_in;
  sd.x.idx = sd.tok.rows.data();
  sd.g = sd.x;
  sd.g.base = g;
  sd.g.ld = d_out;

  auto close_group = [&](int64_t s0, int64_t s1) {
    if (s1 <= s0) return;
    Group gr{s0, s1, static_cast<int64_t>(sd.tiles.size()), 0};
    const int64_t total = sd.tok.start[s1] - sd.tok.start[s0];
    if (s1 - s0 == 1 && total > kTile) {  // one long sample: split into near-equal tiles
      // (sizes rounded up to a multiple of 32, so that they fill the engine's register tiles)
      const int64_t nt = (total + kTile - 1) / kTile;
      const int64_t per = std::min(kTile, ((total + nt - 1) / nt + 31) / 32 * 32);
      for (int64_t p = 0; p < total; p += per) {
        const int64_t rows = std::min(per, total - p);
        sd.tiles.push_back({sd.tok.start[s0] + p, rows, static_cast<int64_t>(sd.segs.size()), 0});
        sd.segs.push_back({0, rows, 0});
        sd.tiles.back().seg1 = static_cast<int64_t>(sd.segs.size());
      }
    } else if (total > 0) {  // whole samples in one tile
      Tile t{sd.tok.start[s0], total, static_cast<int64_t>(sd.segs.size()), 0};
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t r0 = sd.tok.start[s] - sd.tok.start[s0];
        const int64_t r1 = sd.tok.start[s + 1] - sd.tok.start[s0];
        if (r1 > r0) sd.segs.push_back({r0, r1, s - s0});
      }
      t.seg1 = static_cast<int64_t>(sd.segs.size());
      sd.tiles.push_back(t);
    }
    gr.tl1 = static_cast<int64_t>(sd.tiles.size());
    if (gr.tl1 > gr.tl0) sd.groups.push_back(gr);  // groups without real tokens add nothing
  };
  // Greedy grouping: consecutive samples while the group's tokens fit one tile (and at most kTile
  // samples, which bounds the partials); a longer sample is a group on its own.
  int64_t s0 = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int64_t c = sd.tok.count(s);
    const int64_t cur = sd.tok.start[s] - sd.tok.start[s0];
    if (c > kTile) {
      close_group(s0, s);
      close_group(s, s + 1);
      s0 = s + 1;
    } else if (cur + c > kTile || s - s0 >= kTile) {
      close_group(s0, s);
      s0 = s;
    }
  }
  close_group(s0, n);
}

struct Item {
  int64_t a, b;         // group indices (side 1, side 2)
  int64_t unit0, unit1;  // its units in the batch
  int64_t size;         // |A| * |B|
};

template <class T>
void ghost_run(const Side& s1, const Side& s2, bool sym, int64_t M, int64_t d_in, int64_t d_out,
               T* out) {
  const int nt = omp_get_max_threads();
  const int64_t ng1 = static_cast<int64_t>(s1.groups.size());
  const int64_t ng2 = static_cast<int64_t>(s2.groups.size());
  // Items in order; batches of whole items, each at least ~16 units per thread (for balance) and
  // bounded partial storage.
  const int64_t unit_target = 16 * static_cast<int64_t>(nt);
  const int64_t store_cap = int64_t(1) << 21;

  std::vector<Item> items;
  std::vector<int64_t> unit_item, unit_tile, unit_off;  // per unit in the batch
  std::vector<T> partial;

  if (ng1 == 0 || ng2 == 0) return;  // every token masked on one side
  int64_t ga = 0, gb = 0;            // next item
  for (;;) {
    items.clear();
    unit_item.clear();
    unit_tile.clear();
    unit_off.clear();
    int64_t units = 0, store = 0;
    while (units < unit_target && store < store_cap && ga < ng1) {
      const int64_t a = ga, b = gb;
      if (++gb >= ng2) {
        ++ga;
        gb = sym ? ga : 0;
      }
      const Group& A = s1.groups[a];
      const Group& B = s2.groups[b];
      const int64_t size = (A.s1 - A.s0) * (B.s1 - B.s0);
      Item it{a, b, units, 0, size};
      for (int64_t tl = A.tl0; tl < A.tl1; ++tl) {
        unit_item.push_back(static_cast<int64_t>(items.size()));
        unit_tile.push_back(tl);
        unit_off.push_back(store);
        store += size;
        ++units;
      }
      it.unit1 = units;
      items.push_back(it);
    }
    if (items.empty()) break;
    partial.assign(store, T(0));
    const int64_t nitems = static_cast<int64_t>(items.size());

#pragma omp parallel if (units > 1)
    {
      thread_local AlignedArray<T> xp, gp;  // the two product tiles, kept between calls
      xp.resize(kTile * kTile);
      gp.resize(kTile * kTile);
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < units; ++u) {
        const Item& it = items[unit_item[u]];
        const Group& A = s1.groups[it.a];
        const Group& B = s2.groups[it.b];
        const int64_t nbs = B.s1 - B.s0;
        T* P = partial.data() + unit_off[u];
        const Tile& ta = s1.tiles[unit_tile[u]];
        // Diagonal item of one long sample: the kernel of a sample with itself is symmetric in
        // (t, s), so tile pairs b > a count twice and b < a are skipped.
        const bool half = sym && it.a == it.b && A.s1 - A.s0 == 1;
        // Diagonal item of several samples: only sample pairs (i, j) with i <= j.
        const bool tri = sym && it.a == it.b;
        for (int64_t tb = half ? unit_tile[u] : B.tl0; tb < B.tl1; ++tb) {
          const Tile& bt = s2.tiles[tb];
          const T w = (half && tb != unit_tile[u]) ? T(2) : T(1);
          const int64_t ra = ta.rows, rb = bt.rows;
          std::fill(xp.data(), xp.data() + ra * rb, T(0));
          std::fill(gp.data(), gp.data() + ra * rb, T(0));
          gemm_nt(s1.x.rows_from(ta.pos), s2.x.rows_from(bt.pos), ra, rb, d_in, xp.data(), rb);
          gemm_nt(s1.g.rows_from(ta.pos), s2.g.rows_from(bt.pos), ra, rb, d_out, gp.data(), rb);
          for (int64_t sa = ta.seg0; sa < ta.seg1; ++sa) {
            const Seg& ra_seg = s1.segs[sa];
            for (int64_t r = ra_seg.r0; r < ra_seg.r1; ++r) {
              const T* xr = xp.data() + r * rb;
              const T* gr = gp.data() + r * rb;
              T* prow = P + ra_seg.local * nbs;
              for (int64_t sb = bt.seg0; sb < bt.seg1; ++sb) {
                const Seg& cs = s2.segs[sb];
                if (tri && cs.local < ra_seg.local) continue;  // the mirror pair is summed
                T acc = T(0);
#pragma omp simd reduction(+ : acc)
                for (int64_t c = cs.r0; c < cs.r1; ++c) acc += xr[c] * gr[c];
                prow[cs.local] += w * acc;
              }
            }
          }
        }
      }
      // Reduce each item's partials in tile order and add to out (mirrored off the diagonal).
#pragma omp for schedule(static)
      for (int64_t i = 0; i < nitems; ++i) {
        const Item& it = items[i];
        T* P0 = partial.data() + unit_off[it.unit0];
        for (int64_t u = it.unit0 + 1; u < it.unit1; ++u) {
          const T* Pu = partial.data() + unit_off[u];
          for (int64_t e = 0; e < it.size; ++e) P0[e] += Pu[e];
        }
        const Group& A = s1.groups[it.a];
        const Group& B = s2.groups[it.b];
        const int64_t nbs = B.s1 - B.s0;
        if (sym && it.a == it.b) {  // sample pairs i <= j computed; mirror (exactly symmetric)
          for (int64_t ia = 0; ia < nbs; ++ia) {
            out[(A.s0 + ia) * M + A.s0 + ia] += P0[ia * nbs + ia];
            for (int64_t jb = ia + 1; jb < nbs; ++jb) {
              const T v = P0[ia * nbs + jb];
              out[(A.s0 + ia) * M + A.s0 + jb] += v;
              out[(A.s0 + jb) * M + A.s0 + ia] += v;
            }
          }
        } else {
          const bool mirror = sym;
          for (int64_t ia = 0; ia < A.s1 - A.s0; ++ia)
            for (int64_t jb = 0; jb < nbs; ++jb) {
              const T v = P0[ia * nbs + jb];
              out[(A.s0 + ia) * M + B.s0 + jb] += v;
              if (mirror) out[(B.s0 + jb) * M + A.s0 + ia] += v;
            }
        }
      }
    }
  }
}

}  // namespace

void ghost_gram(std::uintptr_t x1, std::uintptr_t g1, std::uintptr_t m1, std::uintptr_t x2,
                std::uintptr_t g2, std::uintptr_t m2, std::uintptr_t out, int64_t N, int64_t M,
                int64_t T, int64_t S, int64_t d_in, int64_t d_out, int dtype, int out_dtype) {
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
  const Side& second = sym ? s1 : s2;
  if (out_dtype == kFloat64)
    ghost_run<double>(s1, second, sym, M, d_in, d_out, reinterpret_cast<double*>(out));
  else
    ghost_run<float>(s1, second, sym, M, d_in, d_out, reinterpret_cast<float*>(out));
}

}  // namespace cpu
}  // namespace linft
