"""FLOP counts of the linft_kernels ops and of the end-to-end NTK, written down once.

Conventions (every count below is in FLOP, one multiply-add = 2 FLOP):

* The count of an op is a property of the *mathematical problem and a stated algorithm*, not of the
  implementation being timed. Baseline and candidate of one row share the count, so
  ``achieved_gflops = flops / median_s`` is directly comparable between them, and a kernel that
  skips work (symmetry, a cheaper algorithm) shows up as a higher achieved rate than the machine
  could deliver on the counted work.
* Masks are ignored (every token counted as real); the benchmark inputs have no padding.

gram
    ``out = a @ b.T`` with a (N, P), b (M, P): 2*N*M*P.
    Symmetric form (b None): counted as the *useful* N^2*P multiply-adds, 2*N^2*P, although the
    symmetric kernel computes only the upper tiles (about N(N+1)/2*P multiply-adds). This is the
    count of the ``a @ a.T`` baseline, so the symmetric kernel can reach up to ~2x the machine peak.

ghost_gram
    Counted as the *smaller* of its two exact algorithms' counts, since the op itself takes the route
    with fewer multiply-adds (`linft_kernels.ops.ghost_route`):
    - the *ghost algorithm*: for each pair (i, j) the T x S products X_i X_j^T (d_in) and
      G_i G_j^T (d_out), then their elementwise product summed: 2*N*M*T*S*(d_in + d_out)
      (+ N*M*T*S for the final multiply-sum, included); symmetric: N = M, the full N^2 pairs counted;
    - *materializing*: the `psg_gram` count below (far cheaper for long sequences).
    `flops` is min(ghost, materialize); the harness rows also carry both (`flops_ghost`,
    `flops_materialize`). `ghost_route` counts half the pairs of the symmetric form, so near the
    crossover the op's route and the smaller count can differ. The `ghost_gram` rows in bench/results/
    (up to and including the third H200 session, 2026-11-27) predate this count and count the ghost
    algorithm alone (their `flop_count` says so).

psg_gram
    Counted as the *materialize* algorithm: per-sample gradients F_i = G_i^T X_i (2*T*d_in*d_out per
    sample, built once per distinct sample: N in the symmetric form, N + M in the cross form), then
    the Gram of the flattened F: 2*N*M*d_in*d_out. The sign kernels add no multiply-adds.

NTK end to end
    Not a FLOP-rate benchmark: the rows report time, the NTK cost ratio (NTK time / one forward+backward
    over the same samples) and peak memory. `ntk_contraction` gives the multiply-add count of the
    kernel contraction itself (N*C)^2 * P, for context.
"""
from __future__ import annotations


def gram(N: int, P: int, M: int | None = None) -> dict:
    """FLOP of ``a @ b.T`` (M given) or of the symmetric ``a @ a.T`` (useful work, 2*N^2*P)."""
    if M is None:
        return {"flops": 2.0 * N * N * P, "flop_count": "useful 2*N^2*P (symmetric; ~half is computed)"}
    return {"flops": 2.0 * N * M * P, "flop_count": "2*N*M*P"}


def ghost_gram(N: int, T: int, d_in: int, d_out: int, M: int | None = None, S: int | None = None) -> dict:
    """FLOP of ghost_gram's useful work: the cheaper of its two algorithms, the ghost one,
    2*N*M*T*S*(d_in+d_out) + N*M*T*S (full N*M pairs), and materializing (`psg_gram`), as the op
    takes the cheaper route. (Rows before 2026-11-27's third GPU session counted the ghost algorithm
    alone, so a row that materialized showed over 100% of the GEMM rate.)"""
    mat = psg_gram(N, T, d_in, d_out, M, S)["flops"]
    M = N if M is None else M
    S = T if S is None else S
    pairs = float(N) * M * T * S
    ghost = 2.0 * pairs * (d_in + d_out) + pairs
    return {"flops": min(ghost, mat),
            "flop_count": "min(ghost 2*N*M*T*S*(d_in+d_out) + N*M*T*S, materialize)",
            "flops_ghost": ghost, "flops_materialize": mat}


def psg_gram(N: int, T: int, d_in: int, d_out: int, M: int | None = None, S: int | None = None) -> dict:
    """FLOP of the materialize algorithm: build F once per distinct sample, then the Gram of F."""
    symmetric = M is None
    M = N if M is None else M
    S = T if S is None else S
    build = 2.0 * N * T * d_in * d_out + (0.0 if symmetric else 2.0 * M * S * d_in * d_out)
    return {"flops": build + 2.0 * N * M * d_in * d_out,
            "flop_count": "materialize 2*(N*T + [M*S]) *d_in*d_out + 2*N*M*d_in*d_out"}


def ntk_contraction(N: int, C: int, P: int) -> float:
    """FLOP of J J^T for J (N*C, P): 2*(N*C)^2*P (useful work, as for gram)."""
    return 2.0 * (N * C) ** 2 * P


def gemm(n: int, m: int | None = None, k: int | None = None) -> float:
    """FLOP of an (n x k) @ (k x m) matrix product, square by default."""
    m = n if m is None else m
    k = n if k is None else k
    return 2.0 * n * m * k
