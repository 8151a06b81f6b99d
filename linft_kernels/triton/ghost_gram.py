"""Triton ghost Gram kernel (factored per-sample-gradient Gram of a linear layer).

out[i, j] += sum_{t<T, s<S} m1[i,t] m2[j,s] (x1[i,t,:] . x2[j,s,:]) (g1[i,t,:] . g2[j,s,:])

One program per pair (i, j) and slice of T_CHUNK tokens of t; the T x S products live only in
on-chip tiles (BLOCK_T x BLOCK_S). Few pairs with long sequences (fewer pairs than _SPLIT_PROGRAMS
per SM) split t into slices (SPLIT): each program writes its partial sum to a (slices, N, M) scratch
that is summed into out once (a symmetric result mirrored from its upper triangle, exactly symmetric).
Otherwise T_CHUNK = T and each program adds its pair (and the mirror) into out directly.

Tuning (see _autotune): on a GPU (BLOCK_T, BLOCK_S, BLOCK_D), num_warps and num_stages are autotuned
among GPU_CONFIGS[family] ("16bit" tensor-core tiles, "fp32", "fp64" cubes of FP64_PAIR_BLOCK on CUDA
cores), keyed by SIZE_KEY = size bucket of (N*M, T, S, d_in, d_out), SYM and SPLIT, with `out` restored
between trials. In the interpreter: fixed 32-blocks, or autotuning over INTERP_CONFIGS with a CPU
timer when LINFT_TRITON_AUTOTUNE=1. `blocks` fixes the shape anywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._blas import add_symmetric_
from ._autotune import TunedKernel, family, size_key
from .gram import FP64_PAIR_BLOCK, _MAX_GRID_Y, _compute_config, _device_guard, _mma

__all__ = ["ghost_gram", "ghost_gram_kernel", "GPU_CONFIGS", "INTERP_CONFIGS"]


@triton.jit
def ghost_gram_kernel(x1_ptr, g1_ptr, m1_ptr, x2_ptr, g2_ptr, m2_ptr, out_ptr,
                      N, M, T, S, D_IN, D_OUT, row_base, T_CHUNK, SIZE_KEY,
                      SYM: tl.constexpr, SPLIT: tl.constexpr, HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
                      CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pair (i, j) = (program_id(1) + row_base, program_id(0)), tokens t of slice z = program_id(2)
    ([z T_CHUNK, (z + 1) T_CHUNK)): SPLIT stores the slice's sum in out[z, i, j] (out: (slices, N, M)
    scratch), else adds it into out[i, j] (and out[j, i] when SYM).

    SIZE_KEY is unused: it is the autotuner's cache key (a size bucket).
    """
    j = tl.program_id(0)
    i = tl.program_id(1) + row_base
    z = tl.program_id(2)
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
    t_lo = z * T_CHUNK
    t_hi = tl.minimum(T, t_lo + T_CHUNK)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        tt = t0 + offs_t
        mt = tt < t_hi
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
    if SPLIT:
        tl.store(out_ptr + (z.to(tl.int64) * N + i64) * M + j64, val.to(out_ptr.dtype.element_ty))
    else:
        o = out_ptr + i64 * M + j64
        tl.store(o, (tl.load(o).to(ACC) + val).to(out_ptr.dtype.element_ty))
        if SYM:
            if j != i:
                o2 = out_ptr + j64 * M + i64
                tl.store(o2, (tl.load(o2).to(ACC) + val).to(out_ptr.dtype.element_ty))


def _cfg(t, d, warps, stages):
    return triton.Config({"BLOCK_T": t, "BLOCK_S": t, "BLOCK_D": d}, num_warps=warps, num_stages=stages)


# T x S tiles (tl.dot M and N) and the d_in/d_out step (tl.dot K); all >= 16 (a GPU's tl.dot minimum)
GPU_CONFIGS = {
    "16bit": [_cfg(32, 32, 4, 2), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 3)],
    "fp32": [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2), _cfg(32, 16, 4, 3)],
    # CUDA-core fp64 (see gram._mma: a (T, D, S) broadcast per step): small cubes only
    "fp64": [_cfg(FP64_PAIR_BLOCK, FP64_PAIR_BLOCK, 4, 2), _cfg(FP64_PAIR_BLOCK, FP64_PAIR_BLOCK, 2, 2)],
}
INTERP_CONFIGS = [_cfg(16, 16, 4, 1), _cfg(32, 32, 4, 1)]
_TUNE = TunedKernel(ghost_gram_kernel, GPU_CONFIGS, INTERP_CONFIGS, dict(BLOCK_T=32, BLOCK_S=32, BLOCK_D=32),
                    dot_dims=("BLOCK_T", "BLOCK_S", "BLOCK_D"), key=["SIZE_KEY", "SYM", "SPLIT"],
                    restore_value=["out_ptr"])

