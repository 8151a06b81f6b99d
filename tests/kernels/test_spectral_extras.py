"""Conditioning, singular values, spectral density (SLQ) and exact quantities against float64 dense
oracles (linft_kernels.linalg), plus the linft.spectrum wrapper."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from linft_kernels.linalg import (conditioning, diagonal, effective_rank, eigsh, frobenius_norm, slq,
                                  svds, trace)
from linft_kernels.linalg.operators import accuracy_floor


def with_spectrum(evals: torch.Tensor, seed: int, dtype=torch.float64) -> torch.Tensor:
    n = evals.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * evals.to(torch.float64)) @ q.T
    return (0.5 * (a + a.T)).to(dtype)


def rel(a, b):
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------ conditioning

@pytest.mark.parametrize("method", ["lanczos", "dense"])
def test_conditioning_well_conditioned(method):
    g = torch.Generator().manual_seed(1)
    n = 300
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    a = x @ x.T / (3 * n)  # Wishart: kappa about 14
    ev = torch.linalg.eigvalsh(a)
    c = conditioning(a, method=method)
    assert c.resolved and c.lambda_min_converged and c.psd
    assert rel(c.lambda_max, float(ev[-1])) < 1e-8
    assert rel(c.lambda_min, float(ev[0])) < 1e-8
    assert rel(c.condition_number, float(ev[-1] / ev[0])) < 1e-7
    for lam in (0.0, 0.1, 10.0):
        want = float((ev[-1] + lam) / (ev[0] + lam))
        assert rel(c.ridge_condition(lam), want) < 1e-7
        lo, hi = c.ridge_condition_bounds(lam)
        assert lo == hi
    if method == "lanczos":
        assert c.products > 0 and c.residual_min <= 1e-8 * c.lambda_max


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("method", ["lanczos", "dense"])
def test_unresolved_lambda_min_is_reported_as_such(method, dtype):
    g = torch.Generator().manual_seed(2)
    n, r = 250, 6
    x = torch.randn(n, r, generator=g, dtype=torch.float64)
    a = (x @ x.T).to(dtype)  # exactly singular: lambda_min = 0
    c = conditioning(a, method=method)
    lmax = float(torch.linalg.eigvalsh(a.to(torch.float64))[-1])
    assert rel(c.lambda_max, lmax) < (1e-8 if dtype == torch.float64 else 1e-4)
    assert not c.resolved
    assert c.lambda_min is None and c.condition_number is None
    assert c.resolution == pytest.approx(accuracy_floor(n, dtype, c.lambda_max))
    assert c.lambda_min_upper == pytest.approx(c.resolution)
    assert c.condition_lower_bound == pytest.approx(c.lambda_max / c.resolution)
    assert "unresolved" in repr(c)
    # ridge condition: defined when lam dominates the resolution, nan otherwise, bounds always valid
    lam = 1e4 * c.resolution
    assert c.ridge_condition(lam) == pytest.approx((c.lambda_max + lam) / lam, rel=1e-3)
    assert math.isnan(c.ridge_condition(0.0))
    lo, hi = c.ridge_condition_bounds(1e-2 * c.resolution)
    true = (c.lambda_max + 1e-2 * c.resolution) / (0 + 1e-2 * c.resolution)
    assert lo <= true <= hi


def test_huge_condition_number_resolved_in_fp64_not_in_fp32():
    n = 200
    ev = torch.logspace(0, -10, n, dtype=torch.float64)
    a = with_spectrum(ev, 3)
    c64 = conditioning(a, method="dense")
    true = torch.linalg.eigvalsh(a)
    assert c64.resolved and rel(c64.condition_number, float(true[-1] / true[0])) < 1e-3
    c32 = conditioning(a.to(torch.float32), method="dense")
    assert not c32.resolved and c32.condition_lower_bound > 1e4


def test_lambda_min_not_converged_gives_only_a_bound():
    n = 600
    ev = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0  # bottom gaps ~ 1e-6 of the spread
    a = with_spectrum(ev, 4)
    c = conditioning(a, method="lanczos", max_passes=15)
    assert not c.lambda_min_converged and not c.resolved
    assert c.lambda_min is None and c.condition_number is None
    assert c.lambda_min_upper >= float(ev.min()) * (1 - 1e-12)  # a Rayleigh quotient bounds it
    assert c.condition_lower_bound <= float(ev.max() / ev.min()) * (1 + 1e-12)
    assert "not converged" in repr(c)


def test_not_psd_flagged():
    ev = torch.linspace(-1.0, 2.0, 50, dtype=torch.float64)
    c = conditioning(with_spectrum(ev, 5), method="lanczos")
    assert not c.psd and c.condition_number is None and "not PSD" in c.info["note"]


# ------------------------------------------------------------------------------------ singular values

@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (150, 150)])
@pytest.mark.parametrize("method", ["normal", "augmented", "dense"])
def test_svds_matches_dense(shape, method):
    g = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -1.2
    a = (u * s) @ v.T  # asymmetric, known singular values
    k = 8
    r = svds(a, k, method=method)
    assert r.kind == "singular values"
    ref = torch.linalg.svdvals(a)[:k]
    assert torch.allclose(r.eigenvalues, ref, rtol=1e-6, atol=0)
    assert r.all_converged
    uu, vv = r.left_vectors, r.eigenvectors
    true_res = torch.sqrt(torch.linalg.vector_norm(a @ vv - uu * r.eigenvalues, dim=0) ** 2
                          + torch.linalg.vector_norm(a.T @ uu - vv * r.eigenvalues, dim=0) ** 2)
    assert torch.allclose(r.residuals, true_res, rtol=1e-6, atol=1e-13)
    if method != "dense":
        assert "lanczos" in r.method and r.products > 0


def test_svds_operator_needs_transpose():
    class NoT:
        shape = (30, 20)

        def __matmul__(self, x):
            return torch.ones(30, x.shape[1], dtype=torch.float64)

    with pytest.raises(TypeError, match="transpose"):
        svds(NoT(), 2)

    class WithT:
        def __init__(self, a):
            self.a, self.shape, self.dtype = a, tuple(a.shape), a.dtype

        def __matmul__(self, x):
            return self.a @ x

        @property
        def T(self):
            return WithT(self.a.T)

    a = torch.randn(40, 25, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    r = svds(WithT(a), 3)
    assert torch.allclose(r.eigenvalues, torch.linalg.svdvals(a)[:3], rtol=1e-7)


def test_svds_errors():
    with pytest.raises(ValueError, match="exceeds"):
        svds(torch.zeros(5, 3, dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="method"):
        svds(torch.zeros(5, 3, dtype=torch.float64), 1, method="qr")


def test_conditioning_svd_kind():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(200, 80, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    for method in ("lanczos", "dense"):
        c = conditioning(a, kind="svd", method=method)
        assert c.kind == "singular values" and c.resolved
        assert rel(c.lambda_max, float(s[0])) < 1e-8
        assert rel(c.lambda_min, float(s[-1])) < 1e-6
        assert rel(c.condition_number, float(s[0] / s[-1])) < 1e-6


# ------------------------------------------------------------------------------------ density (SLQ)

def _probes(n, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, p), generator=gen) * 2 - 1).to(torch.float64)


def test_slq_is_exact_quadrature_when_krylov_space_is_full():
    n, p = 40, 5
    g = torch.Generator().manual_seed(10)
    ev = torch.rand(n, generator=g, dtype=torch.float64) * 2
    a = with_spectrum(ev, 10)
    d = slq(a, probes=p, steps=n, seed=3)
    z = _probes(n, p, 3)
    evals, q = torch.linalg.eigh(a)
    for f in (torch.exp, lambda x: x ** 3, torch.sqrt):
        fa = (q * f(evals)) @ q.T
        want = float(torch.einsum("np,nm,mp->p", z, fa, z).mean())
        assert d.trace(f) == pytest.approx(want, rel=1e-9)
    assert d.trace(lambda x: torch.ones_like(x)) == pytest.approx(n, rel=1e-12)  # mass = N


def test_slq_low_degree_moments_are_exact_per_probe():
    n, p, s = 500, 8, 10
    a = with_spectrum(torch.arange(1, n + 1, dtype=torch.float64) ** -0.7, 11)
    d = slq(a, probes=p, steps=s, seed=4)
    z = _probes(n, p, 4)
    for deg in (1, 2, 5, 2 * s - 1):  # Gauss quadrature is exact to degree 2s-1
        ap = torch.linalg.matrix_power(a, deg)
        want = float(torch.einsum("np,nm,mp->p", z, ap, z).mean())
        assert d.trace(lambda x: x ** deg) == pytest.approx(want, rel=1e-8)
    assert d.products == p * s


def test_slq_deflation():
    n, k = 400, 6
    g = torch.Generator().manual_seed(12)
    ev = torch.rand(n, generator=g, dtype=torch.float64) * 0.1
    ev[:k] = torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0, 5.0], dtype=torch.float64)
    a = with_spectrum(ev, 12)
    top = eigsh(a, k)
    d = slq(a, probes=16, steps=30, deflate=top, seed=1)
    assert torch.equal(d.deflated, top.eigenvalues)
    assert d.count(1.0) == pytest.approx(k, abs=1e-6)  # the outliers are exact, the rest is below 0.1
    assert d.nodes.max() <= 0.1 + 1e-8 and d.nodes.min() >= -1e-8
    mass = d.trace(lambda x: torch.ones_like(x))
    assert mass == pytest.approx(n, rel=0.05)
    tr = float(ev.sum())
    assert d.trace_estimate == pytest.approx(tr, rel=0.02)
    # int deflation computes the pairs itself and counts their products
    d2 = slq(a, probes=4, steps=10, deflate=k, seed=1)
    assert torch.allclose(d2.deflated, top.eigenvalues, rtol=1e-10) and d2.products > 40
    # density integrates to one
    grid = torch.linspace(-1, 60, 20001, dtype=torch.float64)
    dens = d.density(grid, sigma=0.05)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)


def test_slq_rank_exhaustion_and_errors():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    a = x @ x.T
    d = slq(a, probes=4, steps=20)
    assert max(d.info["lengths"]) <= 5  # Krylov space of a rank-3 matrix breaks down early
    assert d.trace_estimate == pytest.approx(float(torch.linalg.eigvalsh(a).sum()), rel=0.5)
    with pytest.raises(ValueError, match="probes"):
        slq(a, probes=0)
    with pytest.raises(ValueError, match="steps"):
        slq(a, steps=0)


# ------------------------------------------------------------------------------------ exact quantities

def test_trace_diagonal_frobenius():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(80, 30, generator=g, dtype=torch.float64)
    a = x @ x.T
    assert trace(a) == pytest.approx(float((x * x).sum()), rel=1e-12)  # sum of squared row norms
    assert torch.allclose(diagonal(a), (x * x).sum(1))
    assert frobenius_norm(a) == pytest.approx(float(torch.linalg.eigvalsh(a).pow(2).sum().sqrt()),
                                              rel=1e-10)
    assert trace(a.to(torch.float32)) == pytest.approx(trace(a), rel=1e-5)

    class Op:
        shape = (80, 80)
        dtype = torch.float64

        def __matmul__(self, v):
            return a @ v

    with pytest.raises(TypeError, match="estimate=True"):
        trace(Op())
    with pytest.raises(TypeError, match="diagonal"):
        diagonal(Op())
    est = trace(Op(), estimate=True, probes=400)
    assert est == pytest.approx(trace(a), rel=0.1)


def test_effective_rank_definitions():
    n = 120
    assert effective_rank(torch.eye(n, dtype=torch.float64)) == pytest.approx(n)
    assert effective_rank(torch.eye(n, dtype=torch.float64), kind="entropy") == pytest.approx(n)
    x, _ = torch.linalg.qr(torch.randn(n, 7, generator=torch.Generator().manual_seed(15),
                                       dtype=torch.float64))
    p = x @ x.T  # a rank-7 projection
    assert effective_rank(p) == pytest.approx(7, rel=1e-10)
    assert effective_rank(p, kind="entropy") == pytest.approx(7, rel=1e-10)
    ev = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    a = with_spectrum(ev, 16)
    pr = float(ev.sum() ** 2 / (ev ** 2).sum())
    q = ev / ev.sum()
    ent = math.exp(float(-(q * q.log()).sum()))
    assert effective_rank(a) == pytest.approx(pr, rel=1e-10)
    assert effective_rank(a, kind="entropy") == pytest.approx(ent, rel=1e-10)
    assert effective_rank(a) <= effective_rank(a, kind="entropy")
    est = effective_rank(a, kind="entropy", method="slq", probes=64, steps=40)
    assert est == pytest.approx(ent, rel=0.15)
    with pytest.raises(ValueError, match="kind"):
        effective_rank(a, kind="stable")


# ------------------------------------------------------------------------------------ linft wrapper

def test_linft_spectrum_wrapper():
    spec = pytest.importorskip("linft.spectrum")
    g = torch.Generator().manual_seed(17)
    ev = torch.arange(1, 201, dtype=torch.float64) ** -2.0
    a = with_spectrum(ev, 17)
    r = spec.spectrum(a.numpy(), 5)
    assert r.kind == "eigenvalues"
    assert torch.allclose(r.eigenvalues, ev[:5], rtol=1e-10)
    r = spec.spectrum(a, 5, method="lanczos")
    assert r.method == "block-lanczos" and r.all_converged and r.products > 0
    d = r.to_dict()
    assert d["values"][0] == pytest.approx(1.0) and d["products"] == r.products

    class FakeNTK:  # an NTK result carrying an asymmetric kernel
        def __init__(self, m):
            self.matrix = m
            self.meta = {"kernel": "asymmetric-signgd", "symmetric": False}
            self.symmetric = False

    b = torch.randn(60, 60, generator=g, dtype=torch.float64)
    r = spec.spectrum(FakeNTK(b), 3)
    assert r.kind == "singular values"
    assert torch.allclose(r.eigenvalues, torch.linalg.svdvals(b)[:3], rtol=1e-8)
    r = spec.spectrum(b, 3, asymmetric="symmetric")
    assert r.kind == "eigenvalues of the symmetric part"
    assert torch.allclose(r.eigenvalues, torch.linalg.eigvalsh(0.5 * (b + b.T)).flip(0)[:3],
                          rtol=1e-8)
    with pytest.raises(ValueError, match="not symmetric"):
        spec.spectrum(b, 3, asymmetric="error")
    r = spec.spectrum(torch.randn(50, 30, generator=g, dtype=torch.float64), 2)
    assert r.kind == "singular values"
    c = spec.conditioning(FakeNTK(b))
    assert c.kind == "singular values"
    assert spec.condition_number(a) == pytest.approx(float(ev[0] / ev[-1]), rel=1e-6)
    assert spec.effective_rank(a) == pytest.approx(float(ev.sum() ** 2 / (ev ** 2).sum()))
    assert spec.trace(a) == pytest.approx(float(ev.sum()))
    assert np.isfinite(spec.spectral_density(a, probes=4, steps=8).trace_estimate)
