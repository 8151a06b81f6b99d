// Test driver of the CUDA emulation (README.md): runs the host launchers of csrc/cuda/*.cu, compiled
// against emu.h, on random inputs from a fixed seed and compares every output with a float64
// reference computed here. Usage: driver {gram|ghost_gram|ghost_gram_t_loop|psg_gram|all}, or
// driver {hang_sync|hang_warp|hang_exit} (kernels the emulator must report as hung, then abort), or
// driver {wgmma_no_proxy_fence|wgmma_overwrite|wgmma_descriptors|wgmma_unwaited|wgmma_no_batch_fence|
//         wgmma_not_landed}
// (wgmma mistakes the emulator must name, then abort)
// Prints one line per check ("ok" / "FAIL") and a last line
//   SUMMARY op=<op> checks=<n> failures=<f> launches=<l> blocks=<b> seconds=<s>
// and exits 1 when a check failed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "emu.h"
#include "linft/common.h"
#include "linft/cuda_kernels.h"
// the tensor-core building blocks, for the wgmma misuse kernels at the end (always the repository's
// copy, also under LINFT_CUDA_EMU_SRC)
#include "../../csrc/cuda/common.cuh"
#include "../../csrc/cuda/mma.cuh"
#include "../../csrc/cuda/wgmma.cuh"

namespace {

std::mt19937_64 rng;
int failures = 0, checks = 0;

double rnd() { return std::uniform_real_distribution<double>(-1, 1)(rng); }

void report(bool ok, const std::string& what, const std::string& detail, double secs) {
  ++checks;
  if (!ok) ++failures;
  printf("%s %s: %s [%.2fs]\n", ok ? "ok  " : "FAIL", what.c_str(), detail.c_str(), secs);
  fflush(stdout);
}

// One input tensor of dtype code `dt` (linft::DType), with the exact double of every stored element.
struct Buf {
  int dt;
  std::vector<unsigned char> raw;  // exactly sized: AddressSanitizer sees any overrun
  std::vector<double> val;
  Buf(int dt_, size_t n) : dt(dt_), raw(n * esize(dt_)), val(n) {
    for (size_t i = 0; i < n; ++i) set(i, rnd());
  }
  static size_t esize(int dt) { return dt == linft::kFloat32 ? 4 : dt == linft::kFloat64 ? 8 : 2; }
  void set(size_t i, double v) {
    switch (dt) {
      case linft::kFloat32: { float f = (float)v; memcpy(&raw[i * 4], &f, 4); val[i] = f; break; }
      case linft::kFloat64: { memcpy(&raw[i * 8], &v, 8); val[i] = v; break; }
      case linft::kFloat16: { __half h = __double2half(v); memcpy(&raw[i * 2], &h, 2); val[i] = __half2float(h); break; }
      case linft::kBFloat16: { __nv_bfloat16 h = __double2bfloat16(v); memcpy(&raw[i * 2], &h, 2); val[i] = __bfloat162float(h); break; }
    }
  }
  const void* ptr() const { return raw.data(); }
};

// The output, starting from random nonzero values (the launchers accumulate into it).
struct Out {
  int od;
  std::vector<float> f;
  std::vector<double> d, init;
  Out(int od_, size_t n) : od(od_), f(od_ == 0 ? n : 0), d(od_ == 0 ? 0 : n), init(n) {
    for (size_t i = 0; i < n; ++i) {
      double v = rnd();
      if (od == 0) { f[i] = (float)v; init[i] = f[i]; } else { d[i] = v; init[i] = v; }
    }
  }
  void* ptr() { return od == 0 ? (void*)f.data() : (void*)d.data(); }
  double get(size_t i) const { return od == 0 ? f[i] : d[i]; }
  // out (n x n) := its upper triangle mirrored
  void symmetrize(int n) {
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < i; ++j) {
        if (od == 0) f[(size_t)i * n + j] = f[(size_t)j * n + i];
        else d[(size_t)i * n + j] = d[(size_t)j * n + i];
        init[(size_t)i * n + j] = init[(size_t)j * n + i];
      }
  }
};

// out == init + ref elementwise, relative to scale (the sum of |terms|) + |init|.
// fp32_sums: the result was summed in fp32 somewhere (fp32 F tiles into an fp64 out): fp32's tolerance.
void compare(const std::string& what, const Out& out, const std::vector<double>& ref,
             const std::vector<double>& scale, double secs, bool fp32_sums = false) {
  const double tol = out.od == 0 || fp32_sums ? 2e-5 : 1e-12;
  double worst = 0;
  size_t wi = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double want = out.init[i] + ref[i];
    double err = std::fabs(out.get(i) - want) / (scale[i] + std::fabs(out.init[i]) + 1e-300);
    if (std::isnan(err)) err = INFINITY;
    if (err > worst) { worst = err; wi = i; }
  }
  char buf[256];
  if (ref.empty()) snprintf(buf, sizeof buf, "empty");
  else snprintf(buf, sizeof buf, "worst rel err %.3g at %zu (got %.10g want %.10g)", worst, wi,
                out.get(wi), out.init[wi] + ref[wi]);
  report(worst <= tol, what, buf, secs);
}

