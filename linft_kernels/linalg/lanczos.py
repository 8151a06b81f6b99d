"""Top-k eigenpairs of a symmetric matrix or operator by thick-restart randomized block Lanczos.

Algorithm (``eigsh``):

* Start from a Gaussian block (seeded, drawn on the CPU so every device sees the same numbers) of
  ``block_size`` columns, plus any ``v0`` given. Default width (:func:`default_block_size`): ``min(k, 8)``
  for an explicit matrix, ``1`` for a matrix-free operator, where every column is expensive and single
  vector Lanczos needs the fewest products; with the default, the block is **widened on demand** when a
  tight cluster of settled Ritz values fills it (see ``eigsh``'s ``block_size``).
* Block Krylov recurrence with **full reorthogonalization done twice** as matrix products
  (``W -= Q (Q^T W)``, two times), a rank-revealing QR of the remainder, and a third cheap pass on the
  normalized new block. Directions whose remainder falls below the breakdown threshold (an invariant
  subspace was found, e.g. an exactly low-rank matrix) are **refilled** with fresh random vectors
  orthogonal to the basis, so the block keeps its width until the whole space is spanned.
* The projected matrix ``H = Q^T A Q`` is kept in float64 (on the CPU) from the reorthogonalization
  coefficients; **Rayleigh-Ritz in fp64** after every block gives Ritz pairs and their residual
  estimates ``||H_{u,a} y||`` at no extra product.
* When the basis reaches ``max_basis`` columns it is **thick-restarted**: the best Ritz vectors are kept
  together with the last (unapplied) block, which preserves the Krylov decomposition exactly.
* At the end one extra product ``A V`` on the ``k`` returned vectors **certifies** the residuals:
  ``residuals[i] = ||A v_i - theta_i v_i||`` with ``theta_i = v_i^T A v_i`` (fp64), the true values in the
  operator's arithmetic, not estimates. (``certify="stored"``, the default for matrix-free operators,
  gets the same ``A V`` without the extra product, as ``(A Q) Y`` from the raw products kept beside the
  basis, at twice the memory of the basis.)

Convergence of pair ``i``: ``||A v_i - theta_i v_i|| <= max(tol * |theta_i|, floor)`` where ``floor`` is
:func:`linft_kernels.linalg.operators.accuracy_floor` (``4 sqrt(N) eps ||A||``), the rounding level of a
product in the operator's precision. Eigenvalue errors are at most the residual, and typically
``residual^2 / gap``.

``which="smallest"`` selects the bottom of the same Krylov space (equivalently, the top of the flipped
operator ``sigma I - A``); convergence there is governed by the relative gaps at the bottom of the
spectrum and can be slow for spectra that accumulate at zero (see :mod:`.conditioning`).

Products are counted per column (a block of ``b`` vectors costs ``b``); passes per block application.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .operators import Operator, accuracy_floor, as_operator, check_k

__all__ = ["EigResult", "eigsh", "default_block_size", "default_max_basis", "check_symmetric"]


@dataclass
class EigResult:
    """Eigenpairs from :func:`eigsh` (or singular triplets from :func:`svds`, see ``kind``).

    Attributes:
        eigenvalues: ``(k,)`` float64, descending (also for ``which="smallest"``: the last is the
            smallest).
        eigenvectors: ``(N, k)`` orthonormal columns, in the working precision (float64 for a float64
            operator, float32 otherwise), on the operator's device. For singular values: the right
            singular vectors.
        residuals: ``(k,)`` float64, ``||A v - theta v||`` from an explicit product (``certified``), or
            Ritz estimates when ``certify=False``. For singular values: ``||A^T u - sigma v||`` with
            ``u = A v / sigma`` (so ``||A v - sigma u|| = 0``).
        converged: ``(k,)`` bool, ``residual <= max(tol*|theta|, floor)``.
        products: operator applications on single vectors (columns), certification included.
        passes: block applications (``@`` calls).
        floor: the accuracy floor used (see module docstring).
        kind: what the values are: ``"eigenvalues"``, ``"singular values"`` (then ``left_vectors``
            holds ``U``), or ``"eigenvalues of the symmetric part"``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    products: int
    passes: int
    restarts: int = 0
    method: str = "block-lanczos"
    which: str = "largest"
    kind: str = "eigenvalues"
    tol: float = 0.0
    floor: float = 0.0
    block_size: int = 0
    max_basis: int = 0
    certified: bool = True
    dtype: torch.dtype = torch.float64
    n: int = 0
    seconds: float = 0.0
    left_vectors: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def singular_values(self) -> torch.Tensor:
        if self.kind != "singular values":
            raise AttributeError("this result holds eigenvalues, not singular values")
        return self.eigenvalues

    def to_dict(self, vectors: bool = False) -> dict:
        """JSON-ready summary (eigenvectors included only when ``vectors``)."""
        d = {
            "kind": self.kind, "method": self.method, "which": self.which, "n": self.n, "k": self.k,
            "values": [float(x) for x in self.eigenvalues],
            "residuals": [float(x) for x in self.residuals],
            "converged": [bool(x) for x in self.converged],
            "products": int(self.products), "passes": int(self.passes), "restarts": int(self.restarts),
            "tol": float(self.tol), "floor": float(self.floor), "block_size": int(self.block_size),
            "max_basis": int(self.max_basis), "certified": bool(self.certified),
            "dtype": str(self.dtype).replace("torch.", ""), "seconds": float(self.seconds),
            "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float, str, bool))},
        }
        if vectors:
            d["vectors"] = self.eigenvectors.detach().to("cpu", torch.float64).tolist()
            if self.left_vectors is not None:
                d["left_vectors"] = self.left_vectors.detach().to("cpu", torch.float64).tolist()
        return d

    def __repr__(self) -> str:
        ev = self.eigenvalues
        head = ", ".join(f"{float(x):.6g}" for x in ev[:4]) + (", ..." if ev.numel() > 4 else "")
        return (f"EigResult(kind={self.kind!r}, k={self.k}, n={self.n}, values=[{head}], "
                f"converged={int(self.converged.sum())}/{self.k}, max_residual="
                f"{float(self.residuals.max()) if self.k else 0.0:.3g}, products={self.products}, "
                f"passes={self.passes}, method={self.method!r})")


