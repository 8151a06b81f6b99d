// gram for bf16 inputs and an fp32 output on Intel AMX (tile matrix multiply, TDPBF16PS).
//
// out[N, M] += a[N, P] @ b[M, P]^T with exact bf16 products accumulated in fp32, like the packed
// engine in gram.cpp, at the AMX unit's rate. Used when the CPU has AMX-BF16 and the kernel grants
// this process the tile data state (arch_prctl); LINFT_NO_AMX=1 turns it off.
//
// Blocking: P is cut into chunks of KC (2048). Per chunk, both operands are packed once (in parallel):
//   A: rows padded to a multiple of 32, k padded to a multiple of 32, row-major (tile loads, 64 B rows);
//   B: 16-column panels in the VNNI layout TDPBF16PS wants: panel[k/2][col][k%2].
// Then OpenMP over 32 x 32 output blocks (only those on or above the diagonal in the symmetric
// form), taken in groups of 4 x 4 blocks so that their operands stay in L2: four 16 x 16 fp32
// accumulator tiles, two A tiles and two B tiles per 32-long k step, stored to a local block and
// added to out by add_block (off-diagonal symmetric blocks also to the transposed place, diagonal
// blocks from their upper triangle, so the result is exactly symmetric).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "linft/cpu_kernels.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && (__GNUC__ >= 11)
#define LINFT_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace linft {
namespace cpu {

#if LINFT_HAVE_AMX
namespace {

constexpr int64_t KC = 2048;  // k chunk (multiple of 32)
constexpr int64_t SB = 4;     // output blocks are visited in SB x SB groups: 128 rows of A and 128
                              // columns of B over one k chunk (2 x 512 KiB) stay in L2 meanwhile

bool detect() {
  const char* off = std::getenv("LINFT_NO_AMX");
  if (off && *off && *off != '0') return false;
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = edx & (1u << 24), bf16 = edx & (1u << 22);
  if (!tile || !bf16) return false;
  // Ask the kernel for the AMX tile data state (Linux >= 5.16): ARCH_REQ_XCOMP_PERM, XTILEDATA.
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile"))) void configure() {
  alignas(64) TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // every tile: 16 rows of 64 bytes
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // GCC 12 at -O3 does not see LDTILECFG read the struct and drops the stores above (seen: only
  // palette_id was written, and the first tile load faulted): a memory barrier keeps them.
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

// 32 x 32 block: C (ldc 32 floats) = A[32 rows, kp] . B[32 cols, kp]^T over kp (multiple of 32).
// Ap: 32 packed rows of kp bf16 (row stride kp); Bp0/Bp1: two VNNI panels of 16 columns each.
__attribute__((target("amx-tile,amx-bf16"))) void block32(const uint16_t* Ap, int64_t kp,
                                                           const uint16_t* Bp0,
                                                           const uint16_t* Bp1, float* C) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t a_stride = kp * 2;  // bytes
  for (int64_t k = 0; k < kp; k += 32) {
    _tile_loadd(4, Ap + k, a_stride);
    _tile_loadd(5, Ap + 16 * kp + k, a_stride);
    _tile_loadd(6, Bp0 + k * 16, 64);  // 16 k-pairs x 16 columns x 2
    _tile_loadd(7, Bp1 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, 128);
  _tile_stored(1, C + 16, 128);
  _tile_stored(2, C + 16 * 32, 128);
  _tile_stored(3, C + 16 * 32 + 16, 128);
}

// Rows [0, n_pad) of a k chunk, row-major with kp columns, zero-padded (rows >= n, columns >= kl).
void pack_rows(const uint16_t* src, int64_t n, int64_t n_pad, int64_t ld, int64_t k0, int64_t kl,
               int64_t kp, uint16_t* dst) {
#pragma omp for schedule(static)
  for (int64_t i = 0; i < n_pad; ++i) {
    uint16_t* d = dst + i * kp;
    if (i < n) {
      std::memcpy(d, src + i * ld + k0, kl * sizeof(uint16_t));
      std::memset(d + kl, 0, (kp - kl) * sizeof(uint16_t));
    } else {
      std::memset(d, 0, kp * sizeof(uint16_t));
    }
  }
}

// VNNI panels of 16 packed rows: panel[k/2][c][k%2] = rows[16 p + c][k], i.e. a transpose of 32-bit
// pairs, written contiguously (16 sequential read streams).
void vnni_panels(const uint16_t* rows, int64_t n_pad, int64_t kp, uint16_t* dst) {
#pragma omp for schedule(static)
  for (int64_t p = 0; p < n_pad / 16; ++p) {
    const uint32_t* src[16];
    for (int c = 0; c < 16; ++c) src[c] = reinterpret_cast<const uint32_t*>(rows + (p * 16 + c) * kp);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst + p * 16 * kp);
    for (int64_t r = 0; r < kp / 2; ++r)
      for (int c = 0; c < 16; ++c) d[r * 16 + c] = src[c][r];
  }
}

}  // namespace

bool amx_bf16_usable() {
  static const bool ok = detect();
  return ok;
}

void gram_bf16_amx(const uint16_t* a, const uint16_t* b, float* out, int64_t N, int64_t M,
                   int64_t P) {
  const bool sym = b == nullptr;
  const int64_t Np = (N + 31) / 32 * 32, Mp = (M + 31) / 32 * 32;
  const int64_t kc_max = std::min<int64_t>(KC, (P + 31) / 32 * 32);
  // Per chunk: A rows (packed, padded), B's VNNI panels (from its own packed rows, or from A's)
  AlignedArray<uint16_t> Apack(static_cast<std::size_t>(Np * kc_max));
  AlignedArray<uint16_t> Brows(sym ? 1 : static_cast<std::size_t>(Mp * kc_max));
  AlignedArray<uint16_t> Bvnni(static_cast<std::size_t>((sym ? Np : Mp) * kc_max));
  const int64_t nbi = Np / 32, nbj = Mp / 32;
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t gi = 0; gi < nbi; gi += SB)
    for (int64_t gj = sym ? gi : 0; gj < nbj; gj += SB)
      for (int64_t bi = gi; bi < std::min(nbi, gi + SB); ++bi)
        for (int64_t bj = std::max(gj, sym ? bi : int64_t(0)); bj < std::min(nbj, gj + SB); ++bj)
          blocks.push_back({bi, bj});
  const int64_t nblocks = static_cast<int64_t>(blocks.size());