// Runs a launcher; an exception is a failed check. Returns the seconds taken, or -1 on exception.
double timed(const std::string& what, const std::function<void()>& f) {
  auto t0 = std::chrono::steady_clock::now();
  try {
    f();
  } catch (const std::exception& e) {
    report(false, what, std::string("threw: ") + e.what(), 0);
    return -1;
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

const char* dname(int dt) {
  static const char* n[] = {"f32", "f64", "f16", "bf16"};
  return n[dt];
}

// Which gram kernel a case must run (see csrc/cuda/gram.cu): the tensor-core kernel is the only one
// launched with dynamic shared memory, and its split-K form allocates a workspace and launches the
// reduce kernel after it.
// psg_gram with 16-bit tiles: Path::mma_both wants phase 1 and phase 2 (the gram) on tensor cores,
// seen as two distinct dynamic shared memory sizes among the launches.
enum class Path { any, ffma, mma, mma_split, mma_both };

// The tensor-core gram kernels' dynamic shared memory (csrc/cuda/gram.cu): gram_wgmma_kernel (the
// emulated 9.0 device, device 0) 3 stages of 2 x 128 x 64 halves plus 1008 bytes of alignment
// slack; gram_mma_kernel (the 8.0 device, device 2) 3 stages of 2 x 128 x 40 halves.
constexpr size_t kGramWgmmaSmem = 3 * 2 * 128 * 64 * 2 + 1008;
constexpr size_t kGramWgmmaOverlapSmem = 4 * 2 * 128 * 64 * 2 + 1008;  // LINFT_CUDA_GRAM_WGMMA=2: 4 stages
constexpr size_t kGramMmaSmem = 3 * 2 * 128 * 40 * 2;
constexpr int kDeviceSm80 = 2;

// psg_gram's phase 1 on tensor cores with the 16-byte cp.async pipeline launches with this much
// dynamic shared memory (csrc/cuda/psg_gram.cu, kF1MmaAsyncSmemBytes: 3 stages of 2 x 32 x 136 halves).
constexpr size_t kPsgAsyncSmem = 3 * 2 * 32 * 136 * 2;

// out (+)= a b^T with a of N x P (or a stored from element `offset` on, to misalign its base) and
// b of M x P (b omitted: symmetric). sym_init: out starts symmetric and must end exactly symmetric.
void test_gram(int N, int M, int P, bool sym, int dt, int od, Path path = Path::any, int offset = 0,
               bool sym_init = false, int device = 0) {
  if (sym) M = N;
  Buf a(dt, (size_t)N * P + offset), b(dt, sym ? 0 : (size_t)M * P);
  auto av = [&](int i, int p) { return a.val[offset + (size_t)i * P + p]; };
  auto bv = [&](int j, int p) { return sym ? av(j, p) : b.val[(size_t)j * P + p]; };
  Out out(od, (size_t)N * M);
  if (sym_init) out.symmetrize(N);
  std::vector<double> ref((size_t)N * M), sc((size_t)N * M);
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < M; ++j) {
      double s = 0, s2 = 0;
      for (int p = 0; p < P; ++p) {
        double v = av(i, p) * bv(j, p);
        s += v;
        s2 += std::fabs(v);
      }
      ref[(size_t)i * M + j] = s;
      sc[(size_t)i * M + j] = s2;
    }
  char name[240];
  const char* wg_env = std::getenv("LINFT_CUDA_GRAM_WGMMA");
  const char wg_switch = wg_env ? wg_env[0] : '1';  // '0': mma.sync, '2': the Overlap form
  snprintf(name, sizeof name, "gram N=%d M=%d P=%d %s in=%s out=%s%s%s%s", N, M, P, sym ? "sym" : "cross",
           dname(dt), od ? "f64" : "f32", offset ? " misaligned" : "",
           device == 1 ? " sm75" : device == kDeviceSm80 ? " sm80"
           : wg_switch == '2' ? " sm90 overlap" : wg_switch == '0' ? " sm90 wgmma off" : " sm90",
           path == Path::ffma ? " [ffma]" : path == Path::mma ? " [mma]" : path == Path::mma_split ? " [mma split-K]" : "");
  const void* pa = a.raw.data() + (size_t)offset * Buf::esize(dt);
  emu::launch_log.clear();
  emu::device = device;
  double secs = timed(name, [&] {
    linft::cuda::gram(pa, sym ? nullptr : b.ptr(), out.ptr(), N, M, P, dt, od, 0);
  });
  emu::device = 0;
  if (secs < 0) return;
  if (path != Path::any) {
    const auto& log = emu::launch_log;
    const bool mma = !log.empty() && log[0].smem > 0;
    const bool split = mma && log[0].grid.z > 1;
    const bool want_mma = path == Path::mma || path == Path::mma_split;
    // the 9.0 device runs the wgmma kernel (unless switched off), the 8.0 one the mma.sync kernel
    const size_t want_smem = device != 0 || wg_switch == '0' ? kGramMmaSmem
                             : wg_switch == '2' ? kGramWgmmaOverlapSmem : kGramWgmmaSmem;
    const bool right_kernel = !mma || log[0].smem == want_smem;
    const bool ok = mma == want_mma && split == (path == Path::mma_split) && right_kernel &&
                    log.size() == (size_t)(split ? 2 : 1) && emu::live_allocs == 0;
    char d[200];
    snprintf(d, sizeof d, "%zu launches, first grid (%u,%u,%u) smem %zu, %ld allocations left", log.size(),
             log.empty() ? 0 : log[0].grid.x, log.empty() ? 0 : log[0].grid.y,
             log.empty() ? 0 : log[0].grid.z, log.empty() ? 0 : log[0].smem, emu::live_allocs);
    report(ok, std::string(name) + " path", d, 0);
  }
  compare(name, out, ref, sc, secs);
  if (sym_init) {
    size_t bad = 0;
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < i; ++j) bad += out.get((size_t)i * M + j) != out.get((size_t)j * M + i);
    report(bad == 0, std::string(name) + " exactly symmetric", std::to_string(bad) + " asymmetric pairs", 0);
  }
}

// Mask of n samples x t tokens with nonzero (not only 1) kept entries; sample `pad` (if >= 0) is
// fully padded.
std::vector<unsigned char> make_mask(int n, int t, int pad) {
  std::vector<unsigned char> m((size_t)n * t);
  for (auto& v : m) v = rnd() < 0.2 ? (unsigned char)(1 + rng() % 255) : 0;
  if (pad >= 0 && pad < n) std::fill(m.begin() + (size_t)pad * t, m.begin() + (size_t)(pad + 1) * t, 0);
  return m;
}

// NaN into the masked tokens of x (rows of d): masked tokens must be skipped, not multiplied by 0.
void poison(Buf& x, const std::vector<unsigned char>& m, int d) {
  for (size_t r = 0; r < m.size(); ++r)
    if (!m[r])
      for (int k = 0; k < d; ++k) x.set(r * d + k, NAN);
}

