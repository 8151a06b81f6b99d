"""Triton blocked per-sample-gradient Gram (per-layer Jacobian contraction).

F_i = sum_t m1[i,t] g1[i,t,:]^T x1[i,t,:]   (d_out, d_in), built tile by tile on chip, never stored.
kernel 0: out[i, j] += <F_i, F_j>;  1: <sign F_i, sign F_j>;  2: <F_i, sign F_j> (never symmetric).

One program per pair (i, j), looping over (BLOCK_O x BLOCK_D) tiles of F; each tile of F_i and F_j is
accumulated over token chunks with tl.dot, signed if requested, multiplied and reduced.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import FP64_PAIR_BLOCK, _MAX_GRID_Y, _compute_config, _device_guard, _is_interpreted, _mma

__all__ = ["psg_gram", "psg_gram_kernel", "KERNEL_CODES"]

KERNEL_CODES = {"sgd": 0, "signgd": 1, "asymmetric-signgd": 2}


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
def psg_gram_kernel(x1_ptr, g1_ptr, m1_ptr, x2_ptr, g2_ptr, m2_ptr, out_ptr,
                    N, M, T, S, D_IN, D_OUT, row_base,
                    SYM: tl.constexpr, KERNEL: tl.constexpr, HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
                    CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    j = tl.program_id(0)
    i = tl.program_id(1) + row_base
    if SYM:
        if j < i:
            return
    i64 = i.to(tl.int64)
    j64 = j.to(tl.int64)
    x1_ptr += i64 * T * D_IN
    g1_ptr += i64 * T * D_OUT
    x2_ptr += j64 * S * D_IN
    g2_ptr += j64 * S * D_OUT
    if HAS_M1:
        m1_ptr += i64 * T
    if HAS_M2:
        m2_ptr += j64 * S
    offs_o = tl.arange(0, BLOCK_O)
    offs_d = tl.arange(0, BLOCK_D)
    tot = tl.zeros((BLOCK_O, BLOCK_D), dtype=ACC)
    for o0 in range(0, D_OUT, BLOCK_O):
        oo = o0 + offs_o
        mo = oo < D_OUT
        for d0 in range(0, D_IN, BLOCK_D):
            dd = d0 + offs_d
            md = dd < D_IN
            fi = _f_tile(x1_ptr, g1_ptr, m1_ptr, T, D_IN, D_OUT, oo, dd, mo, md,
                         HAS_M1, CDT, ACC, PREC, BLOCK_O, BLOCK_D, BLOCK_T)
            fj = _f_tile(x2_ptr, g2_ptr, m2_ptr, S, D_IN, D_OUT, oo, dd, mo, md,
                         HAS_M2, CDT, ACC, PREC, BLOCK_O, BLOCK_D, BLOCK_T)
            if KERNEL == 1:
                fi = _sign(fi)
                fj = _sign(fj)
            elif KERNEL == 2:
                fj = _sign(fj)
            tot += fi * fj  # out-of-range entries of F are exactly 0 (and sign(0) = 0)
    val = tl.sum(tl.sum(tot, axis=1), axis=0)
    o = out_ptr + i64 * M + j64
    tl.store(o, (tl.load(o).to(ACC) + val).to(out_ptr.dtype.element_ty))
    if SYM:
        if j != i:
            o2 = out_ptr + j64 * M + i64
            tl.store(o2, (tl.load(o2).to(ACC) + val).to(out_ptr.dtype.element_ty))


def psg_gram(x1: torch.Tensor, g1: torch.Tensor, m1: torch.Tensor | None,
             x2: torch.Tensor | None, g2: torch.Tensor | None, m2: torch.Tensor | None,
             out: torch.Tensor, kernel: int = 0, *, block_o: int = 32, block_d: int = 32,
             block_t: int = 32, num_warps: int = 4, num_stages: int = 2,
             fp32_precision: str = "ieee") -> torch.Tensor:
    """out (N, M) += per-sample-gradient Gram; kernel 0 sgd, 1 signgd, 2 asymmetric-signgd.

    x2/g2/m2 None: second operand = first; symmetric (upper tiles only) for kernels 0 and 1, all pairs
    for kernel 2.
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
    for bs in (block_o, block_d, block_t):
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {bs}")
    interp = _is_interpreted(psg_gram_kernel)
    cdt, acc, prec = _compute_config([x1.dtype, g1.dtype, x2.dtype, g2.dtype], out.dtype,
                                     interp, fp32_precision)
    kw = {} if interp else dict(num_warps=num_warps, num_stages=num_stages)
    if acc == tl.float64 and not interp:  # CUDA-core fp64 products (see gram._mma): small cubes
        block_o = block_d = block_t = FP64_PAIR_BLOCK
    with _device_guard(out):
        for base in range(0, N, _MAX_GRID_Y):
            grid = (M, min(_MAX_GRID_Y, N - base))
            psg_gram_kernel[grid](x1, g1, m1, x2, g2, m2, out, N, M, T, S, d_in, d_out, base,
                                  SYM=sym, KERNEL=kernel, HAS_M1=m1 is not None,
                                  HAS_M2=m2 is not None, CDT=cdt, ACC=acc, PREC=prec,
                                  BLOCK_O=block_o, BLOCK_D=block_d, BLOCK_T=block_t, **kw)
    return out
