"""Pure-torch implementations of the kernel ops.

They are the fallback on any device, the oracle of the tests and the baseline of the benchmarks.
Inputs are upcast to the output's dtype (fp32 or fp64) before any arithmetic, so low-precision inputs
lose nothing beyond their own rounding. Work is chunked so that memory stays bounded by
`_CHUNK_ELEMENTS` temporaries, whatever N, T or d are. Each function adds into `out`.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 24  # largest temporary, in elements


def _masked(x: torch.Tensor, m: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype with its masked tokens zeroed (selected, not multiplied by 0: an inf or NaN in
    padding contributes nothing, as in every other backend)."""
    x = x.to(dtype)
    if m is None:
        return x
    return torch.where(m.bool().unsqueeze(-1), x, torch.zeros((), dtype=dtype, device=x.device))


def gram(a, b, out):
    """out (N, M) += a (N, P) @ b (M, P)^T, streamed over P."""
    acc = out.dtype
    b = a if b is None else b
    P = a.shape[1]
    step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[0] + b.shape[0]))
    for p0 in range(0, P, step):
        out += a[:, p0:p0 + step].to(acc) @ b[:, p0:p0 + step].to(acc).T
    return out


def per_sample_grads(x, g, m, dtype, o_slice=slice(None)):
    """F_i = sum_t m[i,t] g[i,t,o_slice]^T x[i,t,:]: (N, |o_slice|, d_in) in `dtype`. 16-bit F is
    summed over tokens in fp32 and rounded once to `dtype`."""
    work = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    return torch.einsum("nto,ntd->nod", _masked(g[:, :, o_slice], m, work), _masked(x, m, work)).to(dtype)


def _signed(f, kernel, second):
    if kernel == "signgd" or (kernel == "asymmetric-signgd" and second):
        return torch.sign(f)
    return f


def psg_gram(x1, g1, m1, x2, g2, m2, out, kernel="sgd", tile_dtype=None):
    """out[i, j] += <s1(F1_i), s2(F2_j)> with per-sample gradients built d_out-chunk by chunk
    (in `tile_dtype` when given, then the Gram in out's dtype)."""
    acc = out.dtype
    tile = acc if tile_dtype is None else tile_dtype
    if x2 is None:
        x2, g2, m2 = x1, g1, m1
    N, M, d_in, d_out = x1.shape[0], x2.shape[0], x1.shape[2], g1.shape[2]
    step = max(1, _CHUNK_ELEMENTS // max(1, (N + M) * d_in))
    for o0 in range(0, d_out, step):
        sl = slice(o0, o0 + step)
        f1 = _signed(per_sample_grads(x1, g1, m1, tile, sl), kernel, False).flatten(1).to(acc)
        f2 = _signed(per_sample_grads(x2, g2, m2, tile, sl), kernel, True).flatten(1).to(acc)
        out += f1 @ f2.T
    return out


def ghost_gram(x1, g1, m1, x2, g2, m2, out):
    """out[i, j] += sum_{t,s} (x1_it . x2_js)(g1_it . g2_js), the sgd kernel of a linear layer.

    Chooses the cheaper exact route: materializing per-sample gradients (cost ~ N*T*d_in*d_out) or
    the factored T x S products in sample chunks (cost ~ N*M*T*S*(d_in + d_out)).
    """
    N, T, d_in = x1.shape
    d_out = g1.shape[2]
    M, S = (N, T) if x2 is None else x2.shape[:2]
    materialize = (N + M) * T * d_in * d_out + N * M * d_in * d_out
    factored = N * M * T * S * (d_in + d_out)
    if materialize <= factored:
        return psg_gram(x1, g1, m1, x2, g2, m2, out, "sgd")
    acc = out.dtype
    if x2 is None:
        x2, g2, m2 = x1, g1, m1
    x1m, g1 = _masked(x1, m1, acc), _masked(g1, m1, acc)
    x2m, g2 = _masked(x2, m2, acc), _masked(g2, m2, acc)
    per_pair = max(1, T * S)
    rows = max(1, int((_CHUNK_ELEMENTS // per_pair) ** 0.5))
    for i0 in range(0, N, rows):
        for j0 in range(0, M, rows):
            xx = torch.einsum("itd,jsd->ijts", x1m[i0:i0 + rows], x2m[j0:j0 + rows])
            gg = torch.einsum("itd,jsd->ijts", g1[i0:i0 + rows], g2[j0:j0 + rows])
            out[i0:i0 + rows, j0:j0 + rows] += (xx * gg).sum(dim=(2, 3))
    return out
