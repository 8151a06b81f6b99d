"""linft_kernels: the accelerated backend of linft.

Ops (see DESIGN.md section 3): `gram`, `ghost_gram`, `psg_gram`; each has a pure-torch reference, a
native CPU kernel, a Triton kernel and a native CUDA kernel, chosen per call by `_dispatch`.
Importing this package never initializes CUDA and needs no compiler; `python -m linft_kernels` prints
what is available and why the rest is not.
"""
from ._dispatch import BACKENDS, BackendUnavailable
from .ops import ghost_gram, gram, psg_gram

__version__ = "0.1.0"
__all__ = ["gram", "ghost_gram", "psg_gram", "BACKENDS", "BackendUnavailable", "__version__"]
