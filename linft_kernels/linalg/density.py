"""Spectral density by stochastic Lanczos quadrature (SLQ), optionally after deflating top pairs.

``slq(A, probes=16, steps=64)`` runs ``probes`` independent Lanczos recurrences, one per Rademacher
probe ``z`` (``||z||^2 = N``), **as one block**: every step is a single ``A @ V`` on all probes. Each
recurrence is fully reorthogonalized (twice) against its own basis, in batched products. The ``s``-step
tridiagonal matrix of probe ``j`` gives a Gauss quadrature rule (nodes ``theta_ji``, weights
``N * tau_ji^2``) for ``z^T f(A) z``, an unbiased estimate of ``tr f(A)``; averaging over probes gives the
spectral measure ``mu = sum_i delta(lambda_i)`` (total mass N).

With ``deflate=`` (an :class:`.lanczos.EigResult` or an int ``k``, then the top-``k`` pairs are computed
first) the known pairs enter exactly with weight 1, and the probes run on ``P A P`` with
``P = I - V V^T`` restricted to the complement, which removes the large outliers that otherwise dominate
the quadrature.

A probe whose Krylov space is exhausted (breakdown) stops early; its quadrature is then exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch

from .lanczos import EigResult, eigsh
from .operators import as_operator

__all__ = ["SpectralDensity", "slq"]


@dataclass
class SpectralDensity:
    """SLQ estimate of the spectral measure ``sum_i delta(lambda_i)`` (mass ``n``).

    Attributes:
        nodes: ``(probes, steps)`` float64 quadrature nodes per probe (padding entries have weight 0).
        weights: ``(probes, steps)`` float64 weights; each row sums to ``n - k_deflated``
            (up to the probe's norm after projection).
        deflated: ``(k,)`` float64 eigenvalues entered exactly (weight 1 each), possibly empty.
        n: dimension. probes, steps: as run. products: columns applied (deflation's included).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    deflated: torch.Tensor
    n: int
    probes: int
    steps: int
    products: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def trace(self, f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Estimate of ``tr f(A) = sum_i f(lambda_i)``; ``f`` maps a float64 tensor elementwise."""
        est = float((self.weights * f(self.nodes)).sum(1).mean()) if self.probes else 0.0
        if self.deflated.numel():
            est += float(f(self.deflated).sum())
        return est

    def count(self, lo: float = -math.inf, hi: float = math.inf) -> float:
        """Estimated number of eigenvalues in ``(lo, hi]`` (step functions are rough under Gauss
        quadrature: expect errors of a few eigenvalues; deflated ones are exact)."""
        return self.trace(lambda x: ((x > lo) & (x <= hi)).to(torch.float64))

    def density(self, grid: Union[torch.Tensor, Any], sigma: Optional[float] = None,
                normalize: bool = True) -> torch.Tensor:
        """Gaussian-smoothed density on ``grid`` (integrates to 1 when ``normalize``, else to ``n``).

        ``sigma`` defaults to 1 % of the spread of the nodes.
        """
        g = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        allnodes = torch.cat([self.nodes.reshape(-1), self.deflated])
        if sigma is None:
            spread = float(allnodes.max() - allnodes.min()) if allnodes.numel() else 1.0
            sigma = 0.01 * spread if spread > 0 else 1.0
        sigma = float(sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        c = 1.0 / (sigma * math.sqrt(2 * math.pi))

        def kern(x):
            return c * torch.exp(-0.5 * ((g[:, None] - x.reshape(1, -1)) / sigma) ** 2)

        d = torch.zeros_like(g)
        if self.probes:
            d += (kern(self.nodes) * self.weights.reshape(1, -1)).sum(1) / self.probes
        if self.deflated.numel():
            d += kern(self.deflated).sum(1)
        return d / self.n if normalize else d

    @property
    def trace_estimate(self) -> float:
        """Estimate of ``tr A``."""
        return self.trace(lambda x: x)

    def entropy_effective_rank(self) -> float:
        """``exp(H(p))`` with ``p_i = lambda_i / sum_j lambda_j`` over the positive spectrum."""
        t = self.trace(lambda x: torch.clamp(x, min=0.0))
        if t <= 0:
            return 0.0

        def plogp(x):
            p = torch.clamp(x, min=0.0) / t
            return torch.where(p > 0, -p * torch.log(torch.where(p > 0, p, torch.ones_like(p))),
                               torch.zeros_like(p))

        return math.exp(self.trace(plogp))

    def participation_ratio(self) -> float:
        """``(tr A)^2 / tr(A^2)`` (the Frobenius effective rank)."""
        t1 = self.trace(lambda x: x)
        t2 = self.trace(lambda x: x * x)
        return t1 * t1 / t2 if t2 > 0 else 0.0


def _batched_lanczos(apply, z: torch.Tensor, steps: int, reorth: bool, brk_rel: float):
    """Independent Lanczos recurrences on the columns of ``z`` (n, p), one block product per step.

    Returns alpha (p, s), beta (p, s) (beta[:, j] couples steps j and j+1) and lengths (p,).
    """
    n, p = z.shape
    dt = z.dtype
    norms = torch.linalg.vector_norm(z, dim=0)
    v = z / norms
    alpha = torch.zeros(p, steps, dtype=torch.float64)
    beta = torch.zeros(p, steps, dtype=torch.float64)
    length = torch.full((p,), steps, dtype=torch.long)
    active = torch.ones(p, dtype=torch.bool)
    basis = torch.zeros(steps, n, p, dtype=dt, device=z.device) if reorth else None
    v_prev = torch.zeros_like(v)
    b_prev = torch.zeros(p, dtype=dt, device=z.device)
    scale = 0.0
    for j in range(steps):
        if reorth:
            basis[j] = v
        w = apply(v)
        a = (v * w).sum(0)
        w = w - v * a - v_prev * b_prev
        if reorth:
            bj = basis[: j + 1]
            for _ in range(2):
                c = torch.einsum("snp,np->sp", bj, w)
                w = w - torch.einsum("snp,sp->np", bj, c)
        b = torch.linalg.vector_norm(w, dim=0)
        a_cpu = a.to("cpu", torch.float64)
        b_cpu = b.to("cpu", torch.float64)
        alpha[:, j] = torch.where(active, a_cpu, alpha[:, j])
        scale = max(scale, float(a_cpu.abs().max()), float(b_cpu.max()))
        stop = active & (b_cpu <= brk_rel * max(scale, 1e-300))
        for i in torch.nonzero(stop).flatten().tolist():
            length[i] = j + 1
        active = active & ~stop
        beta[:, j] = torch.where(active, b_cpu, torch.zeros_like(b_cpu))
        if not bool(active.any()) or j == steps - 1:
            break
        act_dev = active.to(z.device)
        safe_b = torch.where(act_dev, b, torch.ones_like(b))
        v_new = torch.where(act_dev, w / safe_b, torch.zeros_like(w))
        v_prev, v, b_prev = v, v_new, torch.where(act_dev, b, torch.zeros_like(b))
    return alpha, beta, length, norms.to("cpu", torch.float64)


def slq(A: Any, *, probes: int = 16, steps: int = 64, seed: int = 0,
        deflate: Union[None, int, EigResult] = None, reorthogonalize: bool = True,
        probe: str = "rademacher", **deflate_kwargs) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the spectrum of a symmetric matrix or operator.

    Args:
        A: symmetric matrix (torch/numpy), object with ``.matrix``, or operator with ``.shape``/``@``.
        probes: number of random probes, run together as one block.
        steps: Lanczos steps per probe (quadrature nodes per probe), capped at ``N``.
        seed: probe seed (CPU generator).
        deflate: ``None``; an int ``k`` (top-``k`` pairs by :func:`.lanczos.eigsh`, extra keyword
            arguments go to it); or an :class:`EigResult` whose pairs are used.
        reorthogonalize: full (twice) reorthogonalization per probe; memory ``steps * N * probes``.
        probe: ``"rademacher"`` or ``"gaussian"``.
    """
    t0 = time.perf_counter()
    op = as_operator(A)
    n = op.require_square()
    prod0 = op.products
    if isinstance(probes, bool) or int(probes) < 1:
        raise ValueError(f"probes must be a positive integer, got {probes}")
    if isinstance(steps, bool) or int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")
    probes, steps = int(probes), int(steps)

    vk = None
    deflated = torch.zeros(0, dtype=torch.float64)
    if deflate is not None:
        if isinstance(deflate, EigResult):
            res = deflate
        else:
            res = eigsh(op, int(deflate), seed=seed, **deflate_kwargs)
        if res.kind != "eigenvalues":
            raise ValueError("deflate needs eigenpairs, got " + res.kind)
        if res.eigenvectors.shape[0] != n:
            raise ValueError(f"deflation vectors have {res.eigenvectors.shape[0]} rows, A has {n}")
        vk = res.eigenvectors.to(device=op.device, dtype=op.work_dtype)
        deflated = res.eigenvalues.to("cpu", torch.float64).clone()
    kdef = 0 if vk is None else vk.shape[1]
    steps = max(1, min(steps, n - kdef)) if n - kdef > 0 else 0

    gen = torch.Generator().manual_seed(int(seed))
    if probe == "rademacher":
        z = (torch.randint(0, 2, (n, probes), generator=gen) * 2 - 1).to(torch.float64)
    else:
        z = torch.randn(n, probes, generator=gen, dtype=torch.float64)
    z = z.to(device=op.device, dtype=op.work_dtype)

    def project(x):
        if vk is None:
            return x
        for _ in range(2):
            x = x - vk @ (vk.mT @ x)
        return x

    def apply(x):
        return project(op.matmat(x))

    if steps == 0:  # everything deflated
        nodes = torch.zeros(probes, 0, dtype=torch.float64)
        weights = torch.zeros(probes, 0, dtype=torch.float64)
        return SpectralDensity(nodes, weights, deflated, n, probes, 0, op.products - prod0,
                               time.perf_counter() - t0)

    z = project(z)
    eps = float(torch.finfo(op.work_dtype).eps)
    alpha, beta, length, norms = _batched_lanczos(apply, z, steps, reorthogonalize,
                                                  brk_rel=10 * eps * math.sqrt(n))
    # all tridiagonal matrices in one batched eigh; a probe that broke down has beta = 0 from there
    # on, so its padding is a decoupled block whose nodes carry zero weight
    t = torch.diag_embed(alpha)
    if steps > 1:
        off = beta[:, : steps - 1]
        t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    nodes, y = torch.linalg.eigh(t)
    weights = (y[:, 0, :] ** 2) * (norms ** 2)[:, None]
    return SpectralDensity(nodes=nodes, weights=weights, deflated=deflated, n=n, probes=probes,
                           steps=steps, products=op.products - prod0, seconds=time.perf_counter() - t0,
                           info={"lengths": length.tolist(), "reorthogonalize": reorthogonalize,
                                 "probe": probe})
