"""Cheap exact quantities of an explicit kernel matrix: trace, diagonal, Frobenius norm, effective rank.

For an NTK ``K = J J^T`` the diagonal is the squared per-sample gradient norms and the trace their sum.
All results are float64. Operators are accepted where the quantity can still be had exactly (an operator
exposing ``.diagonal()`` / ``.trace()``) or estimated on request (``estimate=True``, Hutchinson with
Rademacher probes as one block).

Effective rank, two definitions (``kind``):

* ``"participation"`` (default): ``(tr K)^2 / ||K||_F^2 = (sum lambda)^2 / sum lambda^2``, the
  participation ratio of the spectrum. Exact and O(N^2) for explicit matrices; between 1 and rank(K).
* ``"entropy"``: ``exp(H(p))`` with ``p_i = lambda_i / sum_j lambda_j`` over the positive eigenvalues
  (Roy & Vetterli, 2007). Exact by fp64 ``eigvalsh`` (O(N^3)) for explicit matrices
  (``method="exact"``), or estimated by stochastic Lanczos quadrature (``method="slq"``, the default
  for operators and for explicit matrices with N > 4096). Also between 1 and rank(K).

The participation ratio is ``1 / sum p_i^2 = exp(H_2(p))`` (Renyi entropy of order 2), so
``participation <= entropy`` always, with equality exactly when the positive eigenvalues are equal.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .operators import as_operator

__all__ = ["trace", "diagonal", "frobenius_norm", "effective_rank"]


def diagonal(A: Any) -> torch.Tensor:
    """Exact diagonal (float64, on ``A``'s device) of an explicit square matrix, or of an operator that
    exposes ``.diagonal()``."""
    op = as_operator(A)
    op.require_square()
    if op.explicit is not None:
        return op.explicit.diagonal().to(torch.float64)
    fn = getattr(op._obj, "diagonal", None)
    if callable(fn):
        return torch.as_tensor(fn()).to(torch.float64)
    raise TypeError("the diagonal of an operator needs the operator to expose .diagonal(); "
                    "give the explicit matrix")


def trace(A: Any, *, estimate: bool = False, probes: int = 64, seed: int = 0) -> float:
    """Exact trace (float64) of an explicit matrix or of an operator exposing ``.trace()`` or
    ``.diagonal()``; for other operators, a Hutchinson estimate when ``estimate=True``."""
    op = as_operator(A)
    n = op.require_square()
    if op.explicit is not None:
        return float(op.explicit.diagonal().to(torch.float64).sum())
    for name in ("trace", "diagonal"):
        fn = getattr(op._obj, name, None)
        if callable(fn):
            val = fn()
            return float(torch.as_tensor(val).to(torch.float64).sum())
    if not estimate:
        raise TypeError("the exact trace of an operator needs .trace() or .diagonal(); "
                        "pass estimate=True for a Hutchinson estimate")
    gen = torch.Generator().manual_seed(int(seed))
    z = (torch.randint(0, 2, (n, int(probes)), generator=gen) * 2 - 1).to(torch.float64)
    z = z.to(device=op.device, dtype=op.work_dtype)
    az = op.matmat(z)
    return float((z.to(torch.float64) * az.to(torch.float64)).sum() / probes)


def frobenius_norm(A: Any) -> float:
    """``||A||_F`` (float64) of an explicit matrix."""
    op = as_operator(A, square=False)
    if op.explicit is None:
        raise TypeError("the Frobenius norm needs an explicit matrix")
    return float(torch.linalg.matrix_norm(op.explicit.to(torch.float64), ord="fro"))


def effective_rank(A: Any, *, kind: str = "participation", method: str = "auto", probes: int = 32,
                   steps: int = 64, seed: int = 0) -> float:
    """Effective rank of a symmetric PSD kernel (see module docstring for the two definitions).

    Args:
        kind: ``"participation"`` = ``(tr K)^2 / ||K||_F^2``; ``"entropy"`` = ``exp(-sum p log p)``.
        method: ``"exact"`` (explicit matrices), ``"slq"`` (estimate; operators too) or ``"auto"``.
    """
    if kind not in ("participation", "entropy"):
        raise ValueError(f"kind must be 'participation' or 'entropy', got {kind!r}")
    if method not in ("auto", "exact", "slq"):
        raise ValueError(f"method must be 'auto', 'exact' or 'slq', got {method!r}")
    op = as_operator(A)
    n = op.require_square()
    if method == "auto":
        if op.explicit is None:
            method = "slq"
        elif kind == "participation":
            method = "exact"
        else:
            method = "exact" if n <= 4096 else "slq"
    if method == "exact":
        if op.explicit is None:
            raise ValueError("method='exact' needs an explicit matrix; use method='slq' for operators")
        a64 = op.explicit.to(torch.float64)
        if kind == "participation":
            tr = float(a64.diagonal().sum())
            fro2 = float((a64 * a64).sum())
            return tr * tr / fro2 if fro2 > 0 else 0.0
        ev = torch.linalg.eigvalsh(0.5 * (a64 + a64.mT))
        ev = torch.clamp(ev, min=0.0)
        s = float(ev.sum())
        if s <= 0:
            return 0.0
        p = ev[ev > 0] / s
        return math.exp(float(-(p * torch.log(p)).sum()))
    from .density import slq

    dens = slq(op, probes=probes, steps=steps, seed=seed)
    if kind == "participation":
        return dens.participation_ratio()
    return dens.entropy_effective_rank()
