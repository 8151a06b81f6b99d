"""gram and psg_gram on CPU tensors through torch's GEMM (the vendor BLAS), for inputs already in the
dtype the products are formed in.

When the inputs are fp32 (or fp64) and so is the output, nothing is gained by packing and converting
in our own kernel: the GEMM library's micro-kernels are faster on this work (1.23-1.35x the native
kernel for the cross form on a 2-core Sapphire Rapids VM). The symmetric form then exploits symmetry
at block granularity: split the N rows into `blocks` row blocks and compute only the blocks on and
above the diagonal: each strip's part right of its diagonal block as one GEMM, and each diagonal
block split the same way once more (strips of >= 256, then >= 128 rows), about 52% of the full
product's work at N=4096 (56% without the second level), into a scratch whose upper triangle is then
added to `out` and mirrored into its lower triangle (three O(N^2) passes), so the result is exactly
symmetric. Not for few rows (`few_rows`: 96-256 rows over a long P): there strips gain nothing and
the native kernel, which packs the rows once and computes the triangle, is faster.

psg_gram builds each d_out x d_in chunk of every per-sample gradient with one batched GEMM over the
samples (K = tokens) into a bounded buffer and adds the chunk's Gram (K = chunk size) into a scratch,
symmetric form by the same strips (by the native few-rows gram when the caller gives it and the rows
are few); with fp32 tiles and an fp64 out the chunk's Gram is the native mixed-precision gram
(1.08-1.28x the native psg_gram at the NTK benchmark's shapes); see `psg_gram`.

Mixed precision in gram (16-bit inputs, fp64 accumulation of fp32 inputs) stays with the native
kernels.

`psg_gram` is torch code and also runs on CUDA tensors: with 16-bit tiles the Triton backend's
psg_gram uses it to build F by cuBLAS, with the Triton gram as its `gram` (ops._psg_gemm_then_triton_gram);
with `cuda_gram_fp32` as its `gram` it is an all-cuBLAS candidate that bench/harness.py times beside it.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["applies", "cuda_gram_fp32", "gram", "psg_applies", "psg_gram"]

SYM_BLOCKS = 8
MIN_STRIP_ROWS = 256  # thinner strips make memory-bound GEMMs (measured: N=128 in 8 strips ran 0.57x a@a.T)
PSG_BUFFER = 1 << 23  # elements of one chunk of all per-sample gradients (32 MiB in fp32)
PSG_ROWS_OUT = 64     # d_out rows per chunk: the batched GEMM's M (measured 16 -> 64: 1.5-1.9x faster)
PSG_MIN_STRIP_ROWS = 64  # the chunk Grams have K >= ~16k: strips of 64 rows still run at GEMM speed
# On a GPU (16-bit tiles, the Triton backend's psg_gram): chunks of up to 2^28 entries (512 MiB in 16
# bits). On an H200 at N=256, T=256, d=1024 bf16 (with cuBLAS's Gram, rows_out=256), all of F in one
# chunk took 0.56 ms, in chunks of 2^26 entries 0.72 ms (more, smaller GEMMs and Grams;
# bench/profile_psg_gpu.py).
PSG_BUFFER_GPU = 1 << 28
# Symmetric Grams of FEW_ROWS_MIN to FEW_ROWS rows and at least FEW_ROWS_MIN_K columns go to the native
# kernel (`few_rows`): it packs the rows once per k chunk and computes ~62% of the product at 128 rows,
# where torch's GEMM gets no faster in strips (three 64-row products of a 128-row Gram take 0.96x the
# time of the whole one). Measured against torch (fp32): 1.2-1.3x at 128-256 rows and 16384-32768
# columns, 0.98x at 64 rows, 0.05-0.9x at 2-32 rows (memory-bound: torch's GEMM streams them better);
# fp64: 1.28-1.59x at 100-256 rows.
FEW_ROWS = 256
FEW_ROWS_MIN = 96
FEW_ROWS_MIN_K = 16384


def few_rows(n: int, k: int) -> bool:
    """Whether a symmetric n x n Gram over k columns is for the native few-rows kernel."""
    return FEW_ROWS_MIN <= n <= FEW_ROWS and k >= FEW_ROWS_MIN_K


def applies(a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> bool:
    """True when the inputs are already in the output's floating dtype (fp32 or fp64), except the
    symmetric Gram of few rows over a long P (`few_rows`: the native kernel is faster there)."""
    if b is None and few_rows(a.shape[0], a.shape[1]):
        return False
    return (out.dtype in (torch.float32, torch.float64) and a.dtype == out.dtype
            and (b is None or b.dtype == out.dtype))


def _upper_strips(a: torch.Tensor, upper: torch.Tensor, lo: int, hi: int, blocks: int, min_rows: int,
                  levels: int) -> None:
    """upper[i, j] += a_i . a_j for lo <= i <= j < hi (and some of i > j inside diagonal blocks).

    Rows [lo, hi) are cut into strips; each strip's part right of its diagonal block is one GEMM, and
    the diagonal block itself is split the same way `levels` more times (or computed whole).
    """
    n = hi - lo
    bs = max(1, -(-n // blocks), min(n, min_rows))
    for i0 in range(lo, hi, bs):
        i1 = min(hi, i0 + bs)
        if i1 < hi:
            upper[i0:i1, i1:hi].addmm_(a[i0:i1], a[i1:hi].t())
        if levels > 0 and i1 - i0 >= 2 * max(1, min_rows // 2):
            _upper_strips(a, upper, i0, i1, blocks, max(1, min_rows // 2), levels - 1)
        else:
            upper[i0:i1, i0:i1].addmm_(a[i0:i1], a[i0:i1].t())


def add_symmetric_(out: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """out += the symmetric matrix whose upper triangle is upper's (its lower part is ignored and
    upper is overwritten): no temporaries. Each element of out gets exactly one nonzero addend, so a
    symmetric out stays exactly symmetric."""
    out.add_(upper.triu_())
    return out.add_(upper.triu_(1).t())


def _mirror_upper_(k: torch.Tensor) -> torch.Tensor:
    """k made symmetric in place from its upper triangle (one temporary of k's size)."""
    low = torch.triu(k, 1).t()
    return k.triu_().add_(low)


def gram(a: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor, blocks: int = SYM_BLOCKS,
         min_rows: int = MIN_STRIP_ROWS, levels: int = 1) -> torch.Tensor:
    """out (N, M) += a @ b^T (b None: a @ a^T, computed on and above the diagonal only).

    The symmetric form uses `blocks` row strips (fewer when strips would be under `min_rows` rows),
    and splits each strip's diagonal block again `levels` times (strips of at least min_rows / 2).
    """
    if b is not None:
        return out.addmm_(a, b.t())
    N = a.shape[0]
    upper = torch.zeros(N, N, dtype=out.dtype, device=out.device)
    _upper_strips(a, upper, 0, N, blocks, min_rows, levels)
    return add_symmetric_(out, upper)


def psg_applies(x1: torch.Tensor, x2: torch.Tensor | None, out: torch.Tensor,
                tile_dtype: torch.dtype | None) -> bool:
    """True when the per-sample gradient tiles are in the factors' dtype: all fp32 or all fp64, or
    fp32 factors and tiles with an fp64 out, or bf16/fp16 factors and tiles with an fp32/fp64 out
    (the mixed modes: `psg_gram` then takes a `gram`)."""
    tile = out.dtype if tile_dtype is None else tile_dtype
    return (out.dtype in (torch.float32, torch.float64) and x1.dtype == tile
            and (x2 is None or x2.dtype == tile)
            and (tile in (torch.float32, torch.float64, torch.bfloat16, torch.float16)))


def _psg_chunks(rows: int, d_in: int, d_out: int, buffer: int, rows_out: int):
    """(ob, db): d_out x d_in chunk of the per-sample gradients with rows * ob * db <= buffer (at
    least one row of 16 values): rows_out rows of d_out with all of d_in where that fits (else d_in
    is cut), or all of F at once when it fits (small problems: one GEMM and one Gram). Wider d_out
    chunks than 64 measured no faster, and at d=512 slower (128 rows: 0.83x)."""
    ob = d_out if rows * d_out * d_in <= buffer else min(d_out, rows_out)
    db = min(d_in, max(16, buffer // max(1, rows * ob)))
    if rows * ob * db > buffer:
        ob = max(1, min(ob, buffer // max(1, rows * db)))
    return ob, db


def _masked(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None):
    """(x, g) with the masked tokens of m (N, T) contributing nothing: x (N, T, d_in) gets zeros there
    (a copy, only when some token is masked); g (N, [C,] T, d_out) is copied the same way only when it
    holds a non-finite value somewhere (an inf or NaN in padding would survive 0 * g)."""
    if m is None or bool(m.all()):
        return x, g
    keep = m.bool()[:, :, None]
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype))
    if not bool(torch.isfinite(g).all()):
        keep_g = keep if g.dim() == 3 else keep[:, None]
        g = torch.where(keep_g, g, torch.zeros((), dtype=g.dtype))
    return x, g


@contextlib.contextmanager
def _sums_in_fp32(x: torch.Tensor):
    """While 16-bit per-sample gradients are built on a CUDA device: cuBLAS may otherwise reduce
    16-bit GEMMs partly in 16 bits (torch's allow_{bf16,fp16}_reduced_precision_reduction, on by
    default), and each F entry is to be summed over tokens in fp32 and rounded once. The flag is
    process-wide (as torch's own are): set for the batched GEMMs of one chunk, then restored with
    its split-K companion where this torch has one. (An fp32 GEMM result copied to 16 bits would
    cost two more passes over F.)"""
    name = {torch.bfloat16: "allow_bf16_reduced_precision_reduction",
            torch.float16: "allow_fp16_reduced_precision_reduction"}.get(x.dtype)
    if x.device.type != "cuda" or name is None:
        yield
        return
    flags = torch.backends.cuda.matmul
    before = getattr(flags, name)
    split_k = getattr(flags, name + "_split_k", None)  # torch >= 2.12: (reduced precision, split-K)
    setattr(flags, name, False if split_k is None else (False, split_k))
    try:
        yield
    finally:
        setattr(flags, name, before if split_k is None else (before, split_k))


def cuda_gram_fp32(a: torch.Tensor, b: torch.Tensor | None, k: torch.Tensor) -> None:
    """k (fp32) += a @ b^T (b None: a @ a^T, made exactly symmetric) by cuBLAS with fp32 accumulation
    and an fp32 result (torch.mm's out_dtype), for 16-bit chunks of F on a CUDA device: the `gram` of
    `psg_gram` there. A candidate beside the Triton psg_gram, timed by the harness on a GPU."""
    c = torch.mm(a, (a if b is None else b).t(), out_dtype=torch.float32)
    if b is None:
        add_symmetric_(k, c)
    else:
        k += c


def gram_fp64_copies(a: torch.Tensor, b: torch.Tensor | None, k: torch.Tensor) -> None:
    """k (fp64) += a @ b^T (b None: a @ a^T, right on and above the diagonal at least: for
    gram_upper=True) by torch's fp64 GEMM (cuBLAS DGEMM on a GPU) on fp64 copies of 16-bit chunks of
    F: products exact, sums in fp64. The fp64 `gram` of psg_gram's cuBLAS route, whose Triton gram
    into fp64 runs on CUDA cores."""
    a64 = a.double()
    k.addmm_(a64, (a64 if b is None else b.double()).t())


def _outputs_first(g: torch.Tensor) -> torch.Tensor:
    """g (N, T, d) or (N, C, T, d) as (C, N, T, d) (a view)."""
    return g.unsqueeze(0) if g.dim() == 3 else g.transpose(0, 1)


def _interleave(k: torch.Tensor, C1: int, C2: int) -> torch.Tensor:
    """Rows and columns of a Gram computed in (output, sample) order, put in (sample, output) order."""
    N, M = k.shape[0] // C1, k.shape[1] // C2
    return k.view(C1, N, C2, M).permute(1, 0, 3, 2).reshape(N * C1, M * C2)


def psg_gram(x1, g1, m1, x2, g2, m2, out, kernel: str = "sgd", gram=None, buffer: int = PSG_BUFFER,
             rows_out: int = PSG_ROWS_OUT, min_rows: int = PSG_MIN_STRIP_ROWS,
             few_rows_gram=None, gram_upper: bool = False) -> torch.Tensor:
    """out[i, j] += <s1(F1_i), s2(F2_j)>, F_i = g_i^T diag(m_i) x_i, in chunks of (ob, db) entries.

    For each chunk, F[:, o0:o1, d0:d1] of every sample is one batched GEMM per output (g's chunk
    transposed as a view, K = tokens; with g (N, C, T, d_out) the C outputs share x, and rows are
    built in (output, sample) order and interleaved at the end) into a buffer of at most `buffer`
    elements, signed in place for the sign kernels; its Gram (K = ob * db) is added to a scratch, in
    the symmetric form only on and above the diagonal by row strips (`_upper_strips`, strips of >=
    min_rows) and mirrored at the end. Masked tokens are zeroed in x (see `_masked`).
    Precision: F is built in the factors' dtype (16-bit F summed over tokens in fp32 by torch's GEMM
    and rounded once). With factors in out's dtype the Gram is torch's GEMM in that dtype; otherwise
    (fp32 tiles into an fp64 out, 16-bit tiles into fp32/fp64) each chunk's Gram goes to
    `gram(a, b, k)` (adds a @ b^T, b None: a @ a^T, exactly symmetric, into the scratch k in out's
    dtype: the native mixed-precision gram); gram_upper=True: its symmetric results need only be
    right on and above the diagonal (k is mirrored once at the end). `few_rows_gram`, called the
    same way, takes the symmetric chunk Grams of few rows (`few_rows`) in place of torch's GEMM
    (None: torch's).
    Memory: the buffer, a (N*C, M*C) scratch (and one more at the end for the interleave of C > 1
    outputs), and a copy of x when some token is masked.
    """
    one_dataset = x2 is None
    sym = one_dataset and kernel != "asymmetric-signgd"
    x1, g1 = _masked(x1, g1, m1)
    g1 = _outputs_first(g1)
    if not one_dataset:
        x2, g2 = _masked(x2, g2, m2)
        g2 = _outputs_first(g2)
    C1, N = g1.shape[:2]
    C2, M = (C1, N) if one_dataset else g2.shape[:2]
    R1, R2 = C1 * N, C2 * M  # rows of each side
    d_in, d_out = x1.shape[2], g1.shape[3]
    ob, db = _psg_chunks(R1 if sym else R1 + R2, d_in, d_out, buffer, rows_out)
    if gram is None and x1.dtype != out.dtype:
        raise ValueError(f"factors in {x1.dtype} with an out in {out.dtype} need a mixed-precision gram")
    k = torch.zeros(R1, R2, dtype=out.dtype, device=out.device)  # (output, sample) order
    # one choice per call (by the full chunk's size): k then holds either whole symmetric Grams or
    # only valid upper triangles
    few = sym and gram is None and few_rows_gram is not None and few_rows(R1, ob * db)
    buf1 = torch.empty(R1 * ob * db, dtype=x1.dtype, device=x1.device)
    buf2 = None if sym else torch.empty(R2 * ob * db, dtype=x1.dtype, device=x1.device)
    for o0 in range(0, d_out, ob):
        o1 = min(d_out, o0 + ob)
        for d0 in range(0, d_in, db):
            d1 = min(d_in, d0 + db)
            size = (o1 - o0) * (d1 - d0)

            def chunk(x, g, buf):
                C, n = g.shape[:2]
                f = buf[:C * n * size].view(C, n, o1 - o0, d1 - d0)
                with _sums_in_fp32(x):
                    for c in range(C):
                        torch.bmm(g[c, :, :, o0:o1].transpose(1, 2), x[:, :, d0:d1], out=f[c])
                return f.view(C * n, size)

            f1 = chunk(x1, g1, buf1)
            if kernel == "signgd":
                torch.sign(f1, out=f1)
            if sym:
                if gram is not None:
                    gram(f1, None, k)
                elif few:
                    few_rows_gram(f1, None, k)
                else:
                    _upper_strips(f1, k, 0, R1, SYM_BLOCKS, min_rows, 0)
                continue
            if one_dataset:  # asymmetric-signgd of one dataset: <F_i, sign F_j>
                f2 = torch.sign(f1, out=buf2[:f1.numel()].view_as(f1))
            else:
                f2 = chunk(x2, g2, buf2)
                if kernel != "sgd":
                    torch.sign(f2, out=f2)
            if gram is None:
                k.addmm_(f1, f2.t())
            else:
                gram(f1, f2, k)
    upper_only = sym and (gram_upper if gram is not None else not few)  # k right on and above its diagonal
    if C1 == C2 == 1:
        return add_symmetric_(out, k) if upper_only else out.add_(k)
    if upper_only:
        _mirror_upper_(k)
    out += _interleave(k, C1, C2)
    return out
