#!/usr/bin/env python
"""Benchmark: top-k eigenpairs by linft's block Lanczos against ARPACK, LOBPCG and dense eigh.

For each size N and spectrum it builds a symmetric float64 matrix with a *known* spectrum,
A = Q diag(lambda) Q^T, with Q a random orthogonal matrix (QR of a Gaussian for N <= 4096; for larger N
a product of 4 random Householder reflections, a random permutation and random signs, which costs
O(N^2) and leaves Krylov methods' behaviour unchanged, since their random start is rotation invariant).

Spectra: ``ntk`` (fast power-law decay i^-2 with 4 large outliers, like an empirical NTK) and ``slow``
(i^-0.5).

Methods, each counting operator applications on single vectors ("products", columns; a product with
a block of b vectors counts b, for every method alike):
  * ``linft-op``: linft_kernels.linalg.eigsh with all defaults on a matrix-free operator (an object with
    only ``.shape``, ``.dtype`` and ``@``, like linft.NTKOperator or the LinearOperator ARPACK gets
    here): block size 1, widened on demand for tight clusters, and ``certify="stored"`` (true residuals
    ||A v - theta v|| from the stored products A Q, no extra product).
  * ``linft``: eigsh with all defaults on the explicit tensor: block size min(k, 8) and the k-column
    certification product.
  * ``linft-b1`` (block size 1, certification product) and ``linft-b1-stored`` (block size 1,
    ``certify="stored"``) on the explicit tensor.
  * ``arpack``: scipy.sparse.linalg.eigsh on a LinearOperator that counts matvec/matmat columns.
  * ``lobpcg``: torch.lobpcg, counting the columns it multiplies A with (through
    torch._linalg_utils.matmul, which its products go through).
  * ``dense``: torch.linalg.eigh (all pairs) and scipy.linalg.eigh(subset_by_index) (the top k only,
    LAPACK syevr), timed once (``--skip-dense`` to skip; at N = 16384 these take minutes).

Equal accuracy: every method runs down a ladder of tolerances until its answer meets the target:
max_i ||A v_i - theta_i v_i|| / |theta_i| <= --target (relative residual, recomputed here in float64
and not counted) and all k eigenvalues within 1e-8 relative of the known ones. The first (loosest)
tolerance that meets it is then repeated --reps times; medians are reported. The ladders start at the
target itself (ARPACK and linft use the same relative criterion ||r|| <= tol |theta|); torch.lobpcg's
tolerance is relative to ||A|| + |theta|, so its ladder starts at target * lambda_k / lambda_1.

Output: a table on stdout and long-format JSON rows (--out) with hardware and versions.

    python bench/bench_spectrum.py --sizes 4096 --out bench_spectrum.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from linft_kernels.linalg import eigsh  # noqa: E402


# ----------------------------------------------------------------------------------------- matrices

def spectrum(name: str, n: int) -> torch.Tensor:
    i = torch.arange(1, n + 1, dtype=torch.float64)
    if name == "ntk":
        ev = i ** -2.0
        ev[:4] = torch.tensor([400.0, 90.0, 25.0, 6.0], dtype=torch.float64)
        return ev
    if name == "slow":
        return i ** -0.5
    raise ValueError(f"unknown spectrum {name!r}")


def build(ev: torch.Tensor, seed: int, basis: str) -> torch.Tensor:
    n = ev.numel()
    g = torch.Generator().manual_seed(seed)
    if basis == "qr":
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        a = (q * ev) @ q.T
        del q
    else:
        a = torch.diag(ev)
        for _ in range(4):
            u = torch.randn(n, generator=g, dtype=torch.float64)
            u /= u.norm()
            au = a @ u
            c = float(u @ au)
            # (I - 2uu^T) A (I - 2uu^T) = A - 2 u au^T - 2 au u^T + 4 c u u^T
            w = au - c * u
            a.addr_(u, w, alpha=-2.0)
            a.addr_(w, u, alpha=-2.0)
        perm = torch.randperm(n, generator=g)
        sign = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)
        a = a[perm][:, perm]
        a *= sign[:, None]
        a *= sign[None, :]
    a = 0.5 * (a + a.T)
    return a.contiguous()


# ----------------------------------------------------------------------------------------- accuracy

def accuracy(a: torch.Tensor, vals, vecs, ref: torch.Tensor) -> dict:
    vals = torch.as_tensor(np.asarray(vals), dtype=torch.float64)
    vecs = torch.as_tensor(np.asarray(vecs), dtype=torch.float64)
    order = torch.argsort(vals, descending=True)
    vals, vecs = vals[order], vecs[:, order]
    vecs = vecs / vecs.norm(dim=0)
    res = torch.linalg.vector_norm(a @ vecs - vecs * vals, dim=0)
    rel_res = float((res / vals.abs()).max())
    rel_err = float(((vals - ref) / ref).abs().max())
    return {"rel_residual": rel_res, "rel_eig_error": rel_err}


def meets(acc: dict, target: float) -> bool:
    return acc["rel_residual"] <= target and acc["rel_eig_error"] <= 1e-8


# ----------------------------------------------------------------------------------------- methods

class MatrixFree:
    """The matrix seen only through ``@`` on blocks (no ``.matrix``): eigsh treats it as an operator."""

    def __init__(self, a):
        self._a = a
        self.shape = tuple(a.shape)
        self.dtype = a.dtype

    def __matmul__(self, x):
        return self._a @ x


def run_linft(a, k, tol, seed, block_size=None, certify="auto", matrix_free=False):
    t = time.perf_counter()
    r = eigsh(MatrixFree(a) if matrix_free else a, k, tol=tol, seed=seed, block_size=block_size,
              method="lanczos", certify=certify)
    dt = time.perf_counter() - t
    return r.eigenvalues, r.eigenvectors, r.products, dt, {
        "passes": r.passes, "restarts": r.restarts, "block_size": r.info["initial_block_size"],
        "final_block_size": r.info["final_block_size"], "widenings": r.info["widenings"],
        "converged": int(r.converged.sum()), "certification": r.info["certification"],
        "certification_products": k if r.info["certification"] == "product" else 0}


def run_arpack(a, k, tol, seed, block_size=None):
    from scipy.sparse.linalg import LinearOperator
    from scipy.sparse.linalg import eigsh as arpack

    an = a.numpy()
    count = [0]

    def mv(x):
        count[0] += 1 if x.ndim == 1 else x.shape[1]
        return an @ x

    op = LinearOperator(an.shape, matvec=mv, matmat=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(an.shape[0])
    t = time.perf_counter()
    w, v = arpack(op, k=k, which="LA", tol=tol, v0=v0)
    dt = time.perf_counter() - t
    return w, v, count[0], dt, {"ncv": min(an.shape[0], max(2 * k + 1, 20))}


def run_lobpcg(a, k, tol, seed, block_size=None):
    # count the columns torch.lobpcg multiplies A with: its products go through
    # torch._linalg_utils.matmul (directly and inside qform/bform)
    import torch._linalg_utils as lu

    count = [0]
    orig = lu.matmul

    def counting(A, B):
        if A is a:
            count[0] += B.shape[-1] if B.dim() > 1 else 1
        return orig(A, B)

    x0 = torch.randn(a.shape[0], k, generator=torch.Generator().manual_seed(seed),
                     dtype=torch.float64)
    lu.matmul = counting
    try:
        t = time.perf_counter()
        w, v = torch.lobpcg(a, k=k, X=x0, tol=tol, largest=True, niter=LOBPCG_NITER)
        dt = time.perf_counter() - t
    finally:
        lu.matmul = orig
    return w, v, count[0], dt, {}


LOBPCG_NITER = 200

METHODS = {
    "linft-op": (lambda a, k, tol, seed, b: run_linft(a, k, tol, seed, b, matrix_free=True), None),
    "linft": (run_linft, None),
    "linft-b1": (lambda a, k, tol, seed, b: run_linft(a, k, tol, seed, b, True), 1),
    "linft-b1-stored": (lambda a, k, tol, seed, b: run_linft(a, k, tol, seed, b, "stored"), 1),
    "arpack": (run_arpack, None),
    "lobpcg": (run_lobpcg, None),
}
LADDER = {
    "linft-op": [1.0, 0.1, 0.01],
    "linft": [1.0, 0.1, 0.01],
    "linft-b1": [1.0, 0.1, 0.01],
    "linft-b1-stored": [1.0, 0.1, 0.01],
    "arpack": [1.0, 0.1, 0.01, 1e-3],
    # lobpcg's tol is relative to ||A|| + |theta|, not to |theta|: the ladder is scaled by
    # target * lambda_k / lambda_1 from the known spectrum (see main)
    "lobpcg": [1.0, 0.1, 0.01, 1e-3],
}


# ----------------------------------------------------------------------------------------- main

def hardware() -> dict:
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = None
    return {"load_avg_1min": load, "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "scipy": __import__("scipy").__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--spectra", nargs="+", default=["ntk", "slow"], choices=["ntk", "slow"])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                   help="iterative methods to run (none: only the dense timings)")
    p.add_argument("--target", type=float, default=1e-6,
                   help="relative residual every pair must reach (default 1e-6)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--reps-large", type=int, default=1,
                   help="repetitions for N > 8192 (default 1)")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--lobpcg-max-n", type=int, default=1 << 30,
                   help="skip torch.lobpcg above this N (it multiplies A by 4k columns per step)")
    p.add_argument("--lobpcg-niter", type=int, default=200, help="torch.lobpcg niter (default 200)")
    p.add_argument("--rung-budget", type=float, default=240.0,
                   help="stop a method's tolerance ladder after a run longer than this (seconds)")
    p.add_argument("--dense-full-max", type=int, default=8192,
                   help="largest N for the all-pairs torch.linalg.eigh timing (default 8192)")
    p.add_argument("--basis", choices=["auto", "qr", "householder"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-from", default=None,
                   help="JSON rows of an earlier run whose dense timings to use for the ratios "
                        "(with --skip-dense; matching n and k)")
    p.add_argument("--out", default=None, help="JSON file for the long-format rows")
    args = p.parse_args(argv)

    global LOBPCG_NITER
    LOBPCG_NITER = args.lobpcg_niter
    hw = hardware()
    if hw["load_avg_1min"] is not None and hw["load_avg_1min"] > 1.5 * (os.cpu_count() or 1):
        print(f"# warning: load average {hw['load_avg_1min']:.1f} on {os.cpu_count()} CPUs: "
              "timings are not reliable")
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []

    def emit(**row):
        row.update(date=date, **hw)
        row["load_avg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        rows.append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)

    print(f"# {hw['platform']}  cpus={hw['cpu_count']}  torch={hw['torch']}  scipy={hw['scipy']}")
    for n in args.sizes:
        reps = args.reps if n <= 8192 else args.reps_large
        dense_done = False
        dense_times = {}
        for spec in args.spectra:
            basis = args.basis if args.basis != "auto" else ("qr" if n <= 4096 else "householder")
            t = time.perf_counter()
            ev = spectrum(spec, n)
            a = build(ev, args.seed, basis)
            ref = torch.sort(ev, descending=True).values[: args.k]
            print(f"\nN={n} spectrum={spec} basis={basis} k={args.k} target rel. residual "
                  f"{args.target:g}  (built in {time.perf_counter() - t:.1f}s)")
            print(f"{'method':16s} {'tol':>9s} {'products':>9s} {'time_s':>9s} {'rel_res':>9s} "
                  f"{'rel_err':>9s}  extra")
            results = {}
            for name in args.methods:
                fn, bsz = METHODS[name]
                if name == "lobpcg" and n > args.lobpcg_max_n:
                    print(f"{name:16s} skipped (--lobpcg-max-n {args.lobpcg_max_n})")
                    continue
                chosen = None
                for f in LADDER[name]:
                    tol = f * args.target
                    if name == "lobpcg":
                        tol *= float(ref[-1] / ref[0])
                    try:
                        vals, vecs, prods, dt, extra = fn(a, args.k, tol, args.seed, bsz)
                    except Exception as exc:  # noqa: BLE001 - a baseline failing is a result too
                        print(f"{name:16s} {tol:9.1e} failed: {type(exc).__name__}: {exc}")
                        continue
                    acc = accuracy(a, vals, vecs, ref)
                    if meets(acc, args.target):
                        chosen = (tol, prods, dt, acc, extra)
                        break
                    print(f"{name:16s} {tol:9.1e} {prods:9d} {dt:9.2f} {acc['rel_residual']:9.1e} "
                          f"{acc['rel_eig_error']:9.1e}  (misses the target)")
                    if dt > args.rung_budget:
                        print(f"{name:16s} gave up: a run took longer than --rung-budget")
                        break
                if chosen is None:
                    print(f"{name:16s} did not reach the target on its tolerance ladder")
                    emit(bench="spectrum", n=n, k=args.k, spectrum=spec, method=name,
                         reached_target=False, target=args.target)
                    continue
                tol, prods, dt, acc, extra = chosen
                times, products = [dt], [prods]
                for r in range(1, reps):
                    _, _, pr, d, _ = fn(a, args.k, tol, args.seed + r, bsz)
                    times.append(d)
                    products.append(pr)
                med_t, med_p = statistics.median(times), statistics.median(products)
                results[name] = (med_p, med_t)
                print(f"{name:16s} {tol:9.1e} {med_p:9.0f} {med_t:9.2f} {acc['rel_residual']:9.1e} "
                      f"{acc['rel_eig_error']:9.1e}  {extra}")
                emit(bench="spectrum", n=n, k=args.k, spectrum=spec, basis=basis, method=name,
                     tol=tol, target=args.target, reached_target=True, products=med_p,
                     products_all=products, seconds=med_t, seconds_all=times, reps=reps, **acc,
                     extra=extra)
            if not args.skip_dense and not dense_done:
                # the dense cost does not depend on the spectrum: time it once per size
                dense_done = True
                an = a.numpy()
                import scipy.linalg as sl

                t = time.perf_counter()
                w, v = sl.eigh(an, subset_by_index=[n - args.k, n - 1], driver="evr")
                d_sub = time.perf_counter() - t
                acc = accuracy(a, w, v, ref)
                dense_times["dense-subset"] = (0, d_sub)
                print(f"{'dense-evr':16s} {'-':>9s} {'-':>9s} {d_sub:9.2f} {acc['rel_residual']:9.1e} "
                      f"{acc['rel_eig_error']:9.1e}  scipy.linalg.eigh(subset_by_index, driver=evr)")
                emit(bench="spectrum", n=n, k=args.k, spectrum=spec, basis=basis,
                     method="dense-subset", seconds=d_sub, reps=1, **acc)
                if n <= args.dense_full_max:
                    t = time.perf_counter()
                    w, v = torch.linalg.eigh(a)
                    d_full = time.perf_counter() - t
                    acc = accuracy(a, w[-args.k:], v[:, -args.k:], ref)
                    dense_times["dense-eigh"] = (0, d_full)
                    print(f"{'dense-eigh':16s} {'-':>9s} {'-':>9s} {d_full:9.2f} "
                          f"{acc['rel_residual']:9.1e} {acc['rel_eig_error']:9.1e}  torch.linalg.eigh")
                    emit(bench="spectrum", n=n, k=args.k, spectrum=spec, basis=basis,
                         method="dense-eigh", seconds=d_full, reps=1, **acc)
                    del w, v
            if args.dense_from and not dense_times:
                with open(args.dense_from) as f:
                    for row in json.load(f):
                        if (row.get("bench") == "spectrum" and row.get("n") == n
                                and row.get("k") == args.k
                                and row.get("method") in ("dense-subset", "dense-eigh")):
                            dense_times[row["method"]] = (0, row["seconds"])
            results.update(dense_times)
            for base in ("linft-op", "linft"):
                if base not in results:
                    continue
                lp, lt = results[base]
                for other, (op_, ot) in results.items():
                    if other == base:
                        continue
                    ratio_p = (op_ / lp) if op_ else None
                    ratio_t = ot / lt
                    print(f"  {other:15s} / {base:8s}: products x{ratio_p:.2f}" if ratio_p else
                          f"  {other:15s} / {base:8s}: products  -   ", end="")
                    print(f"   time x{ratio_t:.2f}")
                    emit(bench="spectrum-ratio", n=n, k=args.k, spectrum=spec, base=base,
                         baseline=other, products_ratio=ratio_p, time_ratio=ratio_t)
            del a
    if args.out:
        print(f"\nwrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
