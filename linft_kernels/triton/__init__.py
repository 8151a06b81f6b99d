"""Triton kernels of linft_kernels: gram, ghost_gram, psg_gram.

Launchers take torch tensors already validated by the dispatch layer (contiguous, same device) and add
their result into `out` (fp32 or fp64, which sets the accumulator precision). Importing this package
never touches CUDA. Set TRITON_INTERPRET=1 before import to run the kernels on CPU.
"""
from .gram import gram, gram_kernel
from .ghost_gram import ghost_gram, ghost_gram_kernel
from .psg_gram import KERNEL_CODES, psg_features_kernel, psg_gram

__all__ = ["gram", "ghost_gram", "psg_gram", "KERNEL_CODES",
           "gram_kernel", "ghost_gram_kernel", "psg_features_kernel"]