// ghost_gram (psg = false) or psg_gram with `kernel`. sym: second operand omitted (x2 == nullptr).
// path: Path::mma wants the tensor-core kernel (ghost_gram_mma_kernel, or psg_gram's phase 1 on
// tensor cores: the only launches with dynamic shared memory), Path::ffma the CUDA-core one.
// psg_gram only: chunk_elems > 0 bounds the F scratch
// (LINFT_CUDA_PSG_SCRATCH_BYTES) to that many elements per F row and expects >= min_chunks chunks
// (each launches phase 1 and the Gram: >= 2 launches), device 1 is the compute capability 7.5 one.
void test_ghost_psg(bool psg, int kernel, int N, int M, int T, int S, int din, int dout, bool sym,
                    bool masks, int dt, int od, Path path = Path::any, long chunk_elems = 0,
                    int min_chunks = 1, int device = 0, int tile = -1) {
  if (sym) { M = N; S = T; }
  Buf x1(dt, (size_t)N * T * din), g1(dt, (size_t)N * T * dout);
  Buf x2(dt, sym ? 0 : (size_t)M * S * din), g2(dt, sym ? 0 : (size_t)M * S * dout);
  const bool coarse = tile >= 0 && tile != od;  // F stored coarser than out (psg_gram's tile_dtype)
  const bool tiles16 = coarse && tile != linft::kFloat32;
  if (tiles16)  // multiples of 1/64 in [-1, 1] (exact in bf16): every F entry (< 2^24 units of 2^-12)
                // is exact in fp32 whatever the order of its sum, so the kernel's F rounds exactly like
                // the reference's, which rounds the exact F; most entries have more bits than bf16 keeps
    for (Buf* b : {&x1, &g1, &x2, &g2})
      for (size_t i = 0; i < b->val.size(); ++i) b->set(i, std::round(rnd() * 64) / 64);
  std::vector<unsigned char> m1, m2;
  if (masks) {
    m1 = make_mask(N, T, N >= 2 ? N / 2 : -1);
    poison(x1, m1, din);
    poison(g1, m1, dout);
    if (!sym) {
      m2 = make_mask(M, S, M >= 2 ? M - 1 : -1);
      poison(x2, m2, din);
      poison(g2, m2, dout);
    }
  }
  const Buf& X2 = sym ? x1 : x2;
  const Buf& G2 = sym ? g1 : g2;
  const auto& M2 = sym ? m1 : m2;
  auto keep1 = [&](int i, int t) { return !masks || m1[(size_t)i * T + t] != 0; };
  auto keep2 = [&](int j, int s) { return !masks || M2[(size_t)j * S + s] != 0; };
  Out out(od, (size_t)N * M);
  // a symmetric result starts from a symmetric out, which must stay exactly symmetric
  const bool sym_out = sym && !(psg && kernel == linft::kAsymmetricSignGD);
  if (sym_out) out.symmetrize(N);
  std::vector<double> ref((size_t)N * M), sc((size_t)N * M);
  if (!psg) {
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < M; ++j) {
        double s = 0, s2 = 0;
        for (int t = 0; t < T; ++t)
          for (int u = 0; u < S; ++u) {
            if (!keep1(i, t) || !keep2(j, u)) continue;
            double xp = 0, gp = 0, xa = 0, ga = 0;
            for (int k = 0; k < din; ++k) {
              double v = x1.val[((size_t)i * T + t) * din + k] * X2.val[((size_t)j * S + u) * din + k];
              xp += v; xa += std::fabs(v);
            }
            for (int k = 0; k < dout; ++k) {
              double v = g1.val[((size_t)i * T + t) * dout + k] * G2.val[((size_t)j * S + u) * dout + k];
              gp += v; ga += std::fabs(v);
            }
            s += xp * gp;
            s2 += xa * ga;
          }
        ref[(size_t)i * M + j] = s;
        sc[(size_t)i * M + j] = s2;
      }
  } else {
    // F_i = sum_t g^T x (d_out x d_in) and the sum of |terms| per element.
    auto F = [&](const Buf& x, const Buf& g, int n, int TT, auto keep) {
      std::vector<double> f((size_t)n * dout * din, 0.0), fa((size_t)n * dout * din, 0.0);
      for (int i = 0; i < n; ++i)
        for (int t = 0; t < TT; ++t)
          if (keep(i, t))
            for (int o = 0; o < dout; ++o)
              for (int d = 0; d < din; ++d) {
                double v = g.val[((size_t)i * TT + t) * dout + o] * x.val[((size_t)i * TT + t) * din + d];
                f[((size_t)i * dout + o) * din + d] += v;
                fa[((size_t)i * dout + o) * din + d] += std::fabs(v);
              }
      return std::make_pair(f, fa);
    };
    auto [F1, F1a] = F(x1, g1, N, T, keep1);
    auto [F2, F2a] = F(X2, G2, M, S, keep2);
    if (coarse)  // F as stored between the phases (then the Gram of those values)
      for (auto* f : {&F1, &F1a, &F2, &F2a})
        for (double& v : *f) {
          const double a = v;
          if (tile == linft::kFloat32) v = (float)a;
          else if (tile == linft::kFloat16) v = __half2float(__double2half(a));
          else v = __bfloat162float(__double2bfloat16(a));
        }
    auto sg = [](double v) { return (double)((v > 0) - (v < 0)); };
    const size_t P = (size_t)dout * din;
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < M; ++j) {
        double s = 0, s2 = 0;
        for (size_t e = 0; e < P; ++e) {
          double a = F1[i * P + e], b = F2[j * P + e], aa = F1a[i * P + e], ba = F2a[j * P + e];
          if (kernel == linft::kSignGD) { a = sg(a); b = sg(b); aa = 1; ba = 1; }
          if (kernel == linft::kAsymmetricSignGD) { b = sg(b); ba = 1; }
          s += a * b;
          s2 += aa * ba;
        }
        ref[(size_t)i * M + j] = s;
        sc[(size_t)i * M + j] = s2;
      }
  }
  const unsigned char* pm1 = masks ? m1.data() : nullptr;
  const unsigned char* pm2 = (masks && !sym) ? m2.data() : nullptr;
  char name[300];
  snprintf(name, sizeof name, "%s%s N=%d M=%d T=%d S=%d din=%d dout=%d %s%s in=%s out=%s%s%s%s%s",
           psg ? "psg_gram kernel=" : "ghost_gram", psg ? std::to_string(kernel).c_str() : "", N, M,
           T, S, din, dout, sym ? "sym" : "cross", masks ? " masked" : "", dname(dt), od ? "f64" : "f32",
           coarse ? (std::string(" tiles=") + dname(tile)).c_str() : "",
           chunk_elems ? (" chunk<=" + std::to_string(chunk_elems)).c_str() : "", device ? " sm75" : "",
           path == Path::ffma ? " [ffma]" : path == Path::mma ? " [mma]" : path == Path::mma_both ? " [mma x2]" : "");
  if (chunk_elems) {
    const long rows = (sym && kernel != linft::kAsymmetricSignGD) ? N : N + M;
    const long esize = Buf::esize(tile >= 0 ? tile : od);
    setenv("LINFT_CUDA_PSG_SCRATCH_BYTES", std::to_string(rows * esize * chunk_elems).c_str(), 1);
  }
  emu::launch_log.clear();
  emu::alloc_log.clear();
  emu::device = device;
  double secs = timed(name, [&] {
    if (psg)
      linft::cuda::psg_gram(x1.ptr(), g1.ptr(), pm1, sym ? nullptr : x2.ptr(), sym ? nullptr : g2.ptr(),
                            pm2, out.ptr(), N, M, T, S, din, dout, dt, od, kernel, tile, 0);
    else
      linft::cuda::ghost_gram(x1.ptr(), g1.ptr(), pm1, sym ? nullptr : x2.ptr(), sym ? nullptr : g2.ptr(),
                              pm2, out.ptr(), N, M, T, S, din, dout, dt, od, 0);
  });
  emu::device = 0;
  unsetenv("LINFT_CUDA_PSG_SCRATCH_BYTES");
  if (secs < 0) return;
  if (path != Path::any || chunk_elems) {
    const auto& log = emu::launch_log;
    std::vector<size_t> sizes;  // distinct dynamic shared memory sizes: one per tensor-core kernel
    for (const auto& l : log)
      if (l.smem > 0 && std::find(sizes.begin(), sizes.end(), l.smem) == sizes.end()) sizes.push_back(l.smem);
    const size_t want_kinds = path == Path::mma_both ? 2 : path == Path::mma ? 1 : 0;
    // psg: phase 1 and the Gram per chunk; ghost on tensor cores, symmetric: the mirror of its workspace
    const int want = psg ? 2 * min_chunks : (sym && path == Path::mma ? 2 : 1);
    const bool ok = (path == Path::any || sizes.size() == want_kinds) &&
                    log.size() >= (size_t)want && emu::live_allocs == 0;
    char d[200];
    snprintf(d, sizeof d, "%zu launches (>= %d wanted), %zu tensor-core kernels, %ld allocations left",
             log.size(), want, sizes.size(), emu::live_allocs);
    report(ok, std::string(name) + " path", d, 0);
  }
  if (psg && chunk_elems == 0 && (path == Path::mma || path == Path::mma_both)) {
    // one chunk, the whole plane: phase 1 takes the cp.async pipeline iff its rows are 16-byte aligned
    const bool want = din % 8 == 0 && dout % 8 == 0;
    const bool got = std::any_of(emu::launch_log.begin(), emu::launch_log.end(),
                                 [](const auto& l) { return l.smem == kPsgAsyncSmem; });
    report(got == want, std::string(name) + " phase-1 copies",
           std::string(got ? "cp.async" : "plain loads") + (got == want ? "" : " (the other wanted)"), 0);
  }
  if (psg && chunk_elems == 0) {  // the whole plane in one chunk: the scratch holds F as tile_dtype
    const size_t rows = (sym && kernel != linft::kAsymmetricSignGD) ? N : N + M;
    const size_t want = rows * din * dout * Buf::esize(tile >= 0 ? tile : od);
    const size_t got = emu::alloc_log.empty() ? 0 : emu::alloc_log[0];
    report(got == want, std::string(name) + " F scratch",
           std::to_string(got) + " bytes (" + std::to_string(want) + " wanted)", 0);
  }
  compare(name, out, ref, sc, secs, coarse && tile == linft::kFloat32);
  if (sym_out) {
    size_t bad = 0;
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < i; ++j) bad += out.get((size_t)i * M + j) != out.get((size_t)j * M + i);
    report(bad == 0, std::string(name) + " exactly symmetric", std::to_string(bad) + " asymmetric pairs", 0);
  }
}

