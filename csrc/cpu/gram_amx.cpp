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
// accumulator tiles, two A tiles and two B tiles per 32-long k step, loaded from and stored to the
// block's accumulator, which carries the sum over the chunks. After the last chunk each block is
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
// Every output block's fp32 accumulator (4 KiB) persists across the k chunks, so out is updated once
// per call: adding each chunk's block to out (32 rows of 128 B far apart, and the transposed copy
// of the symmetric form) took about as long as the chunk's tile products. At most kAccBlocks blocks
// (128 MiB) are held: larger outputs run in bands of block rows, each repacking the chunks (a single
// block row can exceed it: one row is the least a band holds).
constexpr int64_t kAccBlocks = 32768;

int64_t acc_blocks() {  // LINFT_AMX_ACC_BLOCKS overrides kAccBlocks (tests use it to force bands)
  static const int64_t n = [] {
    const char* e = std::getenv("LINFT_AMX_ACC_BLOCKS");
    const long long v = e ? std::atoll(e) : 0;
    return v > 0 ? static_cast<int64_t>(v) : kAccBlocks;
  }();
  return n;
}
constexpr int64_t kKeepBlocks = 2048;  // 8 MiB

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

// 32 x 32 block: C (ldc 32 floats) += A[32 rows, kp] . B[32 cols, kp]^T over kp (multiple of 32),
// C = 0 first when `fresh`. Ap: 32 packed rows of kp bf16 (row stride kp); Bp0/Bp1: two VNNI panels
// of 16 columns each. The fp32 accumulation goes on in the tiles from the value loaded from C.
__attribute__((target("amx-tile,amx-bf16"))) void block32(const uint16_t* Ap, int64_t kp,
                                                           const uint16_t* Bp0,
                                                           const uint16_t* Bp1, float* C,
                                                           bool fresh) {
  if (fresh) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, C, 128);
    _tile_loadd(1, C + 16, 128);
    _tile_loadd(2, C + 16 * 32, 128);
    _tile_loadd(3, C + 16 * 32 + 16, 128);
  }
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

// In-register transpose of a 16 x 16 matrix of 32-bit elements: r[c] holds row c on entry and
// column c on return. 32-bit then 64-bit interleaves within 128-bit lanes, then two rounds of lane
// shuffles (64 shuffles for 256 elements). Every CPU with AMX has AVX-512F.
__attribute__((target("avx512f"))) inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i] lane L: rows i, i+1 at columns 4L, 4L+1; t[i+1]: 4L+2, 4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + j] lane L: rows g..g+3 at column 4L + j
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // column 4L + j: lane L of r[j], r[4 + j], r[8 + j], r[12 + j]
    const __m512i lo_a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);       // lanes 0, 1 of each
    const __m512i lo_b = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i hi_a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);       // lanes 2, 3 of each
    const __m512i hi_b = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(lo_a, lo_b, 0x88);       // lane 0 of all four: column j
    t[4 + j] = _mm512_shuffle_i32x4(lo_a, lo_b, 0xDD);   // lane 1: column 4 + j
    t[8 + j] = _mm512_shuffle_i32x4(hi_a, hi_b, 0x88);   // lane 2: column 8 + j
    t[12 + j] = _mm512_shuffle_i32x4(hi_a, hi_b, 0xDD);  // lane 3: column 12 + j
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// VNNI panels of 16 packed rows: panel[k/2][c][k%2] = rows[16 p + c][k], i.e. a transpose of 32-bit
// pairs: 16 x 16 blocks of pairs through registers (contiguous 64-byte loads and stores; the scalar
// transpose it replaced cost about as much as the tile products of a 1024-row Gram).
__attribute__((target("avx512f"))) void vnni_panels(const uint16_t* rows, int64_t n_pad, int64_t kp,
                                                    uint16_t* dst) {
#pragma omp for schedule(static)
  for (int64_t p = 0; p < n_pad / 16; ++p) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(rows + p * 16 * kp);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst + p * 16 * kp);
    const int64_t pairs = kp / 2, ld = kp / 2;  // kp is a multiple of 32: pairs of 16
    for (int64_t r0 = 0; r0 < pairs; r0 += 16) {
      __m512i v[16];
      for (int c = 0; c < 16; ++c) v[c] = _mm512_loadu_si512(src + c * ld + r0);
      transpose16x16(v);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(d + (r0 + i) * 16, v[i]);
    }
  }
}

