"""Top-k (or bottom-k) singular triplets of a rectangular or asymmetric matrix or operator.

Used for asymmetric kernels (``asymmetric-signgd``) and cross-kernels ``K(X, X')``. Two methods, both
on the machinery of :func:`.lanczos.eigsh`, and stated in ``EigResult.method``:

* ``"normal"`` (default): block Lanczos on the Gram operator of the smaller side, ``A^T A`` (``n <= m``)
  or ``A A^T``; each of its products costs one product with ``A`` and one with ``A^T``. Converges fast
  for the top singular values, but squares the condition number: singular values below about
  ``sqrt(4 sqrt(n) eps) * sigma_max`` are not resolved.
* ``"augmented"``: block Lanczos on ``[[0, A], [A^T, 0]]`` from start blocks ``[0; V]``, which is block
  Golub-Kahan bidiagonalization with full reorthogonalization; about twice the iterations of
  ``"normal"`` for the top values, but resolves small singular values to ``eps * sigma_max``.
* ``"dense"``: fp64 ``torch.linalg.svd`` of an explicit matrix (oracle).

Certification: with ``u = A v / ||A v||`` (normal) or the normalized halves of the augmented
eigenvector, one product ``A V`` and one ``A^T U`` give ``residuals = sqrt(||A v - s u||^2 +
||A^T u - s v||^2)``, with ``s = u^T A v``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from .lanczos import EigResult, default_tol, eigsh
from .operators import Operator, accuracy_floor, as_operator, check_k

__all__ = ["svds"]


class _Normal:
    """``x -> A^T (A x)`` (``side="right"``, n x n) or ``x -> A (A^T x)`` (m x m)."""

    def __init__(self, op: Operator, side: str):
        self.op = op
        self.side = side
        d = op.shape[1] if side == "right" else op.shape[0]
        self.shape = (d, d)
        self.dtype = op.work_dtype
        self.device = op.device

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "right":
            return self.op.rmatmat(self.op.matmat(x))
        return self.op.matmat(self.op.rmatmat(x))


class _Augmented:
    """``[x; y] -> [A y; A^T x]`` for ``x`` in R^m, ``y`` in R^n."""

    def __init__(self, op: Operator):
        self.op = op
        m, n = op.shape
        self.shape = (m + n, m + n)
        self.dtype = op.work_dtype
        self.device = op.device

    def __matmul__(self, z: torch.Tensor) -> torch.Tensor:
        m = self.op.shape[0]
        x, y = z[:m], z[m:]
        top = self.op.matmat(y) if bool(y.abs().max() > 0) else y.new_zeros((m, z.shape[1]))
        bot = self.op.rmatmat(x) if bool(x.abs().max() > 0) else x.new_zeros((y.shape[0], z.shape[1]))
        return torch.cat([top, bot], dim=0)


def svds(A: Any, k: int = 6, *, which: str = "largest", method: str = "normal",
         block_size: Optional[int] = None, tol: Optional[float] = None,
         max_passes: Optional[int] = None, max_basis: Optional[int] = None, seed: int = 0,
         certify: bool = True) -> EigResult:
    """Singular triplets ``A v = s u``, ``A^T u = s v`` of an ``(m, n)`` matrix or operator.

    ``A`` may be a torch tensor, a numpy array, an object with ``.matrix``, or an operator with
    ``.shape``, ``@`` and ``.T`` (its transpose, also supporting ``@``). ``k <= min(m, n)``.

    Returns an :class:`EigResult` with ``kind="singular values"``: ``eigenvalues`` holds the singular
    values (descending), ``eigenvectors`` the right vectors ``V`` (n, k), ``left_vectors`` the left
    vectors ``U`` (m, k); ``products`` counts columns applied with ``A`` and with ``A^T``.
    """
    t0 = time.perf_counter()
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if method not in ("normal", "augmented", "dense", "auto"):
        raise ValueError(f"method must be 'normal', 'augmented', 'dense' or 'auto', got {method!r}")
    op = as_operator(A, square=False)
    m, n = op.shape
    k = check_k(k, min(m, n))
    prod0, pass0 = op.products, op.passes
    if method == "auto":
        method = "dense" if op.explicit is not None and min(m, n) <= 256 else "normal"
    if tol is None:
        tol = default_tol(op.dtype)
    wd = op.work_dtype

    if method == "dense":
        if op.explicit is None:
            raise ValueError("method='dense' needs an explicit matrix, got an operator")
        a64 = op.explicit.to(torch.float64)
        uu, ss, vh = torch.linalg.svd(a64, full_matrices=False)
        idx = torch.arange(k) if which == "largest" else torch.arange(ss.numel() - k, ss.numel())
        idx = idx.to(ss.device)
        s, u, v = ss[idx], uu[:, idx], vh[idx].mT
        res = torch.sqrt(torch.linalg.vector_norm(a64 @ v - u * s, dim=0) ** 2
                         + torch.linalg.vector_norm(a64.mT @ u - v * s, dim=0) ** 2)
        floor = accuracy_floor(max(m, n), op.dtype, float(ss[0]))
        return EigResult(eigenvalues=s.to("cpu"), eigenvectors=v.to(wd), residuals=res.to("cpu"),
                         converged=torch.ones(k, dtype=torch.bool), products=0, passes=0,
                         method="dense-svd", which=which, kind="singular values", tol=0.0,
                         floor=floor, dtype=op.dtype, n=n, left_vectors=u.to(wd),
                         seconds=time.perf_counter() - t0)

    if method == "normal":
        side = "right" if n <= m else "left"
        gram = _Normal(op, side)
        r = eigsh(gram, k, which=which, block_size=block_size, tol=tol, max_passes=max_passes,
                  max_basis=max_basis, seed=seed, certify=False)
        w = r.eigenvectors  # right vectors (side=right) or left vectors (side=left)
        if side == "right":
            v = w
            av = op.matmat(v)
            s = torch.linalg.vector_norm(av.to(torch.float64), dim=0)
            u = av / torch.clamp(s, min=torch.finfo(torch.float64).tiny).to(av.dtype)
            atu = op.rmatmat(u) if certify else None
        else:
            u = w
            atu = op.rmatmat(u)
            s = torch.linalg.vector_norm(atu.to(torch.float64), dim=0)
            v = atu / torch.clamp(s, min=torch.finfo(torch.float64).tiny).to(atu.dtype)
            av = op.matmat(v) if certify else None
        label = f"lanczos-normal-equations ({'A^T A' if side == 'right' else 'A A^T'})"
        restarts, bsz, nmax = r.restarts, r.block_size, r.max_basis
    else:  # augmented: Golub-Kahan through [[0, A], [A^T, 0]]
        aug = _Augmented(op)
        gen = torch.Generator().manual_seed(int(seed))
        bsz = block_size
        from .lanczos import default_block_size

        b = int(bsz) if bsz is not None else default_block_size(k, m + n)
        v0 = torch.zeros(m + n, b, dtype=wd)
        v0[m:] = torch.randn(n, b, generator=gen, dtype=torch.float64).to(wd)
        if which == "largest":
            # tol/4: the halves of an augmented eigenvector carry about twice its residual
            r = eigsh(aug, k, which="largest", block_size=b, tol=tol / 4, max_passes=max_passes,
                      max_basis=max_basis, seed=seed, v0=v0.to(op.device), certify=False)
        else:
            raise ValueError("method='augmented' finds the largest singular values only (the bottom "
                             "of [[0, A], [A^T, 0]] is -sigma_max); use method='normal' for the smallest")
        z = r.eigenvectors
        u = z[:m]
        v = z[m:]
        u = u / torch.clamp(torch.linalg.vector_norm(u, dim=0), min=1e-300)
        v = v / torch.clamp(torch.linalg.vector_norm(v, dim=0), min=1e-300)
        av = op.matmat(v)
        atu = op.rmatmat(u) if certify else None
        s = (u.to(torch.float64) * av.to(torch.float64)).sum(0)
        label = "lanczos-augmented (block Golub-Kahan)"
        restarts, bsz, nmax = r.restarts, r.block_size, r.max_basis

    s_cpu = s.to("cpu")
    smax = float(s_cpu.abs().max()) if s_cpu.numel() else 0.0
    if certify:
        s_dev = s.to(device=av.device)
        r1 = torch.linalg.vector_norm(av.to(torch.float64) - u.to(torch.float64) * s_dev, dim=0)
        r2 = torch.linalg.vector_norm(atu.to(torch.float64) - v.to(torch.float64) * s_dev, dim=0)
        res = torch.sqrt(r1 ** 2 + r2 ** 2).to("cpu")
    else:
        # Ritz estimates: ||G w - s^2 w|| / s for the normal equations
        res = (r.residuals / torch.clamp(s_cpu, min=1e-300)) if method == "normal" else r.residuals
    order = torch.argsort(s_cpu, descending=True)
    s_cpu, res = s_cpu[order], res[order]
    dev_order = order.to(v.device)
    v, u = v[:, dev_order], u[:, dev_order]
    floor = accuracy_floor(max(m, n), op.dtype, smax)
    conv = res <= torch.clamp(tol * s_cpu.abs(), min=floor)
    return EigResult(eigenvalues=s_cpu, eigenvectors=v, residuals=res, converged=conv,
                     products=op.products - prod0, passes=op.passes - pass0, restarts=restarts,
                     method=label,
                     which=which, kind="singular values", tol=float(tol), floor=floor,
                     block_size=int(bsz) if bsz is not None else 0, max_basis=int(nmax),
                     certified=certify, dtype=op.dtype, n=n, left_vectors=u,
                     seconds=time.perf_counter() - t0,
                     info={"resolution": (math.sqrt(accuracy_floor(max(m, n), op.dtype, 1.0)) * smax
                                          if method == "normal" else floor)})
