"""Triton kernels of linft_kernels: gram, ghost_gram, psg_gram.

Launchers take torch tensors already validated by the dispatch layer (contiguous, same device) and add
their result into `out` (fp32 or fp64, which sets the accumulator precision). Importing this package
never touches CUDA. Set TRITON_INTERPRET=1 before import to run the kernels on CPU.

Block shapes (see _autotune): on a GPU gram, ghost_gram and psg_gram's features kernel are autotuned
among short config lists per dtype family ("16bit", "fp32", "fp64"), keyed by a power-of-two size
bucket of their problem sizes, with accumulated outputs restored between trials; `blocks=` fixes them.
In the interpreter they use fixed blocks unless LINFT_TRITON_AUTOTUNE=1 is set at call time, which runs
the same autotune path over small configs timed on the CPU (time.perf_counter). `_compile.compile_all`
compiles every GPU config for sm_90 without a GPU.
"""
from .gram import gram, gram_kernel
from .ghost_gram import ghost_gram, ghost_gram_kernel
from .psg_gram import KERNEL_CODES, psg_features_kernel, psg_gram

__all__ = ["gram", "ghost_gram", "psg_gram", "KERNEL_CODES",
           "gram_kernel", "ghost_gram_kernel", "psg_features_kernel"]
