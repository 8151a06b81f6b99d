"""Choice of backend per op call.

Order: explicit ``backend=`` argument, else the ``LINFT_BACKEND`` environment variable, else auto:
CUDA tensors -> the order measured fastest for the op and output dtype (`_CUDA_ORDER`), native CUDA
first where nothing was measured; CPU tensors -> native CPU, else reference. An explicit request that
cannot be met raises `BackendUnavailable` with the reason; an automatic fall-back logs once per
(op, device, reason).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from . import _native

BACKENDS = ("reference", "cpu", "cuda", "triton")
log = logging.getLogger("linft_kernels")
_logged: set = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        importlib.import_module("linft_kernels.triton")
    except Exception as e:  # a broken triton install must not break the other backends
        return f"importing the Triton kernels failed: {type(e).__name__}: {e}"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors of `device`, else a sentence saying why not."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got {device.type} tensors"
        if _native.cpu_lib() is None:
            return f"the native CPU library is not available ({_native.load_error('_C_cpu')})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device.type} tensors"
        if _native.cuda_lib() is None:
            return f"the native CUDA library is not available ({_native.load_error('_C_cuda')})"
        if _native.cuda_device_count() == 0:
            return "the native CUDA library sees no GPU"
        return None
    # triton
    if device.type == "cuda" and not triton_interpret() and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if device.type == "cpu" and not triton_interpret():
        return "backend 'triton' needs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"backend 'triton' does not support {device.type} tensors"
    return _triton_import_error()


# Auto order on CUDA tensors, per (op, output dtype), from the H200 runs in bench/results/cuda-h200-*:
# * gram into fp32: the autotuned Triton kernel (bf16 N=4096, P=65536: 2.6 ms, the tensor-core CUDA C++
#   kernel 4.4 ms, torch a@a.T 2.9 ms; fp32: on par). fp64 outputs were not timed: native first.
# * ghost_gram and psg_gram (bf16, 2026-11-27 second session): the Triton kernels won at the large
#   shapes (N=256, T=256, d=1024: ghost 8.2 ms, psg 7.7 ms, against CUDA C++ 9.6 / 9.2 and the
#   reference's chunked cuBLAS 26.7 / 26.3; cross shapes alike) and all three were within 0.2 ms at
#   N=64, T=128, d=512. ghost_gram with T=16 and N=1024: Triton 21 ms, reference 28, CUDA C++ 176.
#   fp32 inputs were not timed with these kernels; the order is the bf16 one. psg_gram with 16-bit
#   tiles on the Triton backend builds F by cuBLAS and takes its Gram from the Triton gram
#   (ops._psg_gemm_then_triton_gram; third session, N=256, T=256, d=1024: F by cuBLAS 0.30 ms, by the
#   Triton features kernel about twice that; the Triton gram of all of F 0.28 ms, cuBLAS's 0.27 ms;
#   the whole op with cuBLAS's Gram 0.56 ms against 0.91 ms for the Triton kernels). fp64 outputs
#   (untimed) keep the reference first: its products run as cuBLAS fp64 GEMMs, the kernels' on CUDA-core loops.
_CUDA_ORDER = {
    ("gram", torch.float32): ("triton", "cuda", "reference"),
    ("ghost_gram", torch.float32): ("triton", "reference", "cuda"),
    ("psg_gram", torch.float32): ("triton", "cuda", "reference"),
    ("ghost_gram", None): ("reference", "triton", "cuda"),
    ("psg_gram", None): ("reference", "triton", "cuda"),
}


def _auto_order(device: torch.device, op: str | None = None, out_dtype: torch.dtype | None = None) -> tuple[str, ...]:
    if device.type == "cuda":
        return _CUDA_ORDER.get((op, out_dtype)) or _CUDA_ORDER.get((op, None)) or ("cuda", "triton", "reference")
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def resolve(op: str, device: torch.device, backend: str | None, out_dtype: torch.dtype | None = None) -> str:
    """The backend that runs `op` on tensors of `device` into an `out_dtype` result."""
    requested = backend or os.environ.get("LINFT_BACKEND") or "auto"
    if requested != "auto":
        reason = unavailable_reason(requested, device)
        if reason is not None:
            source = "backend=" if backend else "LINFT_BACKEND="
            raise BackendUnavailable(f"{op}: {source}{requested!r} cannot run: {reason}")
        return requested
    order = _auto_order(device, op, out_dtype)
    for name in order:
        reason = unavailable_reason(name, device)
        if reason is None:
            if name != order[0]:
                key = (op, device.type, name)
                if key not in _logged:
                    _logged.add(key)
                    why = unavailable_reason(order[0], device)
                    log.warning("linft_kernels.%s: using the %r backend on %s tensors because %s",
                                op, name, device.type, why)
            return name
    raise AssertionError("the reference backend is always available")  # pragma: no cover


def table() -> dict[str, dict[str, str]]:
    """{backend: {device: 'yes' or the reason}} for the diagnostic."""
    devices = [torch.device("cpu"), torch.device("cuda")]
    return {b: {d.type: (unavailable_reason(b, d) or "yes") for d in devices} for b in BACKENDS}


# Under torch.compile the choice is evaluated once while tracing and becomes a constant of the graph.
# This is what `torch.compiler.assume_constant_result` does; setting the mark directly avoids importing
# torch._dynamo (and through it triton) when linft_kernels is imported. test_compile_fullgraph fails if
# the mark stops working.
resolve._dynamo_marked_constant = True
