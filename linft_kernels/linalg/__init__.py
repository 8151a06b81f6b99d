"""Spectral engine of linft: eigenpairs, singular values, conditioning and spectral density of kernel
matrices or matrix-free operators.

* :func:`eigsh` - top-k (or bottom-k) eigenpairs by thick-restart randomized block Lanczos with full
  reorthogonalization (twice, as matrix products), breakdown refill, fp64 Rayleigh-Ritz and certified
  residuals (:mod:`.lanczos`).
* :func:`svds` - singular triplets of asymmetric/rectangular kernels by the same machinery (normal
  equations or block Golub-Kahan) (:mod:`.svd`).
* :func:`conditioning` - lambda_max, lambda_min, kappa and ridge condition with an honest resolution
  limit (:mod:`.conditioning`).
* :func:`slq` - stochastic Lanczos quadrature spectral density, optionally deflated (:mod:`.density`).
* :func:`trace`, :func:`diagonal`, :func:`effective_rank` - cheap exact quantities (:mod:`.exact`).
* :func:`as_operator` - the operator adapter all of them use (:mod:`.operators`).

Everything accepts a torch tensor (any device), a numpy array, an object with ``.matrix``, or an
operator with ``.shape`` and ``@`` on ``(N, b)`` blocks. Nothing here imports linft, transformers or peft,
or initializes CUDA.
"""

from .conditioning import (Conditioning, condition_number, conditioning, lambda_max, lambda_min,
                           ridge_condition)
from .density import SpectralDensity, slq
from .exact import diagonal, effective_rank, frobenius_norm, trace
from .lanczos import EigResult, check_symmetric, eigsh
from .operators import Operator, accuracy_floor, as_operator
from .svd import svds

__all__ = [
    "EigResult", "eigsh", "svds", "check_symmetric",
    "Conditioning", "conditioning", "condition_number", "ridge_condition", "lambda_max", "lambda_min",
    "SpectralDensity", "slq",
    "trace", "diagonal", "frobenius_norm", "effective_rank",
    "Operator", "as_operator", "accuracy_floor",
]
