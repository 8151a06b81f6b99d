"""Triton Gram kernel: out[N, M] += a[N, P] @ b[M, P]^T (symmetric form when b is None).

Also holds the small helpers shared by the other Triton modules (dtype mapping, compute-dtype choice,
launch helpers). Nothing here touches CUDA at import time.

Tuning (see _autotune): on a GPU the tile shape (BLOCK_M = BLOCK_N, BLOCK_K), num_warps and num_stages
are autotuned among _GPU_CONFIGS[family], keyed by SIZE_KEY = size bucket of (N, M, P) and SYM, with
`out` (or the split-K scratch) restored between trials. In the interpreter: fixed _INTERP_BLOCKS, or
autotuning over _INTERP_CONFIGS with a CPU timer when LINFT_TRITON_AUTOTUNE=1.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._autotune import TunedKernel, family, size_key
from ._autotune import is_interpreted as _is_interpreted

__all__ = ["gram", "gram_kernel", "FP64_PAIR_BLOCK"]

# Largest grid extent used along axis 1 (CUDA limits gridDim.y to 65535); larger row counts are
# launched in chunks with a row/tile offset.
_MAX_GRID_Y = 65535

_TORCH_TO_TL = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _tl_dtype(dt):
    """torch dtype or tl dtype -> tl dtype."""
    if isinstance(dt, tl.dtype):
        return dt
    try:
        return _TORCH_TO_TL[dt]
    except KeyError:
        raise TypeError(f"unsupported dtype {dt}") from None


def _compute_config(in_dtypes, out_dtype, interpret: bool = False, fp32_precision: str = "ieee"):
    """Choose (compute dtype of tl.dot operands, accumulator dtype, input_precision).

    The accumulator has the output's precision (fp32 or fp64). Operands are converted to fp64 when the
    output is fp64. With an fp32 output, fp16/bf16 inputs that all share one dtype go to tl.dot as is
    (exact products, fp32 accumulation on tensor cores); any other mix is converted to fp32 and
    multiplied with `fp32_precision` ("ieee" = exact fp32 by default, "tf32" for speed). In the
    interpreter 16-bit operands are always converted to fp32 (its bf16 tl.dot is wrong).
    """
    in_dtypes = {_tl_dtype(d) for d in in_dtypes}
    acc = _tl_dtype(out_dtype)
    if acc not in (tl.float32, tl.float64):
        raise TypeError(f"out dtype must be float32 or float64, got {out_dtype}")
    if acc == tl.float64:
        return tl.float64, tl.float64, "ieee"
    if len(in_dtypes) == 1 and not interpret:
        (only,) = in_dtypes
        if only in (tl.float16, tl.bfloat16):
            return only, tl.float32, "ieee"
    return tl.float32, tl.float32, fp32_precision


def _device_guard(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b with acc's precision.

    fp64 is a broadcast multiply and a sum (CUDA cores) rather than tl.dot: Triton 3.6 cannot lower
    an fp64 tl.dot with K >= 16 for sm_90 (an MMAv2 "largeK" assertion, seen on an H200), and fp64
    has no tensor-core path worth the constraint. Keep fp64 tiles small (launchers do).
    """
    if ACC == tl.float64:
        return acc + tl.sum(a[:, :, None].to(tl.float64) * b[None, :, :].to(tl.float64), axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)