// f must throw std::invalid_argument.
void expect_invalid(const std::string& what, const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    report(true, what, std::string("throws: ") + e.what(), 0);
    return;
  } catch (const std::exception& e) {
    report(false, what, std::string("wrong exception: ") + e.what(), 0);
    return;
  }
  report(false, what, "no exception", 0);
}

// f must leave out (4 floats) untouched and not throw.
void expect_noop(const std::string& what, const std::function<void(float*)>& f) {
  std::vector<float> out = {1.5f, -2.5f, 3.5f, 4.5f};
  try {
    f(out.data());
  } catch (const std::exception& e) {
    report(false, what, std::string("threw: ") + e.what(), 0);
    return;
  }
  bool ok = out[0] == 1.5f && out[1] == -2.5f && out[2] == 3.5f && out[3] == 4.5f;
  report(ok, what, ok ? "no-op" : "output changed", 0);
}

void run_gram() {
  rng.seed(101);
  // Which tensor-core kernel each emulated device runs.
  for (auto [dev, want] : {std::pair<int, const char*>{0, "wgmma"}, {1, "cuda cores"}, {kDeviceSm80, "mma.sync"}}) {
    emu::device = dev;
    const std::string got = linft::cuda::gram_tensor_core_path();
    report(got == want, "gram tensor-core path of device " + std::to_string(dev), got, 0);
  }
  emu::device = 0;
  for (int dt = 0; dt < 4; ++dt)
    for (int od = 0; od < 2; ++od) {
      test_gram(1, 1, 1, false, dt, od);
      test_gram(1, 1, 7, true, dt, od);
      test_gram(7, 5, 33, false, dt, od);
      test_gram(70, 70, 65, true, dt, od);  // 2x2 tiles: mirror adds, plain (non-atomic) adds
    }
  for (int od = 0; od < 2; ++od) {
    test_gram(70, 130, 70, false, 0, od);  // 2x3 tiles
    test_gram(3, 65, 1100, false, 3, od);  // split-K: 3 splits, atomic adds
    test_gram(130, 130, 530, true, 2, od); // symmetric 3x3 tiles with split-K: atomic mirror adds
  }
  // Tensor cores (bf16 / fp16 in, fp32 out, P % 8 == 0, 16-byte aligned rows): odd N and M (rows
  // zero-filled past them), P not a multiple of the 32-wide K chunk, 1..3 pipeline stages in use,
  // 2x2 tiles with a mirrored off-diagonal tile, split-K through the workspace, symmetric outputs
  // that must stay exactly symmetric. Tolerance (compare): fp32 out, 2e-5 of sum |a_ip b_jp| +
  // |out_ij|; the products of 16-bit inputs are exact, so this bounds fp32 accumulation only.
  // Each tensor-core case runs on the 9.0 device (wgmma: K chunks of 64, so P = 72 / 200 / 392 use
  // 2 / 4 / 7 chunks, the last partial) and on the 8.0 one (mma.sync: chunks of 32).
  for (int dt : {3, 2})
    for (int dev : {0, kDeviceSm80}) {
      test_gram(1, 1, 8, true, dt, 0, Path::mma, 0, true, dev);
      test_gram(5, 3, 8, false, dt, 0, Path::mma, 0, false, dev);
      test_gram(37, 21, 40, false, dt, 0, Path::mma, 0, false, dev);
      test_gram(130, 130, 72, true, dt, 0, Path::mma, 0, true, dev);   // 3 upper tiles of 128
      test_gram(20, 150, 96, false, dt, 0, Path::mma, 0, false, dev);  // 1x2 tiles
      test_gram(71, 100, 200, false, dt, 0, Path::mma, 0, false, dev); // rows of both warpgroups
      test_gram(129, 129, 392, true, dt, 0, Path::mma, 0, true, dev);  // every stage reused twice
      test_gram(33, 33, 1032, true, dt, 0, Path::mma_split, 0, true, dev);  // 2 splits
    }
  // LINFT_CUDA_GRAM_WGMMA (read at every call): "2", the wgmma kernel's Overlap form (4 stages,
  // copies two chunks ahead, one MMA batch in flight); "0", the 9.0 device on mma.sync. The
  // caller's own setting is restored afterwards.
  const char* caller = std::getenv("LINFT_CUDA_GRAM_WGMMA");
  const std::string saved = caller ? caller : "";
  for (const char* sw : {"2", "0"}) {
    setenv("LINFT_CUDA_GRAM_WGMMA", sw, 1);
    const std::string got = linft::cuda::gram_tensor_core_path();
    const char* want = sw[0] == '2' ? "wgmma overlap" : "mma.sync";
    report(got == want, std::string("gram tensor-core path of device 0 with LINFT_CUDA_GRAM_WGMMA=") + sw,
           got, 0);
    for (int dt : {3, 2}) {
      test_gram(37, 21, 40, false, dt, 0, Path::mma);
      test_gram(130, 130, 72, true, dt, 0, Path::mma, 0, true);
      test_gram(71, 100, 200, false, dt, 0, Path::mma);
      test_gram(129, 129, 392, true, dt, 0, Path::mma, 0, true);
      test_gram(33, 33, 1032, true, dt, 0, Path::mma_split, 0, true);
    }
  }
  if (caller)
    setenv("LINFT_CUDA_GRAM_WGMMA", saved.c_str(), 1);
  else
    unsetenv("LINFT_CUDA_GRAM_WGMMA");
  for (int dt : {3, 2}) {
    // Fallbacks to the FFMA kernel, each still checked against the reference.
    test_gram(37, 21, 40, false, dt, 1, Path::ffma);            // fp64 out: fp64 accumulation
    test_gram(9, 9, 36, true, dt, 0, Path::ffma, 0, true);      // P % 8 != 0
    test_gram(9, 7, 40, false, dt, 0, Path::ffma, 1);           // base not 16-byte aligned
    test_gram(9, 7, 40, false, dt, 0, Path::ffma, 0, false, 1); // compute capability 7.5
  }
  for (int dev : {0, kDeviceSm80}) {
    test_gram(9, 40, 1040, false, 3, 0, Path::mma_split, 0, false, dev);  // cross split-K
    test_gram(140, 3, 24, false, 2, 0, Path::mma, 0, false, dev);         // 2x1 tiles
  }
  test_gram(9, 7, 40, false, 0, 0, Path::ffma);                  // fp32 inputs
  std::vector<float> buf(4);
  expect_invalid("gram bad dtype", [&] { linft::cuda::gram(buf.data(), nullptr, buf.data(), 2, 2, 1, 7, 0, 0); });
  expect_invalid("gram bad out dtype", [&] { linft::cuda::gram(buf.data(), nullptr, buf.data(), 2, 2, 1, 0, 2, 0); });
  expect_invalid("gram sym N != M", [&] { linft::cuda::gram(buf.data(), nullptr, buf.data(), 2, 1, 1, 0, 0, 0); });
  expect_noop("gram P=0", [&](float* o) { linft::cuda::gram(o, o, o, 2, 2, 0, 0, 0, 0); });
}