# ---------------------------------------------------------------------------------------------------
# defaults

def default_block_size(k: int, n: int, explicit: bool = True) -> int:
    """Starting block width: ``min(k, 8, n)`` for an explicit matrix, ``1`` for a matrix-free operator.

    The trade-off is products against robustness and passes. A block of ``b`` vectors finds a cluster
    or repeated eigenvalue with up to ``b`` members in exact arithmetic, and a pass over a block is far
    cheaper per column than single products when ``A`` is an explicit matrix (one GEMM instead of ``b``
    GEMVs). But the Krylov degree per column drops with ``b``, so the number of products grows: for the
    top 32 pairs of an NTK-like spectrum, block 8 needs about 1.8x the products of block 1.

    * Explicit matrix (tensor, numpy array, ``.matrix``): products are cheap, so the default spends
      them on robustness: ``min(k, 8, n)``.
    * Matrix-free operator (``linft.NTKOperator``, a scipy ``LinearOperator``, anything with ``@``):
      every column costs a backward and a forward pass over the data, so the default is the
      product-optimal single-vector Lanczos, ``1``. Repeated eigenvalues then surface only through
      rounding; when two or more members of a tight cluster appear, :func:`eigsh` widens the block on its
      own (see ``block_size`` there), and ``block_size=m`` guarantees multiplicities up to ``m``.
    """
    if not explicit:
        return 1
    return max(1, min(k, 8, n))


