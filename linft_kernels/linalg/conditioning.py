"""Extreme eigenvalues and conditioning of a PSD kernel, with honest resolution limits.

``conditioning(A)`` returns ``lambda_max``, ``lambda_min``, ``kappa = lambda_max / lambda_min`` and the
ridge condition ``(lambda_max + lam) / (lambda_min + lam)``.

* ``lambda_max``: top pair by block Lanczos (:func:`.lanczos.eigsh`).
* ``lambda_min``: bottom pair of the same kind of Krylov space (equivalently the top of the flipped
  operator ``sigma I - A``), or fp64 ``eigvalsh`` for explicit matrices with ``method="dense"``
  (the default for explicit matrices up to ``N = 2048``).
* **Resolution.** Rounding in a product with ``A`` perturbs eigenvalues by about
  ``resolution = 4 sqrt(N) eps ||A||`` (``eps`` of ``A``'s dtype; see
  :func:`.operators.accuracy_floor`). When ``lambda_min`` is below it, no method in that arithmetic can
  tell it from zero: the result says ``resolved=False``, ``lambda_min=None``,
  ``condition_number=None``, and gives the bound ``lambda_min <= resolution`` and
  ``condition_number >= lambda_max / resolution`` instead of a made-up number.
* When the bottom pair does not converge within ``max_passes`` (spectra that pile up near zero converge
  slowly at the bottom), ``lambda_min_converged=False`` and only the bound ``lambda_min <= theta_min``
  (a Rayleigh quotient, always valid) is reported.

For asymmetric or rectangular kernels use ``kind="svd"``: the same quantities for singular values
(normal equations, so the resolution is ``sqrt(4 sqrt(N) eps) * sigma_max``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch

from .lanczos import EigResult, check_symmetric, eigsh
from .operators import accuracy_floor, as_operator
from .svd import svds

__all__ = ["Conditioning", "conditioning", "condition_number", "ridge_condition", "lambda_max",
           "lambda_min"]


@dataclass
class Conditioning:
    """Extreme eigenvalues (or singular values) and condition numbers of a kernel.

    Attributes:
        lambda_max: largest eigenvalue (singular value for ``kind="singular values"``).
        lambda_min: smallest, or ``None`` when unresolved or not converged.
        resolved: ``lambda_min`` is above ``resolution`` (and converged).
        resolution: what the arithmetic can resolve, ``4 sqrt(N) eps lambda_max`` (eigenvalues) or its
            square root times ``sigma_max`` (singular values by normal equations).
        lambda_min_upper: a proven upper bound on ``lambda_min`` (the smallest Ritz value found).
        lambda_min_converged: the bottom pair met the tolerance (or the accuracy floor).
        condition_number: ``lambda_max / lambda_min`` when resolved, else ``None``.
        condition_lower_bound: a proven lower bound on the condition number (``inf`` when
            ``lambda_min_upper <= 0``).
        psd: no eigenvalue is negative beyond the resolution.
        products: operator columns applied in total. method: how each end was computed.
    """

    lambda_max: float
    lambda_min: Optional[float]
    resolved: bool
    resolution: float
    lambda_min_upper: float
    lambda_min_converged: bool
    condition_number: Optional[float]
    condition_lower_bound: float
    psd: bool
    kind: str = "eigenvalues"
    n: int = 0
    dtype: torch.dtype = torch.float64
    products: int = 0
    method: str = ""
    residual_max: float = 0.0
    residual_min: float = 0.0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def ridge_condition_bounds(self, lam: float) -> Tuple[float, float]:
        """Proven interval for ``(lambda_max + lam) / (lambda_min + lam)``."""
        lam = _check_lam(lam)
        top = self.lambda_max + lam
        if self.resolved and self.lambda_min is not None:
            v = top / (self.lambda_min + lam)
            return v, v
        # unresolved or not converged: 0 <= lambda_min <= lambda_min_upper (PSD)
        upper = self.lambda_min_upper
        lo = top / (upper + lam) if upper + lam > 0 else math.inf
        hi = top / lam if lam > 0 else math.inf
        return lo, hi

    def ridge_condition(self, lam: float) -> float:
        """``(lambda_max + lam) / (lambda_min + lam)``.

        When ``lambda_min`` is resolved this is exact (to the eigenvalue accuracy). When it is not, the
        value is returned only if ``lam`` dominates the uncertainty (the bounds of
        :meth:`ridge_condition_bounds` agree to 0.1 %), else ``nan``.
        """
        lo, hi = self.ridge_condition_bounds(lam)
        if lo == hi:
            return lo
        if math.isfinite(hi) and hi <= lo * (1 + 1e-3):
            return 0.5 * (lo + hi)
        return math.nan

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        if self.lambda_min is not None:
            lm = f"{self.lambda_min:.6g}"
        elif self.lambda_min_upper <= self.resolution:
            lm = f"unresolved (<= {self.lambda_min_upper:.3g})"
        else:
            lm = f"not converged (<= {self.lambda_min_upper:.6g})"

        kc = (f"{self.condition_number:.6g}" if self.condition_number is not None
              else f">= {self.condition_lower_bound:.3g}")
        return (f"Conditioning(kind={self.kind!r}, lambda_max={self.lambda_max:.6g}, lambda_min={lm}, "
                f"kappa={kc}, resolution={self.resolution:.3g}, products={self.products})")


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"ridge lam must be a finite non-negative number, got {lam}")
    return lam


def conditioning(A: Any, *, kind: str = "eig", method: str = "auto", tol: Optional[float] = None,
                 max_passes: Optional[int] = None, block_size: Optional[int] = None, seed: int = 0,
                 resolution_factor: Optional[float] = None) -> Conditioning:
    """Extreme eigenvalues and condition numbers of a symmetric PSD kernel (``kind="eig"``) or the
    extreme singular values of any matrix (``kind="svd"``).

    Args:
        A: matrix (torch/numpy), object with ``.matrix``, or operator with ``.shape`` and ``@``.
        method: ``"lanczos"`` (both ends by block Lanczos), ``"dense"`` (fp64 ``eigvalsh``/``svdvals``,
            explicit matrices), ``"auto"`` (dense for explicit matrices with ``N <= 2048``).
        tol: relative residual tolerance of each end (default of :func:`.lanczos.eigsh`).
        max_passes: block applications allowed for each end (default 200 for the top, 1000 for the
            bottom, which also gets a larger basis of up to 160 columns before restarting).
        resolution_factor: ``resolution = factor * eps * lambda_max``, default ``4 sqrt(N)``.
    """
    t0 = time.perf_counter()
    if kind not in ("eig", "svd"):
        raise ValueError(f"kind must be 'eig' or 'svd', got {kind!r}")
    if method not in ("auto", "lanczos", "dense"):
        raise ValueError(f"method must be 'auto', 'lanczos' or 'dense', got {method!r}")
    op = as_operator(A, square=(kind == "eig"))
    m, n = op.shape
    nn = max(m, n)
    if method == "auto":
        method = "dense" if op.explicit is not None and nn <= 2048 else "lanczos"
    if method == "dense" and op.explicit is None:
        raise ValueError("method='dense' needs an explicit matrix, got an operator")
    dtype = op.dtype
    products = 0
    info: dict = {}

    if kind == "eig":
        if op.explicit is not None:
            check_symmetric(op.explicit, op.name)
        if method == "dense":
            a64 = op.explicit.to(torch.float64)
            ev = torch.linalg.eigvalsh(0.5 * (a64 + a64.mT)).to("cpu")
            lmax, theta_min = float(ev[-1]), float(ev[0])
            conv_min, rmax, rmin = True, 0.0, 0.0
            label = "dense-eigvalsh"
        else:
            top = eigsh(op, 1, which="largest", tol=tol, block_size=block_size, seed=seed,
                        max_passes=max_passes if max_passes is not None else 200)
            bot = eigsh(op, 1, which="smallest", tol=tol, block_size=block_size, seed=seed + 1,
                        max_passes=max_passes if max_passes is not None else 1000,
                        max_basis=min(n, 160))
            products = top.products + bot.products
            lmax, rmax = float(top.eigenvalues[0]), float(top.residuals[0])
            theta_min, rmin = float(bot.eigenvalues[-1]), float(bot.residuals[-1])
            conv_min = bool(bot.converged[-1])
            label = "block-lanczos (top) + block-lanczos bottom (flipped)"
            info.update(top_converged=bool(top.converged[0]), top_passes=top.passes,
                        bottom_passes=bot.passes)
        scale = lmax
        resolution = accuracy_floor(n, dtype, abs(scale), resolution_factor)
        kind_label = "eigenvalues"
    else:
        if method == "dense":
            a64 = op.explicit.to(torch.float64)
            sv = torch.linalg.svdvals(a64).to("cpu")
            lmax, theta_min = float(sv[0]), float(sv[-1])
            conv_min, rmax, rmin = True, 0.0, 0.0
            label = "dense-svdvals"
            resolution = accuracy_floor(nn, dtype, lmax, resolution_factor)
        else:
            top = svds(op, 1, which="largest", tol=tol, block_size=block_size, seed=seed,
                       max_passes=max_passes if max_passes is not None else 200)
            bot = svds(op, 1, which="smallest", tol=tol, block_size=block_size, seed=seed + 1,
                       max_passes=max_passes if max_passes is not None else 1000,
                       max_basis=min(min(m, n), 160))
            products = top.products + bot.products
            lmax, rmax = float(top.eigenvalues[0]), float(top.residuals[0])
            theta_min, rmin = float(bot.eigenvalues[-1]), float(bot.residuals[-1])
            conv_min = bool(bot.converged[-1])
            label = "lanczos-normal-equations (both ends)"
            # normal equations square the spread: sigma is resolvable down to sqrt(floor) * sigma_max
            resolution = math.sqrt(accuracy_floor(nn, dtype, 1.0, resolution_factor)) * lmax
            if m < n or n < m:
                info["note"] = ("rectangular: sigma_min is the smallest of the min(m, n) singular "
                                "values")
        kind_label = "singular values"

    psd = theta_min >= -resolution if kind == "eig" else True
    resolved = bool(conv_min and theta_min > resolution)
    lam_min = theta_min if resolved else None
    kappa = (lmax / theta_min) if resolved else None
    if theta_min <= resolution:
        bound_min = resolution if psd else theta_min
        kappa_lb = lmax / resolution if resolution > 0 else math.inf
    else:
        bound_min = theta_min
        kappa_lb = lmax / theta_min
    if not psd:
        kappa_lb = math.inf
        info["note"] = (f"not PSD: an eigenvalue {theta_min:.3g} lies below -resolution "
                        f"({-resolution:.3g}); the condition number lambda_max/lambda_min is undefined")
    return Conditioning(lambda_max=lmax, lambda_min=lam_min, resolved=resolved, resolution=resolution,
                        lambda_min_upper=bound_min if theta_min <= resolution else theta_min,
                        lambda_min_converged=conv_min, condition_number=kappa,
                        condition_lower_bound=kappa_lb, psd=psd, kind=kind_label, n=n, dtype=dtype,
                        products=products, method=label, residual_max=rmax, residual_min=rmin,
                        seconds=time.perf_counter() - t0, info=info)


def condition_number(A: Any, **kwargs) -> Optional[float]:
    """``lambda_max / lambda_min`` or ``None`` when ``lambda_min`` is not resolvable (see
    :func:`conditioning` for the bound and the reasons)."""
    return conditioning(A, **kwargs).condition_number


def ridge_condition(A: Any, lam: float, **kwargs) -> float:
    """``(lambda_max + lam) / (lambda_min + lam)``; ``nan`` when ``lambda_min`` is unresolved and
    ``lam`` does not dominate the resolution (see :meth:`Conditioning.ridge_condition`)."""
    return conditioning(A, **kwargs).ridge_condition(lam)


def lambda_max(A: Any, **kwargs) -> EigResult:
    """Top eigenpair (``eigsh(A, 1)``)."""
    return eigsh(A, 1, which="largest", **kwargs)


def lambda_min(A: Any, **kwargs) -> EigResult:
    """Bottom eigenpair (``eigsh(A, 1, which="smallest")``)."""
    return eigsh(A, 1, which="smallest", **kwargs)