void run_ghost() {
  rng.seed(202);
  for (int dt = 0; dt < 4; ++dt)
    for (int od = 0; od < 2; ++od) {
      test_ghost_psg(false, 0, 1, 1, 1, 1, 1, 1, false, false, dt, od);
      test_ghost_psg(false, 0, 1, 1, 3, 3, 2, 1, true, true, dt, od);
      test_ghost_psg(false, 0, 3, 2, 5, 40, 7, 33, false, true, dt, od);  // 2 s tiles, 2 d_out chunks
      test_ghost_psg(false, 0, 4, 4, 37, 37, 9, 3, true, true, dt, od);   // t split (2), atomic mirror
    }
  for (int od = 0; od < 2; ++od) {
    test_ghost_psg(false, 0, 5, 5, 20, 20, 33, 7, true, true, 0, od);    // one t tile: plain adds + mirror
    test_ghost_psg(false, 0, 2, 3, 70, 33, 40, 5, false, false, 1, od);  // 3 t tiles, 3 splits
    test_ghost_psg(false, 0, 1, 1, 33, 33, 70, 65, true, false, 2, od);  // d of 3 chunks
  }
  // Tensor cores (bf16 / fp16 in, fp32 out, d_in and d_out multiples of 8): 64 x 128 tiles of the
  // token product (N T x M S), each entry binned into its sample pair.
  for (int dt = 2; dt < 4; ++dt) {
    test_ghost_psg(false, 0, 3, 2, 70, 33, 16, 24, false, true, dt, 0, Path::mma);   // pairs across tiles, k zero-fill
    test_ghost_psg(false, 0, 4, 4, 37, 37, 8, 40, true, true, dt, 0, Path::mma);    // tiles below the diagonal skipped
    test_ghost_psg(false, 0, 2, 2, 130, 130, 72, 8, true, false, dt, 0, Path::mma); // 5x3 tiles, 3 k chunks
    test_ghost_psg(false, 0, 1, 3, 5, 200, 104, 96, false, true, dt, 0, Path::mma); // 4-chunk pipeline, 5 col tiles
    test_ghost_psg(false, 0, 20, 17, 3, 5, 16, 8, false, true, dt, 0, Path::mma);   // 20 x 17 pairs in one tile
    test_ghost_psg(false, 0, 30, 30, 7, 7, 24, 16, true, true, dt, 0, Path::mma);   // sym, pairs straddling tiles
  }
  test_ghost_psg(false, 0, 70, 70, 1, 1, 8, 8, true, false, 3, 0, Path::mma);       // T = 1: 64 x 70 bins
  test_ghost_psg(false, 0, 16, 16, 130, 20, 8, 16, false, true, 3, 0, Path::mma);   // 33 x 3 tiles
  // ... and every case it must leave to the CUDA cores.
  test_ghost_psg(false, 0, 3, 2, 20, 9, 12, 16, false, true, 3, 0, Path::ffma);     // d_in % 8 != 0
  test_ghost_psg(false, 0, 3, 2, 20, 9, 16, 16, false, true, 3, 1, Path::ffma);     // fp64 out
  test_ghost_psg(false, 0, 3, 2, 20, 9, 16, 16, false, true, 0, 0, Path::ffma);     // fp32 in
  test_ghost_psg(false, 0, 3, 3, 20, 20, 16, 8, true, true, 2, 0, Path::ffma, 0, 1, 1);  // sm_75
  std::vector<float> buf(64);
  const float* f = buf.data();
  expect_invalid("ghost_gram bad dtype", [&] { linft::cuda::ghost_gram(f, f, nullptr, nullptr, nullptr, nullptr, buf.data(), 2, 2, 1, 1, 1, 1, 4, 0, 0); });
  expect_invalid("ghost_gram sym T != S", [&] { linft::cuda::ghost_gram(f, f, nullptr, nullptr, nullptr, nullptr, buf.data(), 2, 2, 1, 2, 1, 1, 0, 0, 0); });
  expect_invalid("ghost_gram g2 null", [&] { linft::cuda::ghost_gram(f, f, nullptr, f, nullptr, nullptr, buf.data(), 2, 2, 1, 1, 1, 1, 0, 0, 0); });
  expect_noop("ghost_gram T=0", [&](float* o) { linft::cuda::ghost_gram(o, o, nullptr, o, o, nullptr, o, 2, 2, 0, 1, 1, 1, 0, 0, 0); });
}

