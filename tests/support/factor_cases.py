"""Random layer factors (x, g, mask) with odd shapes, shared by the ghost_gram and psg_gram tests."""
from linft_testing import randn, random_mask

# (N, M, T, S, d_in, d_out): T=1, N=1, N != M, T != S, sizes that are multiples of no block.
CASES = [(1, 1, 1, 1, 1, 1), (1, 3, 1, 4, 5, 3), (7, 7, 9, 9, 13, 6), (5, 8, 17, 11, 33, 19),
         (12, 12, 20, 20, 40, 24)]
SMALL = [(1, 1, 1, 1, 1, 1), (3, 4, 5, 6, 17, 9), (6, 6, 7, 7, 20, 18)]


def cases(backend):
    return SMALL if backend == "triton" else CASES


def make(case, dtype, device, symmetric, masked):
    N, M, T, S, d_in, d_out = case
    x1, g1 = randn(N, T, d_in, dtype=dtype, device=device), randn(N, T, d_out, dtype=dtype, device=device)
    m1 = random_mask(N, T, device) if masked else None
    if symmetric:
        return x1, g1, m1, None, None, None
    x2, g2 = randn(M, S, d_in, dtype=dtype, device=device), randn(M, S, d_out, dtype=dtype, device=device)
    m2 = random_mask(M, S, device, padded_sample=False) if masked else None
    return x1, g1, m1, x2, g2, m2