# t is split when the pairs would give fewer than this many programs per SM (H200: 132 SMs), into
# slices of a multiple of T_UNIT tokens (the largest BLOCK_T: only a slice's last tile is partial).
_SPLIT_PROGRAMS = 4
T_UNIT = 64
_MAX_GRID_Z = 65535


def _t_slices(pairs: int, T: int, sms: int | None, t_chunk: int | None) -> tuple[int, int]:
    """(slices, T_CHUNK) of the t split: `t_chunk` tokens per slice when given; else one slice unless
    `pairs` give fewer than _SPLIT_PROGRAMS programs per SM of a GPU with `sms` SMs (None: not a GPU,
    never split), then as many slices of T_UNIT multiples as fill it (or T allows)."""
    if t_chunk is not None:
        if t_chunk < 1:
            raise ValueError(f"t_chunk must be >= 1, got {t_chunk}")
        if triton.cdiv(T, t_chunk) > _MAX_GRID_Z:
            raise ValueError(f"t_chunk={t_chunk} cuts T={T} into more than {_MAX_GRID_Z} slices")
        return triton.cdiv(T, t_chunk), t_chunk
    if sms is None:
        return 1, T
    slices = min(triton.cdiv(T, T_UNIT), triton.cdiv(_SPLIT_PROGRAMS * sms, max(1, pairs)))
    if slices <= 1:
        return 1, T
    chunk = triton.cdiv(triton.cdiv(T, slices), T_UNIT) * T_UNIT  # T / slices up to a T_UNIT multiple
    return triton.cdiv(T, chunk), chunk


def ghost_gram(x1: torch.Tensor, g1: torch.Tensor, m1: torch.Tensor | None,
               x2: torch.Tensor | None, g2: torch.Tensor | None, m2: torch.Tensor | None,
               out: torch.Tensor, *, blocks: dict | None = None, num_warps: int = 4, num_stages: int = 2,
               fp32_precision: str = "ieee", t_chunk: int | None = None) -> torch.Tensor:
    """out (N, M) += ghost Gram of (x1, g1, m1) and (x2, g2, m2); x2/g2/m2 None = symmetric.

    Autotuned on a GPU (and in the interpreter with LINFT_TRITON_AUTOTUNE=1) unless `blocks`
    (BLOCK_T, BLOCK_D[, BLOCK_S]; powers of two >= 16) fixes the tile shape. `t_chunk` forces the
    split of t into slices of that many tokens (default: `_t_slices`); a split sums its slices in
    a (slices, N, M) scratch of out's dtype.
    """
    sym = x2 is None
    if sym:
        x2, g2, m2 = x1, g1, m1
    N, T, d_in = x1.shape
    d_out = g1.shape[2]
    M, S = x2.shape[0], x2.shape[1]
    if N == 0 or M == 0 or T == 0 or S == 0 or d_in == 0 or d_out == 0:
        return out
    if blocks is not None:
        blocks = {"BLOCK_S": blocks["BLOCK_T"], **blocks}
    blocks = _TUNE.blocks(blocks)  # None: autotuned
    cdt, acc, prec = _compute_config([x1.dtype, g1.dtype, x2.dtype, g2.dtype], out.dtype,
                                     _TUNE.interpreted, fp32_precision)
    pairs = N * (N + 1) // 2 if sym else N * M
    gpu = out.device.type == "cuda" and not _TUNE.interpreted
    sms = torch.cuda.get_device_properties(out.device).multi_processor_count if gpu else None
    slices, chunk = _t_slices(pairs, T, sms, t_chunk)
    split = slices > 1
    const = dict(SYM=sym, SPLIT=split, HAS_M1=m1 is not None, HAS_M2=m2 is not None, CDT=cdt, ACC=acc,
                 PREC=prec)
    key = size_key(N * M, T, S, d_in, d_out)
    dst = torch.zeros(slices, N, M, dtype=out.dtype, device=out.device) if split else out
    with _device_guard(out):
        for base in range(0, N, _MAX_GRID_Y):
            grid = (M, min(_MAX_GRID_Y, N - base), slices)
            args = (x1, g1, m1, x2, g2, m2, dst, N, M, T, S, d_in, d_out, base, chunk, key)
            _TUNE.launch(grid, args, const, family(cdt, acc), blocks, num_warps, num_stages)
    if split:
        part = dst.sum(0)
        if sym:  # slices of pairs i <= j only: out gets the symmetric matrix of part's upper triangle
            add_symmetric_(out, part)
        else:
            out += part
    return out