  for (int64_t k0 = 0; k0 < P; k0 += KC) {
    const int64_t kl = std::min(KC, P - k0), kp = (kl + 31) / 32 * 32;
    const uint16_t* Ap = Apack.data();
    const uint16_t* Bp = Bvnni.data();
#pragma omp parallel
    {
      pack_rows(a, N, Np, P, k0, kl, kp, Apack.data());
      if (sym) {
        vnni_panels(Apack.data(), Np, kp, Bvnni.data());  // after the implicit barrier above
      } else {
        pack_rows(b, M, Mp, P, k0, kl, kp, Brows.data());
        vnni_panels(Brows.data(), Mp, kp, Bvnni.data());
      }
    }
#pragma omp parallel
    {
      configure();
      alignas(64) float C[32 * 32];
#pragma omp for schedule(dynamic, 4)
      for (int64_t w = 0; w < nblocks; ++w) {
        const int64_t bi = blocks[w].first, bj = blocks[w].second;
        block32(Ap + bi * 32 * kp, kp, Bp + (2 * bj) * 16 * kp, Bp + (2 * bj + 1) * 16 * kp, C);
        const int64_t i0 = bi * 32, j0 = bj * 32;
        const int64_t m = std::min<int64_t>(32, N - i0), n = std::min<int64_t>(32, M - j0);
        if (n < 32)  // edge block: rows of n values, as add_block reads them
          for (int64_t i = 1; i < m; ++i) std::memmove(C + i * n, C + i * 32, n * sizeof(float));
        add_block(out, M, C, i0, j0, m, n, sym);  // diagonal blocks: from their upper triangle
      }
      release();
    }
  }
}

#else  // no AMX support in this compiler / architecture

bool amx_bf16_usable() { return false; }
void gram_bf16_amx(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace linft