// A block that loops over several t tiles needs >= ~1024 blocks (the launcher splits t over blocks
// until there are ~1024): about 15k emulated barriers, several seconds on 2 cores. Kept apart.
void run_ghost_t_loop() {
  rng.seed(404);
  test_ghost_psg(false, 0, 16, 32, 70, 3, 2, 3, false, true, 3, 0);  // 2 splits over 3 t tiles
}

void run_psg() {
  rng.seed(303);
  for (int k = 0; k < 3; ++k) {
    for (int dt = 0; dt < 4; ++dt)
      for (int od = 0; od < 2; ++od) {
        test_ghost_psg(true, k, 1, 1, 1, 1, 1, 1, false, false, dt, od);
        test_ghost_psg(true, k, 3, 3, 9, 9, 7, 18, true, true, dt, od);  // 2 o tiles
      }
    for (int od = 0; od < 2; ++od) {
      test_ghost_psg(true, k, 3, 2, 5, 9, 33, 7, false, true, 1, od);     // 3 d tiles
      test_ghost_psg(true, k, 20, 20, 11, 11, 17, 5, true, true, 2, od);  // 2 sample blocks, mirror
      test_ghost_psg(true, k, 17, 33, 9, 4, 3, 33, false, false, 3, od);  // 2x3 sample blocks
    }
    test_ghost_psg(true, k, 34, 34, 3, 3, 18, 5, true, false, 0, 1);  // 3x3 sample blocks
    test_ghost_psg(true, k, 2, 3, 3, 5, 70, 65, false, true, k, 1);     // 5x5 (o, d) tiles
    // Two-phase path with the F scratch forced small, so that several chunks of the (d_out, d_in)
    // plane run (chunk shapes: csrc/cuda/psg_gram.cu, chunk_shape). Every input x output dtype,
    // T not a multiple of 16 or 32, masks with a fully padded sample and NaN in masked tokens.
    for (int dt = 0; dt < 4; ++dt)
      for (int od = 0; od < 2; ++od) {
        const Path p = (dt >= 2 && od == 0) ? Path::mma : Path::ffma;
        test_ghost_psg(true, k, 3, 4, 21, 18, 20, 6, false, true, dt, od, p, 42, 3);  // 6 x 8: 3 chunks
        test_ghost_psg(true, k, 5, 5, 17, 17, 20, 11, true, true, dt, od, p, 88, 3);  // 11 x 8: 3 chunks
      }
    test_ghost_psg(true, k, 5, 4, 37, 20, 70, 9, false, true, 3, 0, Path::mma, 180, 4);  // 9 x 20: 4 chunks
    test_ghost_psg(true, k, 4, 4, 35, 35, 5, 130, true, true, 2, 0, Path::mma, 640, 2);  // o chunks 128 + 2
    test_ghost_psg(true, k, 3, 2, 40, 33, 130, 20, false, true, 3, 0, Path::mma);        // 2 d tiles of 128
    test_ghost_psg(true, k, 3, 5, 19, 21, 33, 7, false, true, 0, 1, Path::ffma, 56, 5);  // 7 x 8: 5 chunks
    test_ghost_psg(true, k, 2, 3, 5, 6, 3, 130, false, true, 0, 1, Path::ffma, 384, 2);  // o chunks 128 + 2
    test_ghost_psg(true, k, 6, 6, 13, 13, 10, 12, true, true, 3, 0, Path::ffma, 0, 1, 1);  // sm_75
    // F stored coarser than out (tile_dtype): 16-bit F (summed in fp32, rounded once) whose Gram runs
    // on tensor cores too when out is fp32 and P % 8 == 0; fp32 F with an fp64 out (mixed mode).
    for (int dt = 2; dt < 4; ++dt) {
      test_ghost_psg(true, k, 5, 5, 9, 9, 16, 24, true, true, dt, 0, Path::mma_both, 0, 1, 0, dt);
      test_ghost_psg(true, k, 4, 3, 21, 18, 32, 8, false, true, dt, 0, Path::mma_both, 64, 4, 0, dt);  // 4 chunks of 8 x 8
      test_ghost_psg(true, k, 4, 3, 7, 6, 8, 9, false, true, dt, 1, Path::mma, 0, 1, 0, dt);   // fp64 out: FFMA Gram
      test_ghost_psg(true, k, 3, 3, 7, 7, 16, 24, true, true, dt, 1, Path::mma, 0, 1, 0, linft::kFloat32);
    }
    test_ghost_psg(true, k, 4, 3, 11, 6, 7, 9, false, true, 3, 0, Path::mma, 0, 1, 0, 3);   // P % 8 != 0
    // phase 1's cp.async pipeline over 3-4 chunks of 32 tokens (d_in, d_out multiples of 8), 2 o tiles,
    // and over 4 chunks of the plane with d origins 8 apart
    test_ghost_psg(true, k, 3, 2, 100, 70, 16, 136, false, true, 3, 0, Path::mma);
    test_ghost_psg(true, k, 4, 4, 75, 75, 24, 40, true, true, 2, 0, Path::mma_both, 0, 1, 0, 2);
    test_ghost_psg(true, k, 3, 3, 70, 70, 32, 16, true, true, 3, 0, Path::mma, 128, 4);
    test_ghost_psg(true, k, 4, 4, 9, 9, 16, 8, true, true, 2, 0, Path::ffma, 0, 1, 1, 2);   // sm_75
    test_ghost_psg(true, k, 3, 2, 5, 6, 12, 7, false, true, 0, 1, Path::ffma, 0, 1, 0, 0);  // fp32 in, fp32 F
  }
  {
    std::vector<uint16_t> h(64);
    const uint16_t* p = h.data();
    std::vector<float> o(4);
    expect_invalid("psg_gram 16-bit tiles of fp32 inputs", [&] { linft::cuda::psg_gram(o.data(), o.data(), nullptr, nullptr, nullptr, nullptr, o.data(), 2, 2, 1, 1, 1, 1, 0, 0, 0, 3, 0); });
    expect_invalid("psg_gram fp16 tiles of bf16 inputs", [&] { linft::cuda::psg_gram(p, p, nullptr, nullptr, nullptr, nullptr, o.data(), 2, 2, 1, 1, 1, 1, 3, 0, 0, 2, 0); });
    expect_invalid("psg_gram fp64 tiles into fp32", [&] { linft::cuda::psg_gram(p, p, nullptr, nullptr, nullptr, nullptr, o.data(), 2, 2, 1, 1, 1, 1, 3, 0, 0, 1, 0); });
  }
  std::vector<float> buf(64);
  const float* f = buf.data();
  expect_invalid("psg_gram bad kernel", [&] { linft::cuda::psg_gram(f, f, nullptr, nullptr, nullptr, nullptr, buf.data(), 2, 2, 1, 1, 1, 1, 0, 0, 5, -1, 0); });
  expect_invalid("psg_gram bad out dtype", [&] { linft::cuda::psg_gram(f, f, nullptr, nullptr, nullptr, nullptr, buf.data(), 2, 2, 1, 1, 1, 1, 0, 3, 0, -1, 0); });
  expect_invalid("psg_gram sym N != M", [&] { linft::cuda::psg_gram(f, f, nullptr, nullptr, nullptr, nullptr, buf.data(), 2, 1, 1, 1, 1, 1, 0, 0, 0, -1, 0); });
  expect_noop("psg_gram d_in=0", [&](float* o) { linft::cuda::psg_gram(o, o, nullptr, o, o, nullptr, o, 2, 2, 1, 1, 0, 1, 0, 0, 1, -1, 0); });
}

}  // namespace

