"""Triton per-sample-gradient Gram (per-layer Jacobian contraction), two stages over d_out chunks.

F_i = sum_t m1[i,t] g1[i,t,:]^T x1[i,t,:]   (d_out, d_in)
kernel 0: out[i, j] += <F_i, F_j>;  1: <sign F_i, sign F_j>;  2: <F_i, sign F_j> (never symmetric).

For each chunk of `oc` rows of F (all samples at once, so no sample's gradient is built twice):
  1. `psg_features_kernel`: one program per (sample, o-tile, d-tile) builds the F tile with tl.dot
     over token chunks (16-bit operands on tensor cores, fp32/fp64 accumulation), signs it if asked,
     and writes it to a scratch of N x oc x d_in (bounded by `scratch_bytes`; signgd's signs in bf16,
     exactly, whatever F's dtype);
  2. the Triton `gram` (symmetric half tiles, autotuned on a GPU) adds scratch @ scratch2^T into out.
The earlier one-program-per-pair kernel rebuilt both samples' F tiles for every pair (N times the
work of building each once): 0.1% of the bf16 GEMM rate on an H200 at N=256, T=256, d=1024.

Tuning (see _autotune): on a GPU the features kernel's (BLOCK_O, BLOCK_D, BLOCK_T), num_warps and
num_stages are autotuned among GPU_CONFIGS[family] ("16bit" tensor-core tiles, "fp32", "fp64" cubes of
FP64_PAIR_BLOCK on CUDA cores), keyed by SIZE_KEY = size bucket of (N, T, oc, d_in); it overwrites its
whole scratch, so trials need no restore. Stage 2 is gram's own tuning (out restored between trials).
In the interpreter: fixed 32-blocks, or autotuning over INTERP_CONFIGS with a CPU timer (both stages)
when LINFT_TRITON_AUTOTUNE=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import TunedKernel, family, size_key
from .gram import FP64_PAIR_BLOCK, _compute_config, _device_guard, _mma
from .gram import gram as _gram

__all__ = ["psg_gram", "psg_features_kernel", "KERNEL_CODES", "GPU_CONFIGS", "INTERP_CONFIGS"]

KERNEL_CODES = {"sgd": 0, "signgd": 1, "asymmetric-signgd": 2}
# Scratch for one chunk of per-sample-gradient rows (both operands together).
SCRATCH_BYTES = 256 << 20


@triton.jit
def _sign(f):
    return tl.where(f > 0, 1.0, tl.where(f < 0, -1.0, 0.0)).to(f.dtype)


@triton.jit
def _f_tile(x_ptr, g_ptr, m_ptr, T, D_IN, D_OUT, oo, dd, mo, md,
            HAS_M: tl.constexpr, CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
            BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """F[oo, dd] = sum_t m[t] g[t, oo] x[t, dd] for one sample (pointers already offset)."""
    offs_t = tl.arange(0, BLOCK_T)
    f = tl.zeros((BLOCK_O, BLOCK_D), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + offs_t
        mt = tt < T
        if HAS_M:
            mt = mt & (tl.load(m_ptr + tt, mask=mt, other=0) != 0)
        g = tl.load(g_ptr + tt[None, :] * D_OUT + oo[:, None],
                    mask=mo[:, None] & mt[None, :], other=0.0).to(CDT)   # (BLOCK_O, BLOCK_T)
        x = tl.load(x_ptr + tt[:, None] * D_IN + dd[None, :],
                    mask=mt[:, None] & md[None, :], other=0.0).to(CDT)   # (BLOCK_T, BLOCK_D)
        f = _mma(g, x, f, PREC, ACC)
    return f


@triton.jit
def _round_to_bf16(f):
    """fp32 f rounded to the nearest bf16 value (ties to even), still in fp32; NaN kept. The
    interpreter's fp32 -> bf16 conversion truncates (a GPU's rounds to nearest even): after this
    rounding the conversion is exact on both."""
    bits = f.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(f != f, f, bits.to(tl.float32, bitcast=True))


@triton.jit
def psg_features_kernel(x_ptr, g_ptr, m_ptr, f_ptr, T, D_IN, D_OUT, o0, OC, SIZE_KEY,
                        HAS_M: tl.constexpr, SIGN: tl.constexpr, CDT: tl.constexpr, ACC: tl.constexpr,
                        PREC: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """f[n, o - o0, d] = (sign of) F_n[o, d] for o in [o0, o0 + OC): one (BLOCK_O x BLOCK_D) tile.

    SIZE_KEY is unused: it is the autotuner's cache key (a size bucket). ROUND_BF16: round to bf16
    explicitly before the store (bf16 tiles in the interpreter, see `_round_to_bf16`).
    """
    n = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    tiles_d = tl.cdiv(D_IN, BLOCK_D)
    oo = o0 + (tile // tiles_d) * BLOCK_O + tl.arange(0, BLOCK_O)
    dd = (tile % tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    mo = (oo < o0 + OC) & (oo < D_OUT)
    md = dd < D_IN
    x_ptr += n * T * D_IN
    g_ptr += n * T * D_OUT
    if HAS_M:
        m_ptr += n * T
    f = _f_tile(x_ptr, g_ptr, m_ptr, T, D_IN, D_OUT, oo, dd, mo, md,
                HAS_M, CDT, ACC, PREC, BLOCK_O, BLOCK_D, BLOCK_T)
    if SIGN:  # -1, 0, 1: exact in fp32 and in the scratch (bf16 for signgd); fp64 -> bf16 via fp32
        f = _sign(f).to(tl.float32)
    if ROUND_BF16:
        f = _round_to_bf16(f)
    dst = f_ptr + n * OC * D_IN + (oo - o0)[:, None] * D_IN + dd[None, :]
    tl.store(dst, f.to(f_ptr.dtype.element_ty), mask=mo[:, None] & md[None, :])


def _cfg(o, d, t, warps, stages):
    return triton.Config({"BLOCK_O": o, "BLOCK_D": d, "BLOCK_T": t}, num_warps=warps, num_stages=stages)


# F tiles (BLOCK_O x BLOCK_D: tl.dot M and N) built over token steps (BLOCK_T: tl.dot K); all >= 16
# 16-bit: the 128 x 128 tiles read each sample's x and g half as often as 64 x 64 ones (every (o, d)
# tile re-reads its T x BLOCK rows; at T=256 the loads, not the products, bound the smaller tiles);
# sm_90: wgmma (HGMMA), 155-162 registers, no spills (cuobjdump of the compiled cubins).
GPU_CONFIGS = {
    "16bit": [_cfg(64, 64, 32, 4, 3), _cfg(128, 64, 32, 8, 3), _cfg(64, 64, 64, 4, 2),
              _cfg(128, 128, 32, 8, 3), _cfg(128, 128, 64, 8, 2)],
    "fp32": [_cfg(32, 64, 32, 4, 3), _cfg(64, 64, 32, 4, 3), _cfg(64, 64, 16, 4, 4)],
    # CUDA-core fp64 (see gram._mma: an (O, T, D) broadcast per step): small cubes only
    "fp64": [_cfg(FP64_PAIR_BLOCK, FP64_PAIR_BLOCK, FP64_PAIR_BLOCK, 4, 3),
             _cfg(FP64_PAIR_BLOCK, FP64_PAIR_BLOCK, FP64_PAIR_BLOCK, 2, 2)],
}
INTERP_CONFIGS = [_cfg(16, 16, 16, 4, 1), _cfg(32, 32, 16, 4, 1)]
_TUNE = TunedKernel(psg_features_kernel, GPU_CONFIGS, INTERP_CONFIGS, dict(BLOCK_O=32, BLOCK_D=32, BLOCK_T=32),
                    dot_dims=("BLOCK_O", "BLOCK_D", "BLOCK_T"), key=["SIZE_KEY"])


def _features(x, g, m, f, o0, oc, sign, cdt, acc, prec, blocks, num_warps, num_stages):
    N, T, d_in = x.shape
    d_out = g.shape[2]
    if T == 0:
        f.zero_()
        return f
    grid = lambda meta: (N, triton.cdiv(oc, meta["BLOCK_O"]) * triton.cdiv(d_in, meta["BLOCK_D"]))  # noqa: E731
    args = (x, g, m, f, T, d_in, d_out, o0, oc, size_key(N, T, oc, d_in))
    const = dict(HAS_M=m is not None, SIGN=sign, CDT=cdt, ACC=acc, PREC=prec,
                 ROUND_BF16=f.dtype == torch.bfloat16 and _TUNE.interpreted and not sign)  # signs: exact
    _TUNE.launch(grid, args, const, family(cdt, acc), blocks, num_warps, num_stages)
    return f


def psg_gram(x1: torch.Tensor, g1: torch.Tensor, m1: torch.Tensor | None,
             x2: torch.Tensor | None, g2: torch.Tensor | None, m2: torch.Tensor | None,
             out: torch.Tensor, kernel: int = 0, *, num_warps: int = 4, num_stages: int = 3,
             fp32_precision: str = "ieee", scratch_bytes: int = SCRATCH_BYTES,
             tile_dtype: torch.dtype | None = None, blocks: dict | None = None) -> torch.Tensor:
    """out (N, M) += per-sample-gradient Gram; kernel 0 sgd, 1 signgd, 2 asymmetric-signgd.

    x2/g2/m2 None: second operand = first; symmetric (upper tiles only) for kernels 0 and 1, all pairs
    for kernel 2. `scratch_bytes` bounds the per-chunk scratch of F rows (at least one row of F).
    tile_dtype: the dtype F is built and stored in (default out's; fp32 with an fp64 out: mixed mode;
    the factors' bf16/fp16: F summed in fp32, stored rounded, its Gram on 16-bit tensor-core operands).
    blocks: fixed (BLOCK_O, BLOCK_D, BLOCK_T) of the features kernel (powers of two >= 16); None:
    autotuned on a GPU (and in the interpreter with LINFT_TRITON_AUTOTUNE=1).
    """
    if isinstance(kernel, str):
        kernel = KERNEL_CODES[kernel]
    kernel = int(kernel)
    if kernel not in (0, 1, 2):
        raise ValueError(f"kernel must be 0, 1 or 2, got {kernel}")
    same = x2 is None
    if same:
        x2, g2, m2 = x1, g1, m1
    sym = same and kernel != 2
    N, T, d_in = x1.shape
    d_out = g1.shape[2]
    M, S = x2.shape[0], x2.shape[1]
    if N == 0 or M == 0 or d_in == 0 or d_out == 0:
        return out
    if T == 0 or S == 0:  # F = 0 on one side: every kernel gives 0
        return out
    interp = _TUNE.interpreted
    f_dtype = out.dtype if tile_dtype is None else tile_dtype
    # 16-bit tiles: F summed over tokens in fp32 and rounded once when stored (stage 2 then multiplies
    # 16-bit operands on tensor cores)
    f_acc = torch.float32 if f_dtype in (torch.bfloat16, torch.float16) else f_dtype
    cdt, acc, prec = _compute_config([x1.dtype, g1.dtype, x2.dtype, g2.dtype], f_acc,
                                     interp, fp32_precision)
    blocks = _TUNE.blocks(blocks)  # None: autotuned
    # signgd: sign F is -1, 0 or 1, exact in bf16 whatever F was built in, so it is stored in bf16 and
    # stage 2 multiplies bf16 operands on tensor cores. Their fp32 sums are exact integers up to 2^24:
    # a chunk has at most 2^24 columns, and with an fp64 out each chunk's Gram goes through an fp32
    # scratch that is then added (exactly) to out.
    signs16 = kernel == 1 and f_dtype in (torch.float32, torch.float64)
    store_dtype = torch.bfloat16 if signs16 else f_dtype
    rows = N if sym else N + M
    oc_max = max(1, min(d_out, scratch_bytes // max(1, rows * d_in * torch.finfo(store_dtype).bits // 8)))
    if signs16:
        oc_max = max(1, min(oc_max, (1 << 24) // d_in))
    buf1 = torch.empty(N * oc_max * d_in, dtype=store_dtype, device=out.device)
    buf2 = None if sym else torch.empty(M * oc_max * d_in, dtype=store_dtype, device=out.device)
    k32 = torch.empty(N, M, dtype=torch.float32, device=out.device) if signs16 and out.dtype == torch.float64 \
        else None
    with _device_guard(out):
        for o0 in range(0, d_out, oc_max):
            oc = min(oc_max, d_out - o0)
            f1 = _features(x1, g1, m1, buf1[:N * oc * d_in].view(N, oc * d_in), o0, oc, kernel == 1,
                           cdt, acc, prec, blocks, num_warps, num_stages)
            f2 = None if sym else _features(x2, g2, m2, buf2[:M * oc * d_in].view(M, oc * d_in), o0, oc,
                                             kernel != 0, cdt, acc, prec, blocks, num_warps, num_stages)
            if k32 is None:
                _gram(f1, f2, out, fp32_precision=fp32_precision)
            else:
                _gram(f1, f2, k32.zero_(), fp32_precision=fp32_precision)
                out += k32
    return out
