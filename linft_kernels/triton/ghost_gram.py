"""Triton ghost Gram kernel (factored per-sample-gradient Gram of a linear layer).

out[i, j] += sum_{t<T, s<S} m1[i,t] m2[j,s] (x1[i,t,:] . x2[j,s,:]) (g1[i,t,:] . g2[j,s,:])

One program per pair (i, j); the T x S products live only in on-chip tiles (BLOCK_T x BLOCK_S).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gram import FP64_PAIR_BLOCK, _MAX_GRID_Y, _compute_config, _device_guard, _is_interpreted, _mma

__all__ = ["ghost_gram", "ghost_gram_kernel"]


@triton.jit
def ghost_gram_kernel(x1_ptr, g1_ptr, m1_ptr, x2_ptr, g2_ptr, m2_ptr, out_ptr,
                      N, M, T, S, D_IN, D_OUT, row_base,
                      SYM: tl.constexpr, HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
                      CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
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
    offs_t = tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    tot = tl.zeros((BLOCK_T, BLOCK_S), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + offs_t
        mt = tt < T
        if HAS_M1:
            mt = mt & (tl.load(m1_ptr + i64 * T + tt, mask=mt, other=0) != 0)
        for s0 in range(0, S, BLOCK_S):
            ss = s0 + offs_s
            ms = ss < S
            if HAS_M2:
                ms = ms & (tl.load(m2_ptr + j64 * S + ss, mask=ms, other=0) != 0)
            # A = X1_t X2_s^T over d_in
            a = tl.zeros((BLOCK_T, BLOCK_S), dtype=ACC)
            for d0 in range(0, D_IN, BLOCK_D):
                dd = d0 + offs_d
                md = dd < D_IN
                xt = tl.load(x1_ptr + tt[:, None] * D_IN + dd[None, :],
                             mask=mt[:, None] & md[None, :], other=0.0).to(CDT)
                xs = tl.load(x2_ptr + ss[None, :] * D_IN + dd[:, None],
                             mask=md[:, None] & ms[None, :], other=0.0).to(CDT)
                a = _mma(xt, xs, a, PREC, ACC)
            # B = G1_t G2_s^T over d_out
            b = tl.zeros((BLOCK_T, BLOCK_S), dtype=ACC)
            for d0 in range(0, D_OUT, BLOCK_D):
                dd = d0 + offs_d
                md = dd < D_OUT
                gt = tl.load(g1_ptr + tt[:, None] * D_OUT + dd[None, :],
                             mask=mt[:, None] & md[None, :], other=0.0).to(CDT)
                gs = tl.load(g2_ptr + ss[None, :] * D_OUT + dd[:, None],
                             mask=md[:, None] & ms[None, :], other=0.0).to(CDT)
                b = _mma(gt, gs, b, PREC, ACC)
            # masked / out-of-range rows and columns were loaded as zeros, so a*b is zero there
            tot += a * b
    val = tl.sum(tl.sum(tot, axis=1), axis=0)
    o = out_ptr + i64 * M + j64
    tl.store(o, (tl.load(o).to(ACC) + val).to(out_ptr.dtype.element_ty))
    if SYM:
        if j != i:
            o2 = out_ptr + j64 * M + i64
            tl.store(o2, (tl.load(o2).to(ACC) + val).to(out_ptr.dtype.element_ty))


def ghost_gram(x1: torch.Tensor, g1: torch.Tensor, m1: torch.Tensor | None,
               x2: torch.Tensor | None, g2: torch.Tensor | None, m2: torch.Tensor | None,
               out: torch.Tensor, *, block_t: int = 32, block_s: int = 32, block_d: int = 32,
               num_warps: int = 4, num_stages: int = 2, fp32_precision: str = "ieee") -> torch.Tensor:
    """out (N, M) += ghost Gram of (x1, g1, m1) and (x2, g2, m2); x2/g2/m2 None = symmetric."""
    sym = x2 is None
    if sym:
        x2, g2, m2 = x1, g1, m1
    N, T, d_in = x1.shape
    d_out = g1.shape[2]
    M, S = x2.shape[0], x2.shape[1]
    if N == 0 or M == 0 or T == 0 or S == 0 or d_in == 0 or d_out == 0:
        return out
    if sym:
        block_s = block_t
    for bs in (block_t, block_s, block_d):
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {bs}")
    interp = _is_interpreted(ghost_gram_kernel)
    cdt, acc, prec = _compute_config([x1.dtype, g1.dtype, x2.dtype, g2.dtype], out.dtype,
                                     interp, fp32_precision)
    kw = {} if interp else dict(num_warps=num_warps, num_stages=num_stages)
    if acc == tl.float64 and not interp:  # CUDA-core fp64 products (see gram._mma): small cubes
        block_t = block_s = block_d = FP64_PAIR_BLOCK
    with _device_guard(out):
        for base in range(0, N, _MAX_GRID_Y):
            grid = (M, min(_MAX_GRID_Y, N - base))
            ghost_gram_kernel[grid](x1, g1, m1, x2, g2, m2, out, N, M, T, S, d_in, d_out, base,
                                    SYM=sym, HAS_M1=m1 is not None, HAS_M2=m2 is not None,
                                    CDT=cdt, ACC=acc, PREC=prec,
                                    BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_D=block_d, **kw)
    return out