// ---------------------------------------------------------------- the emulator's own hang checks
// Kernels that may hang a GPU (a barrier some threads never reach: undefined behaviour): the
// emulator must treat them as hung and abort with "EMU: hung at ..." (after LINFT_CUDA_EMU_HANG_S
// seconds) rather than wait forever. Each runs as its own driver op, which never returns;
// tests/kernels/test_cuda_emulation.py checks the message. run_hang returns -1 for other ops.
__global__ void hang_sync_kernel(float* out) {
  if (threadIdx.x < 40) __syncthreads();  // threads 40.. skip it
  out[threadIdx.x] = 1.0f;
}
__global__ void hang_warp_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);  // half of each warp
  out[threadIdx.x] = v;
}
__global__ void hang_exit_kernel(float* out) {
  if (threadIdx.x == 7) return;  // leaves before the barrier the others wait at
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

int run_hang(const std::string& op) {
  std::vector<float> out(64);
  if (op == "hang_sync") LINFT_LAUNCH(1, 64, 0, 0, hang_sync_kernel)(out.data());
  else if (op == "hang_warp") LINFT_LAUNCH(1, 64, 0, 0, hang_warp_kernel)(out.data());
  else if (op == "hang_exit") LINFT_LAUNCH(1, 64, 0, 0, hang_exit_kernel)(out.data());
  else return -1;  // not a hang op
  fprintf(stderr, "%s finished: the emulator missed the hang\n", op.c_str());
  return 3;
}

// ---------------------------------------------------------------- the emulator's wgmma checks
// One warpgroup stages a 64 x 64 A tile and a 128 x 64 B tile (bf16 zeros, 128-byte swizzle) by
// cp.async and issues one wgmma m64n128k16, with one mistake per Mode that a GPU would not report
// (a race, or undefined behaviour); the emulator must abort naming it (test_cuda_emulation.py).
enum WgMistake { kWgNoProxyFence, kWgOverwrite, kWgDescriptors, kWgUnwaited, kWgNoBatchFence, kWgNotLanded };

template <int Mode>
__global__ void wgmma_misuse_kernel(const __nv_bfloat16* zeros, float* out) {
  using namespace linft::cuda_detail;
  LINFT_DYNAMIC_SMEM(raw);
  unsigned char* const smem = raw + (kSwizzleAtom - smem_u32(raw) % kSwizzleAtom) % kSwizzleAtom;
  const uint32_t base = smem_u32(smem);
  const int tid = static_cast<int>(threadIdx.x);
  for (int c = tid; c < (64 + 128) * 8; c += kWgThreads)  // A rows 0-63, then B rows 0-127
    cp_async16(smem + swizzle128(c >> 3, c & 7), zeros, 16);
  cp_async_commit();
  if (Mode != kWgNotLanded) cp_async_wait<0>();  // not landed: the MMA below reads copies in flight
  if (Mode != kWgNoProxyFence) fence_proxy_async();
  __syncthreads();
  float acc[64] = {};
  if (Mode != kWgNoBatchFence) wgmma_fence(acc);
  const uint32_t b_at = base + 64 * 128 - (Mode == kWgDescriptors && tid >= 64 ? 1024 : 0);
  wgmma_m64n128k16<__nv_bfloat16>(acc, wgmma_desc(base), wgmma_desc(b_at));
  wgmma_commit();
  if (Mode == kWgOverwrite) {  // refills A before the MMA is known to be done
    for (int c = tid; c < 64 * 128; c += kWgThreads) smem[c] = 0x3F;
    __syncthreads();
  }
  if (Mode != kWgUnwaited) wgmma_wait<0>(acc);
  if (Mode == kWgNotLanded) cp_async_wait<0>();
  out[tid] = acc[0];
}

int run_wgmma_misuse(const std::string& op) {
  std::vector<__nv_bfloat16> zeros(8, __float2bfloat16(0.f));
  std::vector<float> out(128);
  const size_t smem = (64 + 128) * 128 + 1024;
#define LINFT_MISUSE(name, mode)                                                                \
  if (op == name) {                                                                             \
    cudaFuncSetAttribute(wgmma_misuse_kernel<mode>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                         static_cast<int>(smem));                                               \
    LINFT_LAUNCH(1, 128, smem, 0, wgmma_misuse_kernel<mode>)(zeros.data(), out.data());          \
    fprintf(stderr, "%s finished: the emulator missed the mistake\n", op.c_str());              \
    return 3;                                                                                   \
  }
  LINFT_MISUSE("wgmma_no_proxy_fence", kWgNoProxyFence)
  LINFT_MISUSE("wgmma_overwrite", kWgOverwrite)
  LINFT_MISUSE("wgmma_descriptors", kWgDescriptors)
  LINFT_MISUSE("wgmma_unwaited", kWgUnwaited)
  LINFT_MISUSE("wgmma_no_batch_fence", kWgNoBatchFence)
  LINFT_MISUSE("wgmma_not_landed", kWgNotLanded)
#undef LINFT_MISUSE
  return -1;  // not a misuse op
}

int main(int argc, char** argv) {
  const std::string op = argc > 1 ? argv[1] : "all";
  bool known = false;
  if (op.rfind("hang_", 0) == 0) {
    const int rc = run_hang(op);
    if (rc >= 0) return rc;
  }
  if (op.rfind("wgmma_", 0) == 0) {
    const int rc = run_wgmma_misuse(op);
    if (rc >= 0) return rc;
  }
  auto t0 = std::chrono::steady_clock::now();
  if (op == "gram" || op == "all") { run_gram(); known = true; }
  if (op == "ghost_gram" || op == "all") { run_ghost(); known = true; }
  if (op == "ghost_gram_t_loop" || op == "all") { run_ghost_t_loop(); known = true; }
  if (op == "psg_gram" || op == "all") { run_psg(); known = true; }
  if (!known) {
    fprintf(stderr, "usage: %s {gram|ghost_gram|ghost_gram_t_loop|psg_gram|all|hang_sync|hang_warp|"
            "hang_exit|wgmma_no_proxy_fence|wgmma_overwrite|wgmma_descriptors|wgmma_unwaited|"
            "wgmma_no_batch_fence|wgmma_not_landed}\n", argv[0]);
    return 2;
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  printf("SUMMARY op=%s checks=%d failures=%d launches=%ld blocks=%ld seconds=%.1f\n", op.c_str(),
         checks, failures, emu::launches, emu::blocks_run, secs);
  return failures ? 1 : 0;
}