def default_max_basis(k: int, b: int, n: int) -> int:
    """Basis size before a thick restart: ``max(3k, k + 8b, 48)``, at most ``n``."""
    return int(min(n, max(3 * k, k + 8 * b, 48)))


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance: 1e-8 for float64, 1e-5 for lower precisions (the floor of each
    precision takes over for pairs at the bottom of the spectrum)."""
    return 1e-8 if dtype == torch.float64 else 1e-5


# ---------------------------------------------------------------------------------------------------
# validation

def check_symmetric(a: torch.Tensor, name: str = "A", rtol: Optional[float] = None,
                    seed: int = 0) -> float:
    """Relative asymmetry ``||(A - A^T) X||_F / ||A X||_F`` on two random probe vectors (a norm-wise
    test at the cost of two products with ``A`` and two with ``A^T``, not counted); raises
    ``ValueError`` above ``rtol`` (default ``sqrt(eps)`` of the dtype). Any asymmetric part is detected
    with probability one."""
    n = a.shape[0]
    g = torch.Generator().manual_seed(int(seed) + 7919)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64).to(device=a.device, dtype=a.dtype)
    ax = a @ x
    d = ax - a.mT @ x
    den = float(torch.linalg.matrix_norm(ax.to(torch.float64)))
    if den == 0.0:
        return 0.0
    rel = float(torch.linalg.matrix_norm(d.to(torch.float64))) / den
    if rtol is None:
        rtol = math.sqrt(float(torch.finfo(a.dtype).eps))
    if rel > rtol:
        raise ValueError(f"{name} is not symmetric: ||(A - A^T) x|| / ||A x|| = {rel:.3g} > {rtol:.3g} "
                         "on random probes; ask for singular values (svds) or the symmetric part "
                         "(A + A^T)/2")
    return rel


# ---------------------------------------------------------------------------------------------------
# block orthogonalization

def _project_out(q: torch.Tensor, w: torch.Tensor, passes: int = 2):
    """``w -= q (q^T w)`` ``passes`` times; returns (w, accumulated coefficients in float64 on CPU)."""
    coef = torch.zeros(q.shape[1], w.shape[1], dtype=torch.float64)
    if q.shape[1] == 0 or w.shape[1] == 0:
        return w, coef
    for _ in range(passes):
        c = q.mT @ w
        w = w - q @ c
        coef += c.to("cpu", torch.float64)
    return w, coef


def _random_orthonormal(op: Operator, q: torch.Tensor, count: int, gen: torch.Generator,
                        room: int) -> torch.Tensor:
    """``count`` random orthonormal columns orthogonal to ``q`` (fewer if the space runs out)."""
    n = q.shape[0]
    count = min(count, room)
    if count <= 0:
        return q.new_zeros((n, 0))
    out = q.new_zeros((n, 0))
    for _ in range(4):
        need = count - out.shape[1]
        if need <= 0:
            break
        x = op.randn(n, need, gen)
        basis = torch.cat([q, out], dim=1)
        x, _ = _project_out(basis, x, passes=2)
        qx, rx = torch.linalg.qr(x)
        d = rx.diagonal().abs() if rx.numel() else rx.new_zeros(0)
        keep = d > 1e-3 * math.sqrt(n)
        qx = qx[:, keep]
        if qx.shape[1]:
            qx, _ = _project_out(basis, qx, passes=1)
            qx, _ = torch.linalg.qr(qx)
            out = torch.cat([out, qx], dim=1)
    return out


def _extend(op: Operator, q: torch.Tensor, w: torch.Tensor, width: int, brk: float,
            gen: torch.Generator):
    """Orthonormalize the (already twice projected) remainder ``w`` into a new block.

    Returns ``(qn, coef_extra, r, refilled)`` such that ``w = q coef_extra + qn r`` up to the dropped
    part below ``brk``: ``qn`` has ``width`` columns (or fewer when the space runs out), the last
    ``refilled`` of them random (their rows of ``r`` are zero).
    """
    n = q.shape[0]
    bu = w.shape[1]
    room = n - q.shape[1]
    width = min(width, room)
    coef_extra = torch.zeros(q.shape[1], bu, dtype=torch.float64)
    if width <= 0:
        return q.new_zeros((n, 0)), coef_extra, torch.zeros(0, bu, dtype=torch.float64), 0
    qw, rw = torch.linalg.qr(w)
    u, s, vh = torch.linalg.svd(rw.to("cpu", torch.float64))
    ngood = int(min(int((s > brk).sum()), width))
    qg = qw @ u[:, :ngood].to(device=qw.device, dtype=qw.dtype)
    rg = s[:ngood, None] * vh[:ngood]
    if ngood:
        # third pass on the normalized directions: w = q (g rg) + qg' (r3 rg)
        g = q.mT @ qg if q.shape[1] else None
        if g is not None:
            qg = qg - q @ g
            coef_extra += g.to("cpu", torch.float64) @ rg
        qg, r3 = torch.linalg.qr(qg)
        rg = r3.to("cpu", torch.float64) @ rg
    refill = width - ngood
    if refill:
        extra = _random_orthonormal(op, torch.cat([q, qg], dim=1), refill, gen, room - ngood)
        refill = extra.shape[1]
        qn = torch.cat([qg, extra], dim=1)
        r = torch.cat([rg, torch.zeros(refill, bu, dtype=torch.float64)], dim=0)
    else:
        qn, r = qg, rg
    return qn, coef_extra, r, refill


# ---------------------------------------------------------------------------------------------------
# cluster detection for on-demand widening

#: two Ritz values belong to one cluster when they differ by at most this much, relative
CLUSTER_RTOL = 1e-3


def _saturated_cluster(theta: torch.Tensor, res: torch.Tensor, tol: float, floor: float, b: int,
                       log: list, pass_no: int):
    """Largest tight cluster of settled wanted Ritz values with at least ``max(b, 2)`` members.

    A Ritz value is settled when its residual estimate is below ``max(min(sqrt(tol), 1e-4) |theta|,
    floor)`` (so it is accurate to well within the cluster width). Values within a few accuracy floors
    of zero are ignored: they are the numerically null space, where any orthonormal basis is right.
    Appends this pass's settled values to ``log`` and returns ``(members, first)``, ``first`` being the
    earliest pass at which a settled value lay inside the cluster (how long the Krylov space took to
    resolve it), or ``(0, 0)`` when no cluster saturates the block.
    """
    lvl = min(math.sqrt(tol), 1e-4)
    ok = (res <= torch.clamp(lvl * theta.abs(), min=floor)) & (theta.abs() > 4 * floor)
    vals = sorted((float(x) for x in theta[ok]), reverse=True)
    log.append((pass_no, vals))
    best, lo, hi = 0, 0.0, 0.0
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and (vals[j] - vals[j + 1]
                                     <= CLUSTER_RTOL * max(abs(vals[j]), abs(vals[j + 1])) + floor):
            j += 1
        if j - i + 1 >= max(b, 2) and j - i + 1 > best:
            best, hi, lo = j - i + 1, vals[i], vals[j]
        i = j + 1
    if not best:
        return 0, 0
    pad = CLUSTER_RTOL * max(abs(hi), abs(lo)) + floor
    first = next(p for p, vs in log if any(lo - pad <= v <= hi + pad for v in vs))
    return best, first


# ---------------------------------------------------------------------------------------------------
# dense path

def _dense(op: Operator, k: int, which: str, t0: float) -> EigResult:
    a = op.explicit
    a64 = a.to(torch.float64)
    a64 = 0.5 * (a64 + a64.mT)
    evals, evecs = torch.linalg.eigh(a64)
    n = a.shape[0]
    idx = torch.arange(n - 1, n - 1 - k, -1) if which == "largest" else torch.arange(k - 1, -1, -1)
    idx = idx.to(evals.device)
    theta = evals[idx]
    v = evecs[:, idx]
    res = torch.linalg.vector_norm(a64 @ v - v * theta, dim=0)
    anorm = float(evals.abs().max())
    floor = accuracy_floor(n, op.dtype, anorm)
    wd = op.work_dtype
    return EigResult(eigenvalues=theta.to("cpu"), eigenvectors=v.to(wd), residuals=res.to("cpu"),
                     converged=torch.ones(k, dtype=torch.bool), products=0, passes=0, method="dense",
                     which=which, tol=0.0, floor=floor, certified=True, dtype=op.dtype, n=n,
                     seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# main entry

def eigsh(A: Any, k: int = 6, *, which: str = "largest", block_size: Optional[int] = None,
          tol: Optional[float] = None, max_passes: Optional[int] = None,
          max_basis: Optional[int] = None, seed: int = 0, v0: Optional[torch.Tensor] = None,
          method: str = "lanczos", certify: Union[bool, str] = "auto",
          check_symmetry: bool = True) -> EigResult:
    """Top-``k`` (or bottom-``k``) eigenpairs of a symmetric matrix or operator.

    Args:
        A: torch tensor / numpy array ``(N, N)`` (symmetric), an object with ``.matrix``, or an operator
            with ``.shape`` and ``@`` on ``(N, b)`` blocks (see :mod:`.operators`).
        k: number of pairs, ``1 <= k <= N``.
        which: ``"largest"`` (algebraically largest; the top of a PSD spectrum) or ``"smallest"``.
        block_size: block width ``b``. Given: fixed; a cluster or repeated eigenvalue with more than
            ``b`` members is found only through rounding, so raise it when multiplicities above ``b``
            are expected. Default (``None``): :func:`default_block_size`, i.e. ``min(k, 8)`` for an
            explicit matrix and ``1`` for a matrix-free operator (fewest products), **widened on
            demand**: whenever a tight cluster (relative width ``1e-3``) of settled wanted Ritz values
            has at least as many members as the block is wide, fresh random columns orthogonal to the
            basis join the block (width ``max(2b, members + b)``, at most ``k``), and the run does not
            stop before the widened block has gone as many passes as the cluster took to appear, so
            members a narrower block could not see get the chance to. ``info["widenings"]`` counts
            these events; spectra without tight clusters never pay for it.
        tol: relative residual tolerance (default 1e-8 in float64, 1e-5 otherwise).
        max_passes: maximum block applications of ``A`` (each one pass over the data for a matrix-free
            NTK), certification excluded. Default ``max(100, 10 N / b)`` capped sensibly.
        max_basis: basis columns before a thick restart (default :func:`default_max_basis`).
        seed: seed of the random start (CPU generator; same result on every run).
        v0: optional ``(N,)`` or ``(N, j)`` start vectors, completed with random ones.
        method: ``"lanczos"``, ``"dense"`` (fp64 ``eigh``, explicit matrices only) or ``"auto"`` (dense
            for explicit matrices with ``N <= 256`` or when the Krylov basis would span half the space).
        certify: how ``residuals`` are obtained. ``"auto"`` (default): ``"product"`` for an explicit
            matrix, ``"stored"`` for a matrix-free operator (where each product is expensive).
            ``True`` / ``"product"``: one extra product
            ``A V`` on the ``k`` returned vectors (``k`` more products). ``"stored"``: no extra
            product; the raw products ``A Q`` are kept beside the basis (twice the memory) and
            ``A V = (A Q) Y`` by linearity, which is again computed from the operator's own outputs
            and so does not rely on the Lanczos recurrence. ``False``: Ritz estimates
            ``||H_{u,a} y||`` only (``certified=False``).
        check_symmetry: for explicit matrices, raise if ``A`` is not symmetric.

    Returns:
        :class:`EigResult` with eigenvalues in descending order.
    """
    t0 = time.perf_counter()
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if method not in ("lanczos", "dense", "auto"):
        raise ValueError(f"method must be 'lanczos', 'dense' or 'auto', got {method!r}")
    op = as_operator(A)
    n = op.require_square()
    k = check_k(k, n)
    prod0, pass0 = op.products, op.passes
    if op.explicit is not None and check_symmetry:
        check_symmetric(op.explicit, op.name)

    explicit = op.explicit is not None
    adaptive = block_size is None
    b = int(block_size) if block_size is not None else default_block_size(k, n, explicit)
    if b < 1:
        raise ValueError(f"block_size must be at least 1, got {b}")
    b = min(b, n)
    nmax = int(max_basis) if max_basis is not None else default_max_basis(k, b, n)
    nmax = min(n, max(nmax, k + 2 * b, k + 1))
    if tol is None:
        tol = default_tol(op.dtype)
    tol = float(tol)
    if not (tol >= 0.0) or math.isinf(tol):
        raise ValueError(f"tol must be a finite non-negative number, got {tol}")
    if max_passes is None:
        max_passes = int(max(100, min(10 * math.ceil(n / b), 2000)))
    max_passes = int(max_passes)
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1, got {max_passes}")

    if method == "dense" and op.explicit is None:
        raise ValueError("method='dense' needs an explicit matrix, got an operator")
    if method == "auto":
        method = "dense" if op.explicit is not None and (n <= 256 or 2 * nmax >= n) else "lanczos"
    if certify is True:
        certify = "product"
    if isinstance(certify, str) and certify == "auto":
        certify = "product" if explicit else "stored"
    if certify not in ("product", "stored", False):
        raise ValueError(f"certify must be 'auto', True, 'product', 'stored' or False, got "
                         f"{certify!r}")
    if method == "dense":
        return _dense(op, k, which, t0)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    wd = op.work_dtype
    dev = op.device
    eps_work = float(torch.finfo(wd).eps)

    # ---- initial block
    x = op.randn(n, b, gen)
    if v0 is not None:
        v0 = torch.as_tensor(v0).to(device=dev, dtype=wd)
        if v0.dim() == 1:
            v0 = v0[:, None]
        if v0.dim() != 2 or v0.shape[0] != n:
            raise ValueError(f"v0 must have {n} rows, got shape {tuple(v0.shape)}")
        if not bool(torch.isfinite(v0).all()):
            raise ValueError("v0 contains non-finite values")
        j = min(v0.shape[1], b)
        x[:, :j] = v0[:, :j]
    empty = torch.zeros(n, 0, dtype=wd, device=dev)
    q0, _, _, _ = _extend(op, empty, x, b, 0.0, gen)
    if q0.shape[1] < b:  # degenerate v0
        q0 = torch.cat([q0, _random_orthonormal(op, q0, b - q0.shape[1], gen, n - q0.shape[1])], 1)

    cap = nmax + b
    # column-major (n, cap) buffers: a slice of leading columns is contiguous, so Q^T W and Q C run as
    # plain GEMMs without copies
    qbuf = torch.zeros(cap, n, dtype=wd, device=dev).mT
    hbuf = torch.zeros(cap, cap, dtype=torch.float64)
    awbuf = torch.zeros(cap, n, dtype=wd, device=dev).mT if certify == "stored" else None
    # on-demand widening (default block size only): settled wanted Ritz values per pass, to date when a
    # cluster appeared; the run may not stop before pass `hold`
    bmax = min(k, n) if adaptive else b
    b0 = b
    widenings = 0
    hold = 0
    settled_log: list = []
    qbuf[:, :b] = q0
    na, nt = 0, b          # applied columns, total columns
    restarts = 0
    refills = 0
    anorm = 0.0
    theta = y = None
    res_est = None
    passes_used = 0

    def select(evals: torch.Tensor) -> torch.Tensor:
        m = evals.numel()
        return torch.arange(m - 1, -1, -1) if which == "largest" else torch.arange(m)

    while True:
        u = qbuf[:, na:nt]
        w = op.matmat(u)
        passes_used += 1
        # ||A u_j|| <= ||A||: a lower bound on the norm before any Ritz value is known
        anorm = max(anorm, float(torch.linalg.vector_norm(w, dim=0).max()))
        if awbuf is not None:
            awbuf[:, na:nt] = w
        q = qbuf[:, :nt]
        w, coef = _project_out(q, w, passes=2)
        bu = nt - na
        hbuf[:nt, na:nt] = coef
        na = nt
        # new block from the remainder (breakdown: directions below `brk` are refilled at random)
        width = min(b, n - nt)
        if width > 0:
            brk = max(accuracy_floor(n, op.dtype, anorm), 10 * eps_work * anorm * math.sqrt(na))
            qn, cextra, r, nref = _extend(op, q, w, width, brk, gen)
            refills += nref
            hbuf[:nt, na - bu:na] += cextra
            rows = qn.shape[1]
            qbuf[:, nt:nt + rows] = qn
            hbuf[nt:nt + rows, :na] = 0.0
            hbuf[nt:nt + rows, na - bu:na] = r
            nt += rows
        # Rayleigh-Ritz on the applied part (fp64, CPU)
        t = hbuf[:na, :na]
        t = 0.5 * (t + t.mT)
        evals, evecs = torch.linalg.eigh(t)
        order = select(evals)
        theta = evals[order]
        y = evecs[:, order]
        anorm = max(anorm, float(evals.abs().max()))
        floor = accuracy_floor(n, op.dtype, anorm)
        # residual estimates of the wanted pairs
        kk = min(k, na)
        coupling = hbuf[na:nt, :na]
        if nt > na:
            res_est = torch.linalg.vector_norm(coupling @ y[:, :kk], dim=0)
        else:
            res_est = torch.zeros(kk, dtype=torch.float64)
        thr = torch.clamp(tol * theta[:kk].abs(), min=floor)
        done = kk == k and bool((res_est <= thr).all())
        if adaptive and b < bmax and nt < n:
            size, first = _saturated_cluster(theta[:kk], res_est, tol, floor, b, settled_log,
                                             passes_used)
            if size:
                bnew = int(min(bmax, max(2 * b, size + b), n - na))
                add = bnew - (nt - na)
                if add > 0:
                    need = min(n, max(nmax, default_max_basis(k, bnew, n))) + bnew
                    if need > cap:  # grow the buffers, keeping their column-major layout
                        q2 = torch.zeros(need, n, dtype=wd, device=dev).mT
                        q2[:, :nt] = qbuf[:, :nt]
                        h2 = torch.zeros(need, need, dtype=torch.float64)
                        h2[:cap, :cap] = hbuf
                        if awbuf is not None:
                            a2 = torch.zeros(need, n, dtype=wd, device=dev).mT
                            a2[:, :na] = awbuf[:, :na]
                            awbuf = a2
                        qbuf, hbuf, cap = q2, h2, need
                        nmax = need - bnew
                    extra = _random_orthonormal(op, qbuf[:, :nt], add, gen, n - nt)
                    got = extra.shape[1]
                    if got:
                        # new unapplied columns: no coupling to the applied ones yet, so the Krylov
                        # decomposition A Q_a = Q_a H + Q_u C still holds with zero rows of C
                        qbuf[:, nt:nt + got] = extra
                        hbuf[nt:nt + got, :] = 0.0
                        hbuf[:, nt:nt + got] = 0.0
                        nt += got
                        refills += got
                        widenings += 1
                        b = nt - na
                        hold = max(hold, passes_used + max(first, 2))
                        done = False
        if passes_used < hold:
            done = False
        if done or na >= n or nt == na or passes_used >= max_passes:
            break
        # thick restart when the next block would not fit
        if nt + min(b, n - nt) > cap:
            p = min(na - 1, max(k + max(b, (nmax - k - b) // 2), k))
            p = max(p, min(k, na))
            keep = y[:, :p].to(device=dev, dtype=wd)
            qa = qbuf[:, :na] @ keep
            qu = qbuf[:, na:nt].clone()
            cu = hbuf[na:nt, :na] @ y[:, :p]  # (rows added by a widening are zero)
            bu2 = nt - na
            qbuf.zero_()
            hbuf.zero_()
            if awbuf is not None:
                awa = awbuf[:, :na] @ keep
                awbuf.zero_()
                awbuf[:, :p] = awa
            qbuf[:, :p] = qa
            qbuf[:, p:p + bu2] = qu
            hbuf[:p, :p] = torch.diag(theta[:p])
            hbuf[p:p + bu2, :p] = cu
            na, nt = p, p + bu2
            restarts += 1

    # ---- final Ritz vectors and certification
    kk = min(k, na)
    v = qbuf[:, :na] @ y[:, :kk].to(device=dev, dtype=wd)
    if kk < k:  # cannot happen for n >= k, kept for safety
        v = torch.cat([v, _random_orthonormal(op, v, k - kk, gen, n - kk)], dim=1)
    if certify:
        av = op.matmat(v) if certify == "product" else awbuf[:, :na] @ y[:, :kk].to(device=dev,
                                                                                   dtype=wd)
        v64 = v.to(torch.float64)
        av64 = av.to(torch.float64)
        th = (v64 * av64).sum(0)
        res = torch.linalg.vector_norm(av64 - v64 * th, dim=0).to("cpu")
        th = th.to("cpu")
    else:
        th = theta[:k].clone()
        res = res_est.clone()
    order = torch.argsort(th, descending=True)
    th, res = th[order], res[order]
    v = v[:, order.to(v.device)]
    floor = accuracy_floor(n, op.dtype, max(anorm, float(th.abs().max())))
    conv = res <= torch.clamp(tol * th.abs(), min=floor)
    return EigResult(eigenvalues=th, eigenvectors=v, residuals=res, converged=conv,
                     products=op.products - prod0, passes=op.passes - pass0, restarts=restarts,
                     method="block-lanczos",
                     which=which, kind="eigenvalues", tol=tol, floor=floor, block_size=b,
                     max_basis=nmax, certified=bool(certify), dtype=op.dtype, n=n,
                     seconds=time.perf_counter() - t0,
                     info={"refilled_columns": refills, "basis_columns": na,
                           "widenings": widenings, "initial_block_size": b0,
                           "final_block_size": b,
                           "certification": certify or "estimate",
                           "exhausted_space": na >= n})