@triton.jit
def gram_kernel(a_ptr, b_ptr, out_ptr, N, M, P, K_SPLIT, split_stride, SIZE_KEY,
                SYM: tl.constexpr, CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) output tile per program over the K range of split program_id(1).

    Tiles are visited in groups of GROUP_M tile-rows (program_id(0) walks down a group's rows before
    moving right), so the A row panels and B column panels that neighbouring programs read stay in
    L2. Split s adds its partial sum into out_ptr + s * split_stride (a zeroed scratch when split).
    SIZE_KEY is unused: it is the autotuner's cache key (a size bucket).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(N, BLOCK_M)
    tiles_n = tl.cdiv(M, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    if SYM:
        if pid_n < pid_m:  # below the diagonal: covered by the transposed store of tile (n, m)
            return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < M
    a_rows = a_ptr + offs_m[:, None] * P
    b_cols = b_ptr + offs_n[None, :] * P
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(P, k_lo + K_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < k_hi
        a = tl.load(a_rows + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0).to(CDT)
        b = tl.load(b_cols + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0).to(CDT)
        acc = _mma(a, b, acc, PREC, ACC)
    out_ptr += split.to(tl.int64) * split_stride
    omask = mask_m[:, None] & mask_n[None, :]
    o_ptrs = out_ptr + offs_m[:, None] * M + offs_n[None, :]
    cur = tl.load(o_ptrs, mask=omask, other=0.0)
    tl.store(o_ptrs, (cur.to(ACC) + acc).to(out_ptr.dtype.element_ty), mask=omask)
    if SYM:
        if pid_n != pid_m:
            t_ptrs = out_ptr + offs_n[None, :] * M + offs_m[:, None]  # out[n, m] = acc[m, n]
            cur_t = tl.load(t_ptrs, mask=omask, other=0.0)
            tl.store(t_ptrs, (cur_t.to(ACC) + acc).to(out_ptr.dtype.element_ty), mask=omask)


def _cfg(bm, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bm, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


# GPU block shapes the autotuner chooses among (square tiles: the symmetric form mirrors a tile).
# 16-bit operands: tensor-core tiles; fp32 (ieee or tf32) and fp64 operands: smaller K steps.
_GPU_CONFIGS = {
    "16bit": [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 4), _cfg(128, 32, 4, 4), _cfg(64, 64, 4, 4)],
    "fp32": [_cfg(128, 32, 8, 3), _cfg(64, 32, 4, 4), _cfg(128, 16, 8, 4)],
    "fp64": [_cfg(32, 8, 4, 2), _cfg(32, 16, 8, 2)],  # CUDA-core fp64 (see _mma): small tiles
}
# ghost_gram / psg_gram tile edge for fp64 on a GPU (their tiles are cubes in _mma)
FP64_PAIR_BLOCK = 16
_INTERP_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
# interpreter autotuning (LINFT_TRITON_AUTOTUNE=1): small tiles, so odd test shapes span several
_INTERP_CONFIGS = [_cfg(16, 16, 4, 1), _cfg(32, 16, 4, 1)]
_TUNE = TunedKernel(gram_kernel, _GPU_CONFIGS, _INTERP_CONFIGS, _INTERP_BLOCKS,
                    dot_dims=("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=["SIZE_KEY", "SYM"],
                    restore_value=["out_ptr"])


MAX_SPLITS = 128


def _split_k(tiles: int, P: int, block_k: int, sms: int) -> int:
    """Split the K (= P) range when there are too few output tiles to fill the GPU: about two waves
    of programs over `sms` multiprocessors, each split at least 8 K-blocks long, at most MAX_SPLITS.
    (With 64 at most, an N=256 Gram's 3 tiles made 192 programs on 132 SMs: 1.45 waves; the H200 ran
    it at 24% of the bf16 rate, torch's a @ a.T at 2x that. 128 gives 264 programs, two full waves:
    0.21 ms by do_bench in the seventh session, torch's 0.18.)"""
    if tiles >= sms or P < 8 * block_k * 8:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), P // (8 * block_k), MAX_SPLITS))


def gram(a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor, *,
         blocks: dict | None = None, num_warps: int = 4, num_stages: int = 3,
         fp32_precision: str = "ieee", split_k: int | None = None) -> torch.Tensor:
    """out (N, M) += a (N, P) @ b (M, P)^T; b None = symmetric (only tiles on/above the diagonal).

    On a GPU (and in the interpreter with LINFT_TRITON_AUTOTUNE=1) the block shapes are autotuned per
    dtype family and size bucket unless `blocks` (BLOCK_M, BLOCK_N, BLOCK_K[, GROUP_M]) fixes them;
    small outputs split P across programs into an fp32/fp64 scratch that is then added to `out`
    (deterministic: no atomics). `split_k` forces the
    number of splits (tests; the result is the same).
    """
    sym = b is None
    N, P = a.shape
    M = N if sym else b.shape[0]
    if N == 0 or M == 0 or P == 0:
        return out
    interp = _TUNE.interpreted
    in_dtypes = [a.dtype] if sym else [a.dtype, b.dtype]
    cdt, acc, prec = _compute_config(in_dtypes, out.dtype, interp, fp32_precision)
    fam = family(cdt, acc)
    if blocks is not None:
        blocks = {"GROUP_M": 8, **blocks}
        if sym:
            blocks["BLOCK_N"] = blocks["BLOCK_M"]
    blocks = _TUNE.blocks(blocks)  # None: autotuned
    # Split-K sizing uses the list's first tile (on a GPU the largest: an upper bound on the tile count).
    first = blocks or _TUNE.configs(fam)[0].kwargs
    bm, bk = first["BLOCK_M"], first["BLOCK_K"]
    tiles_m, tiles_n = triton.cdiv(N, bm), triton.cdiv(M, bm)
    useful = tiles_m * (tiles_m + 1) // 2 if sym else tiles_m * tiles_n
    if split_k is not None:
        splits = max(1, int(split_k))
    else:
        splits = 1 if interp or not out.is_cuda else _split_k(
            useful, P, bk, torch.cuda.get_device_properties(out.device).multi_processor_count)
    k_split = triton.cdiv(triton.cdiv(P, splits), bk) * bk
    splits = triton.cdiv(P, k_split)
    dst = out if splits == 1 else torch.zeros((splits, N, M), dtype=out.dtype, device=out.device)
    args = (a, a if sym else b, dst, N, M, P, k_split, N * M, size_key(N, M, P))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(M, meta["BLOCK_N"]), splits)  # noqa: E731
    with _device_guard(out):
        _TUNE.launch(grid, args, dict(SYM=sym, CDT=cdt, ACC=acc, PREC=prec), fam, blocks, num_warps, num_stages)
    if splits > 1:
        out += dst.sum(0)
    return out
