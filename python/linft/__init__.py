"""linft: empirical neural tangent kernels of fine-tuned language models.

The analysis layer (capture, NTK planner, spectra, fine-tuning comparison, CLI) on top of the
accelerated kernels in `linft_kernels`. See DESIGN.md for the mathematics and the public contract.
"""
from . import outputs
from .engine import empirical_ntk
from .ntk import NTK
from .operator import NTKOperator, ntk_operator
from .spectrum import (Spectrum, condition_number, conditioning, effective_rank, ridge_condition,
                       singular_values, spectral_density, spectrum)

__version__ = "0.1.0"

__all__ = ["empirical_ntk", "NTK", "ntk_operator", "NTKOperator", "outputs", "spectrum", "Spectrum",
           "singular_values", "conditioning", "condition_number", "ridge_condition", "spectral_density",
           "effective_rank", "__version__"]