// out += the 32 x 32 block (bi, bj) held in C (row stride 32; its valid part at the edges).
void add_to_out(float* out, int64_t N, int64_t M, float* C, int64_t bi, int64_t bj, bool sym) {
  const int64_t i0 = bi * 32, j0 = bj * 32;
  const int64_t m = std::min<int64_t>(32, N - i0), n = std::min<int64_t>(32, M - j0);
  if (n < 32)  // edge block: rows of n values, as add_block reads them
    for (int64_t i = 1; i < m; ++i) std::memmove(C + i * n, C + i * 32, n * sizeof(float));
  add_block(out, M, C, i0, j0, m, n, sym);  // diagonal blocks: from their upper triangle
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
  // One k chunk: each block goes to out right after its products (no accumulators to carry).
  const bool carry = P > KC;
  // With accumulators to carry: bands of whole block rows holding at most acc_blocks() blocks (at
  // least one row); one band otherwise.
  std::vector<int64_t> band_ends;
  for (int64_t bi = 0, held = 0; bi < nbi; ++bi) {
    const int64_t row = sym ? nbj - bi : nbj;  // blocks of block row bi
    if (carry && held > 0 && held + row > acc_blocks()) {
      band_ends.push_back(bi);
      held = 0;
    }
    held += row;
  }
  band_ends.push_back(nbi);
  // Accumulators of up to kKeepBlocks blocks stay allocated in this thread between calls (psg_gram
  // calls gram once per chunk of its per-sample gradients: fresh pages every call cost more than
  // the products of a small Gram); larger ones are freed on return.
  thread_local AlignedArray<float> kept_acc;
  AlignedArray<float> big_acc;
  int64_t b0 = 0;
  for (const int64_t b1 : band_ends) {
    std::vector<std::pair<int64_t, int64_t>> blocks;
    for (int64_t gi = b0; gi < b1; gi += SB)
      for (int64_t gj = sym ? gi : 0; gj < nbj; gj += SB)
        for (int64_t bi = gi; bi < std::min(b1, gi + SB); ++bi)
          for (int64_t bj = std::max(gj, sym ? bi : int64_t(0)); bj < std::min(nbj, gj + SB); ++bj)
            blocks.push_back({bi, bj});
    const int64_t nblocks = static_cast<int64_t>(blocks.size());
    AlignedArray<float>& acc = nblocks <= kKeepBlocks ? kept_acc : big_acc;
    if (carry) acc.resize(static_cast<std::size_t>(nblocks * 1024));

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
        alignas(64) float local[32 * 32];
#pragma omp for schedule(dynamic, 4)
        for (int64_t w = 0; w < nblocks; ++w) {
          const int64_t bi = blocks[w].first, bj = blocks[w].second;
          float* C = carry ? acc.data() + w * 1024 : local;
          block32(Ap + bi * 32 * kp, kp, Bp + (2 * bj) * 16 * kp, Bp + (2 * bj + 1) * 16 * kp, C,
                  !carry || k0 == 0);
          if (!carry) add_to_out(out, N, M, C, bi, bj, sym);
        }
        release();
      }
    }
    if (carry) {
#pragma omp parallel for schedule(dynamic, 4)
      for (int64_t w = 0; w < nblocks; ++w)
        add_to_out(out, N, M, acc.data() + w * 1024, blocks[w].first, blocks[w].second, sym);
    }
    b0 = b1;
  }
}

#else  // no AMX support in this compiler / architecture

bool amx_bf16_usable() { return false; }
void gram_bf16_amx(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace linft
