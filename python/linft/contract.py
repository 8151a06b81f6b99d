"""Contraction of one block's stored forms (capture.Store) into its kernel matrix (N*C, M*C), row
index i*C + a. The heavy work goes to `linft_kernels` (gram, ghost_gram, psg_gram)."""
from __future__ import annotations

import torch

import linft_kernels as lk
from linft_kernels.ops import per_output_rows

from .blocks import Block
from .planner import linear_costs

_CHUNK = 1 << 24  # elements of the largest temporary in the embedding contraction


def _features(s: dict, C: int) -> torch.Tensor:
    f = s["features"]
    return f.reshape(f.shape[0] * C, -1) if f.dim() == 3 else f


def contract_block(block: Block, s1: dict, s2: dict | None, kernel: str, out: torch.Tensor,
                   C: int, backend=None, auto: bool = True) -> str:
    """out += K_block. s2 None means the second dataset is the first (symmetric unless asymmetric).
    Returns the method used: the planned one, except that with auto=True a linear block of the sgd
    kernel takes ghost or materialize (psg) by the cost model at the token counts actually stored,
    which can be far below the planned ones when only a few tokens carry gradient."""
    method = block.method
    if not s1 or (s2 is not None and not s2):
        return method  # the module never ran on these inputs: its parameter has zero gradient
    if method in ("features", "generic"):
        a = _features(s1, C)
        b = None if s2 is None else _features(s2, C)
        if kernel == "sgd":
            lk.gram(a, b, out=out, backend=backend)
        elif kernel == "signgd":
            lk.gram(torch.sign(a), None if b is None else torch.sign(b), out=out, backend=backend)
        else:
            lk.gram(a, torch.sign(a if b is None else b), out=out, backend=backend)
        return method
    if method in ("ghost", "psg"):
        if auto and kernel == "sgd":
            T = s1["mask"].shape[1]
            S = T if s2 is None else s2["mask"].shape[1]
            NC = s1["mask"].shape[0] * C
            MC = NC if s2 is None else s2["mask"].shape[0] * C
            ghost, mat = linear_costs(NC, MC, T, S, s1["x"].shape[-1], s1["g"].shape[-1])
            method = "ghost" if ghost < mat else "psg"

        if method == "ghost":
            # rows i*C + a: x and mask repeated per output (a copy when C > 1); g is stored that way
            x1, g1, m1 = per_output_rows(s1["x"], s1["g"], s1["mask"])
            x2, g2, m2 = (None, None, None) if s2 is None else per_output_rows(s2["x"], s2["g"], s2["mask"])
            lk.ghost_gram(x1, g1, x2, g2, mask1=m1, mask2=m2, out=out, backend=backend)
        else:
            # g (N, C, T, d_out) per output beside one x per sample: the op gives rows i*C + a without
            # a copy of x per output. Per-sample gradients are built in the model's dtype (as its own
            # weight gradients would be: 16-bit ones summed in fp32 and rounded once) and only their
            # Gram is accumulated in out's dtype.
            tiles = _tile_dtype(s1["x"].dtype, out.dtype)
            lk.psg_gram(s1["x"], s1["g"], None if s2 is None else s2["x"], None if s2 is None else s2["g"],
                        kernel=kernel, mask1=s1["mask"], mask2=None if s2 is None else s2["mask"], out=out,
                        backend=backend, tile_dtype=tiles)
        return method
    if method == "embedding":
        _embedding(s1, s2, kernel, out, C, backend)
        return method
    raise AssertionError(method)


def _tile_dtype(factors: torch.dtype, out: torch.dtype) -> torch.dtype | None:
    """psg_gram's tile_dtype for a model in `factors` dtype and an NTK in `out` dtype: the model's."""
    if factors in (torch.bfloat16, torch.float16):
        return factors
    return torch.float32 if factors == torch.float32 and out == torch.float64 else None


def _embedding(s1, s2, kernel, out, C, backend):
    """Embedding block: per-sample gradient rows are sums of g_t over tokens with the same id.
    sgd: sum_{t,s} [id_t == id_s] g_t . g_s in chunks; sign kernels: gradients on the union vocabulary."""
    acc = out.dtype

    def rows(s):
        N, T = s["mask"].shape
        g = (s["g"] * s["mask"][:, None, :, None]).to(acc).reshape(N * C, T, -1)
        ids = torch.where(s["mask"], s["ids"], -1).repeat_interleave(C, dim=0)  # (N*C, T), small
        return ids, g

    ids1, g1 = rows(s1)
    ids2, g2 = (ids1, g1) if s2 is None else rows(s2)
    if kernel != "sgd":
        vocab = torch.unique(torch.cat([ids1[ids1 >= 0], ids2[ids2 >= 0]]))

        def feats(ids, g):
            U, d = vocab.numel(), g.shape[-1]
            F = torch.zeros(ids.shape[0] * U, d, dtype=acc, device=g.device)
            valid = ids >= 0
            row = torch.arange(ids.shape[0], device=g.device)[:, None].expand_as(ids)
            flat = row[valid] * U + torch.searchsorted(vocab, ids[valid])
            F.index_add_(0, flat, g[valid])
            return F.reshape(ids.shape[0], U * d)

        a = feats(ids1, g1)
        b = a if s2 is None else feats(ids2, g2)
        sa = torch.sign(a)
        sb = torch.sign(b)
        if kernel == "signgd":
            return lk.gram(sa, None if s2 is None else sb, out=out, backend=backend)
        return lk.gram(a, sb, out=out, backend=backend)
    T, S = ids1.shape[1], ids2.shape[1]
    rows_per = max(1, int((_CHUNK // max(1, T * S)) ** 0.5))
    for i0 in range(0, ids1.shape[0], rows_per):
        i1 = i0 + rows_per
        for j0 in range(0, ids2.shape[0], rows_per):
            j1 = j0 + rows_per
            eq = (ids1[i0:i1, None, :, None] == ids2[None, j0:j1, None, :]) & (ids1[i0:i1, None, :, None] >= 0)
            gg = torch.einsum("itd,jsd->ijts", g1[i0:i1], g2[j0:j1])
            out[i0:i1, j0:j1] += (gg * eq).sum(dim=(2, 3))
    return out
