"""linft: empirical neural tangent kernels of fine-tuned language models.

The analysis layer (capture, NTK planner, spectra, fine-tuning comparison, CLI) on top of the
accelerated kernels in `linft_kernels`. See DESIGN.md for the mathematics and the public contract.
"""
from . import outputs
from .engine import empirical_ntk
from .ntk import NTK
from .operator import NTKOperator, ntk_operator

__version__ = "0.1.0"

__all__ = ["empirical_ntk", "NTK", "ntk_operator", "NTKOperator", "outputs", "__version__"]
