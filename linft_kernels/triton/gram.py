"""Triton Gram kernel: out[N, M] += a[N, P] @ b[M, P]^T (symmetric form when b is None).

Also holds the small helpers shared by the other Triton modules (dtype mapping, compute-dtype choice,
launch helpers). Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["gram", "gram_kernel"]

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


def _is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1 (runs on CPU through numpy)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout change in a future Triton
        return type(kernel).__name__ == "InterpretedFunction"
    return isinstance(kernel, InterpretedFunction)


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
def gram_kernel(a_ptr, b_ptr, out_ptr, N, M, P, tile_base,
                SYM: tl.constexpr, CDT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1) + tile_base
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, P, BLOCK_K):
        kk = k0 + offs_k
        mk = kk < P
        a = tl.load(a_rows + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0).to(CDT)
        b = tl.load(b_cols + kk[:, None], mask=mk[:, None] & mask_n[None, :], other=0.0).to(CDT)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    omask = mask_m[:, None] & mask_n[None, :]
    o_ptrs = out_ptr + offs_m[:, None] * M + offs_n[None, :]
    cur = tl.load(o_ptrs, mask=omask, other=0.0)
    tl.store(o_ptrs, (cur.to(ACC) + acc).to(out_ptr.dtype.element_ty), mask=omask)
    if SYM:
        if pid_n != pid_m:
            t_ptrs = out_ptr + offs_n[None, :] * M + offs_m[:, None]  # out[n, m] = acc[m, n]
            cur_t = tl.load(t_ptrs, mask=omask, other=0.0)
            tl.store(t_ptrs, (cur_t.to(ACC) + acc).to(out_ptr.dtype.element_ty), mask=omask)


def gram(a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor, *,
         block_m: int = 64, block_n: int = 64, block_k: int = 32,
         num_warps: int = 4, num_stages: int = 3, fp32_precision: str = "ieee") -> torch.Tensor:
    """out (N, M) += a (N, P) @ b (M, P)^T; b None = symmetric (only tiles on/above the diagonal)."""
    sym = b is None
    N, P = a.shape
    M = N if sym else b.shape[0]
    if N == 0 or M == 0 or P == 0:
        return out
    if sym:
        block_n = block_m
    for bs in (block_m, block_n, block_k):
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {bs}")
    interp = _is_interpreted(gram_kernel)
    in_dtypes = [a.dtype] if sym else [a.dtype, b.dtype]
    cdt, acc, prec = _compute_config(in_dtypes, out.dtype, interp, fp32_precision)
    tiles_m = triton.cdiv(N, block_m)
    tiles_n = triton.cdiv(M, block_n)
    kw = {} if interp else dict(num_warps=num_warps, num_stages=num_stages)
    with _device_guard(out):
        for base in range(0, tiles_m, _MAX_GRID_Y):
            grid = (tiles_n, min(_MAX_GRID_Y, tiles_m - base))
            gram_kernel[grid](a, a if sym else b, out, N, M, P, base,
                              SYM=sym, CDT=cdt, ACC=acc, PREC=prec,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **kw)
    return out
