"""User-facing spectra of NTKs: ``linft.spectrum(A, k)`` and friends.

``A`` may be a torch tensor, a numpy array, an :class:`linft.NTK` (or anything with ``.matrix``), or any
operator with ``.shape`` and ``@`` on ``(N, b)`` blocks (such as ``linft.ntk_operator(...)``). The work
is done by :mod:`linft_kernels.linalg` (thick-restart randomized block Lanczos with full
reorthogonalization, fp64 Rayleigh-Ritz and certified residuals); see its docstrings for the algorithm
and the exact meaning of every field.

Asymmetric kernels (``kernel="asymmetric-signgd"``, cross-kernels ``K(X, X')``, any non-square or
non-symmetric matrix) have no real orthogonal eigendecomposition: by default their *singular values*
are returned, and ``result.kind == "singular values"`` says so; ``asymmetric="symmetric"`` gives the
eigenvalues of the symmetric part ``(A + A^T)/2`` instead (``kind`` says that too), and
``asymmetric="error"`` refuses.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from linft_kernels.linalg import (Conditioning, EigResult, SpectralDensity, as_operator,
                                  check_symmetric, conditioning as _conditioning, eigsh, slq, svds)
from linft_kernels.linalg import diagonal as _diagonal
from linft_kernels.linalg import effective_rank as _effective_rank
from linft_kernels.linalg import trace as _trace

__all__ = [
    "Spectrum", "spectrum", "singular_values", "conditioning", "condition_number", "ridge_condition",
    "spectral_density", "effective_rank", "trace", "diagonal",
]

#: The result of :func:`spectrum`: ``.eigenvalues`` (descending), ``.eigenvectors`` (N, k),
#: ``.residuals`` (certified ``||A v - theta v||``), ``.converged``, ``.products`` (columns applied),
#: ``.passes``, ``.kind`` ("eigenvalues", "singular values" or "eigenvalues of the symmetric part"),
#: ``.method``, ``.left_vectors`` (singular values only), ``.to_dict()``.
Spectrum = EigResult


def _declared_asymmetric(A: Any) -> Optional[bool]:
    """True/False when the object says whether it is symmetric (an NTK does), else None."""
    if isinstance(A, torch.Tensor):
        return None
    sym = getattr(A, "symmetric", None)
    if isinstance(sym, bool):
        return not sym
    meta = getattr(A, "meta", None)
    if isinstance(meta, dict):
        if meta.get("kernel") == "asymmetric-signgd":
            return True
        if isinstance(meta.get("symmetric"), bool):
            return not meta["symmetric"]
    kern = getattr(A, "kernel", None)
    if kern == "asymmetric-signgd":
        return True
    return None


class _SymmetricPart:
    """``x -> (A x + A^T x) / 2`` for a square operator with a transpose."""

    def __init__(self, op):
        self.op = op
        self.shape = op.shape
        self.dtype = op.work_dtype
        self.device = op.device

    def __matmul__(self, x):
        return 0.5 * (self.op.matmat(x) + self.op.rmatmat(x))


def spectrum(A: Any, k: int = 6, *, which: str = "largest", tol: Optional[float] = None,
             block_size: Optional[int] = None, max_passes: Optional[int] = None,
             max_basis: Optional[int] = None, seed: int = 0, method: str = "auto",
             asymmetric: str = "svd", certify="auto") -> Spectrum:
    """Top-``k`` (``which="largest"``) or bottom-``k`` eigenpairs of a symmetric kernel.

    Args:
        A: tensor / numpy array / NTK (``.matrix``) / operator with ``.shape`` and ``@``.
        k: number of pairs (``1 <= k <= N``).
        tol: relative residual tolerance (default 1e-8 for float64, 1e-5 otherwise).
        block_size, max_passes, max_basis, seed: Krylov options (see
            :func:`linft_kernels.linalg.eigsh`); ``max_passes`` bounds the block applications, i.e.
            passes over the data for a matrix-free NTK. Default block: ``min(k, 8)`` for an explicit
            kernel (an NTK, a tensor), ``1`` for a matrix-free operator (``linft.ntk_operator``),
            where every column is a backward and a forward pass over the data; either is widened
            automatically when a tight cluster fills it.
        method: ``"auto"`` (fp64 dense ``eigh`` for small explicit matrices, block Lanczos otherwise),
            ``"lanczos"`` or ``"dense"``.
        asymmetric: what to do with an asymmetric or rectangular kernel: ``"svd"`` (singular values),
            ``"symmetric"`` (eigenvalues of ``(A + A^T)/2``) or ``"error"``.
        certify: how the residuals ``||A v - theta v||`` are made true ones: ``"auto"`` (default)
            spends ``k`` extra products for an explicit kernel and none for an operator (it keeps the
            raw products ``A Q`` instead, ``certify="stored"``); ``True``/``"product"``, ``"stored"``,
            or ``False`` for Ritz estimates only. Singular values (asymmetric kernels) treat
            ``"auto"`` as ``True``.

    Returns:
        :data:`Spectrum` (an :class:`linft_kernels.linalg.EigResult`); ``eigenvalues`` descending.
    """
    if asymmetric not in ("svd", "symmetric", "error"):
        raise ValueError(f"asymmetric must be 'svd', 'symmetric' or 'error', got {asymmetric!r}")
    declared = _declared_asymmetric(A)
    op = as_operator(A, square=False)
    m, n = op.shape
    asym = bool(declared) or m != n
    if not asym and op.explicit is not None:
        try:
            check_symmetric(op.explicit, "A")
        except ValueError:
            asym = True
    kw = dict(which=which, tol=tol, block_size=block_size, max_passes=max_passes,
              max_basis=max_basis, seed=seed, certify=certify)
    if not asym:
        return eigsh(op, k, method=method, check_symmetry=False, **kw)
    if asymmetric == "error":
        why = f"shape {op.shape}" if m != n else "its entries are not symmetric"
        raise ValueError(f"the kernel is not symmetric ({why}); pass asymmetric='svd' for singular "
                         "values or asymmetric='symmetric' for eigenvalues of (A + A^T)/2")
    if asymmetric == "svd":
        smethod = {"auto": "auto", "lanczos": "normal", "dense": "dense"}.get(method, method)
        return svds(op, k, method=smethod, **kw)
    if m != n:
        raise ValueError(f"the symmetric part needs a square kernel, got shape {op.shape}")
    if op.explicit is not None:
        a = op.explicit
        res = eigsh(0.5 * (a + a.mT), k, method=method, **kw)
    else:
        res = eigsh(_SymmetricPart(op), k, method="lanczos", **kw)
        res.products, res.passes = op.products, op.passes
    res.kind = "eigenvalues of the symmetric part"
    return res


def singular_values(A: Any, k: int = 6, **kwargs) -> Spectrum:
    """Top-``k`` singular triplets (``kind="singular values"``; ``left_vectors`` holds ``U``)."""
    return svds(A, k, **kwargs)


def conditioning(A: Any, **kwargs) -> Conditioning:
    """``lambda_max``, ``lambda_min``, ``condition_number``, ``ridge_condition(lam)`` with an explicit
    ``resolved`` flag: below ``4 sqrt(N) eps lambda_max`` the smallest eigenvalue is reported as
    unresolvable (``lambda_min=None``) with bounds, never as a number. Asymmetric kernels use singular
    values (``kind="svd"``), chosen automatically for a declared-asymmetric NTK or a non-square matrix.
    """
    if "kind" not in kwargs:
        declared = _declared_asymmetric(A)
        op = as_operator(A, square=False)
        asym = bool(declared) or op.shape[0] != op.shape[1]
        if not asym and op.explicit is not None:
            try:
                check_symmetric(op.explicit, "A")
            except ValueError:
                asym = True
        kwargs["kind"] = "svd" if asym else "eig"
        A = op
    return _conditioning(A, **kwargs)


def condition_number(A: Any, **kwargs) -> Optional[float]:
    """``lambda_max / lambda_min``, or ``None`` when ``lambda_min`` cannot be resolved in the
    arithmetic used (see :func:`conditioning` for the bound)."""
    return conditioning(A, **kwargs).condition_number


def ridge_condition(A: Any, lam: float, **kwargs) -> float:
    """``(lambda_max + lam) / (lambda_min + lam)`` (``nan`` if unresolvable at this ``lam``)."""
    return conditioning(A, **kwargs).ridge_condition(lam)


def spectral_density(A: Any, *, probes: int = 16, steps: int = 64, seed: int = 0,
                     deflate: Any = None, **kwargs) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the eigenvalue distribution, optionally after
    deflating the top pairs (``deflate=k`` or a :data:`Spectrum`)."""
    return slq(A, probes=probes, steps=steps, seed=seed, deflate=deflate, **kwargs)


def effective_rank(A: Any, kind: str = "participation", **kwargs) -> float:
    """``"participation"``: ``(tr K)^2 / ||K||_F^2``; ``"entropy"``: ``exp`` of the Shannon entropy of
    ``lambda / tr K``. Exact for explicit matrices, SLQ estimates for operators."""
    return _effective_rank(A, kind=kind, **kwargs)


def trace(A: Any, **kwargs) -> float:
    """Exact trace (sum of squared per-sample gradient norms for an NTK)."""
    return _trace(A, **kwargs)


def diagonal(A: Any) -> torch.Tensor:
    """Exact diagonal (squared per-sample gradient norms for an NTK), float64."""
    return _diagonal(A)

