"""Choice of backend per op call.

Order: explicit ``backend=`` argument, else the ``LINFT_BACKEND`` environment variable, else auto:
CUDA tensors -> the order measured fastest for the op, the output dtype, whether the inputs suit the
native kernels' tensor cores and (ghost_gram) the route (`_CUDA_ORDER`), native CUDA first where
nothing was measured; CPU tensors -> native CPU, else reference. An explicit request that cannot be met
raises `BackendUnavailable` with the reason; an automatic fall-back logs once per (op, device, reason).
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


# Auto order on CUDA tensors, per (op, output dtype[, "tensor cores" | "ghost route"]), from the H200
# runs in bench/results/cuda-h200-* (seventh session; synchronous per-call median / do_bench median).
# "tensor cores": 16-bit inputs shaped for the native CUDA kernels' tensor-core paths (row widths
# multiples of 8, 16-byte aligned: ops._tensor_core_shaped) on a GPU where the native library runs
# them (`_cuda_tensor_core_path`); other inputs would run the native kernels' CUDA-core loops.
# * gram, tensor cores, into fp32: the native CUDA kernel where it runs on wgmma (an H100/H200 with the
#   library's sm_90a code), else the autotuned Triton kernel. bf16 N=4096, P=65536: CUDA wgmma 2.42 /
#   2.14 ms, Triton 2.72 / 2.52, torch a@a.T 2.85 / 2.84; N=256, P=786432 (the NTK's feature Grams):
#   0.64 / 0.18 against 0.62 / 0.21; N=16384, P=32768: 20.8 against 20.2 (Triton 3% ahead). On
#   mma.sync (older GPUs, LINFT_CUDA_GRAM_WGMMA=0) it ran 4.4 ms at N=4096. fp16 was not timed: the bf16
#   order. Other inputs (fp32: on par with CUDA C++ in the third session): Triton first. fp64 outputs
#   were not timed: native first.
# * ghost_gram, tensor cores, into fp32 (bf16; the op, whose auto route materializes per-sample
#   gradients at the last three shapes): CUDA C++ first. N=1024, T=16, d=1024: CUDA 4.9 / 3.9 ms,
#   Triton 23.1 / 22.4; N=256, M=128, T=256: 7.4 / 5.7 against 8.2 / 7.2; N=64, T=128, d=512: 0.87 /
#   0.21 against 0.92 / 0.64; N=256, T=256, d=1024: 7.8 / 5.6 against 7.3 / 6.1 (mixed).
# * ghost_gram, other inputs into fp32: Triton, then the reference (chunked cuBLAS), where the op
#   materializes per-sample gradients: fp32 N=256, T=256, d=1024: Triton 9.0 / 8.2 ms, reference 14.1,
#   CUDA C++ 13.1; cross N=256, M=128: 9.8 / 11.1 / 16.0; N=64, T=128, d=512: 1.0 / 0.8 / 1.1 ms. Where
#   it takes the T x S ghost route (short sequences, `ops.ghost_route`), the reference first: its T x S
#   products are cuBLAS GEMMs over many pairs at once, the kernels' CUDA-core loops per pair; fp32
#   N=1024, T=16, d=1024: reference 24.6 ms (88% of the fp32 GEMM rate), CUDA C++ 175, Triton 318.
# * psg_gram into fp32: Triton first. With F in fp32 the two are within 15% either way, but Triton's
#   signgd builds its exact signs in 16 bits: bf16 N=256, T=256, d=1024 signgd 1.5 ms against CUDA
#   C++ 6.8. psg_gram with 16-bit tiles on the Triton backend builds F by cuBLAS and takes its Gram
#   from the Triton gram (ops._psg_gemm_then_triton_gram; N=256, T=256, d=1024: 1.52 ms synchronous,
#   0.64 ms by do_bench: 54.5% of the bf16 GEMM rate).
# * fp64 outputs of ghost_gram and psg_gram (untimed) keep the reference first: its products run as
#   cuBLAS fp64 GEMMs, the kernels' on CUDA-core loops.
_CUDA_ORDER = {
    ("gram", torch.float32): ("triton", "cuda", "reference"),
    ("ghost_gram", torch.float32, "tensor cores"): ("cuda", "triton", "reference"),
    ("ghost_gram", torch.float32): ("triton", "reference", "cuda"),
    ("ghost_gram", torch.float32, "ghost route"): ("reference", "triton", "cuda"),
    ("psg_gram", torch.float32): ("triton", "cuda", "reference"),
    ("ghost_gram", None): ("reference", "triton", "cuda"),
    ("psg_gram", None): ("reference", "triton", "cuda"),
}
_WGMMA_GRAM_ORDER = ("cuda", "triton", "reference")  # tensor-core gram into fp32 on wgmma
_TENSOR_CORE_PATHS = ("wgmma", "wgmma overlap", "mma.sync")
_path_cache: dict = {}


def _cuda_tensor_core_path(device: torch.device) -> str | None:
    """The native CUDA library's tensor-core path on `device` ("wgmma", "wgmma overlap", "mma.sync",
    "cuda cores"; `_native.gram_tensor_core_path`), None where the library cannot run there or the
    query fails. Kept per device and values of the switches the library reads
    (LINFT_CUDA_GRAM_WGMMA per call, LINFT_CUDA_GRAM_MMA once)."""
    if unavailable_reason("cuda", device) is not None or not torch.cuda.is_available():
        return None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
    except (RuntimeError, AssertionError):  # torch's CUDA cannot start: the library is of no use
        return None
    key = (index, os.environ.get("LINFT_CUDA_GRAM_WGMMA"), os.environ.get("LINFT_CUDA_GRAM_MMA"))
    if key not in _path_cache:
        try:
            path = _gram_path(index)
        except (RuntimeError, AssertionError):
            path = None
        _path_cache[key] = path if path in _TENSOR_CORE_PATHS + ("cuda cores",) else None
    return _path_cache[key]


def _gram_path(index: int) -> str | None:
    with torch.cuda.device(index):
        return _native.gram_tensor_core_path()


def _auto_order(device: torch.device, op: str | None = None, out_dtype: torch.dtype | None = None,
                tensor_cores: bool = False, ghost_route: bool = False) -> tuple[str, ...]:
    if device.type == "cuda":
        if tensor_cores and out_dtype == torch.float32 and op in ("gram", "ghost_gram"):
            path = _cuda_tensor_core_path(device)
            if op == "gram" and path in ("wgmma", "wgmma overlap"):
                return _WGMMA_GRAM_ORDER
            if op == "ghost_gram" and path in _TENSOR_CORE_PATHS:
                return _CUDA_ORDER[(op, out_dtype, "tensor cores")]
        if ghost_route and (op, out_dtype, "ghost route") in _CUDA_ORDER:
            return _CUDA_ORDER[(op, out_dtype, "ghost route")]
        return _CUDA_ORDER.get((op, out_dtype)) or _CUDA_ORDER.get((op, None)) or ("cuda", "triton", "reference")
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def resolve(op: str, device: torch.device, backend: str | None, out_dtype: torch.dtype | None = None,
            tensor_cores: bool = False, ghost_route: bool = False) -> str:
    """The backend that runs `op` on tensors of `device` into an `out_dtype` result; tensor_cores:
    the inputs are 16-bit and shaped for the native kernels' tensor-core paths; ghost_route: a
    ghost_gram call that takes the T x S route (`ops.ghost_route`)."""
    requested = backend or os.environ.get("LINFT_BACKEND") or "auto"
    if requested != "auto":
        reason = unavailable_reason(requested, device)
        if reason is not None:
            source = "backend=" if backend else "LINFT_BACKEND="
            raise BackendUnavailable(f"{op}: {source}{requested!r} cannot run: {reason}")
        return requested
    order = _auto_order(device, op, out_dtype, tensor_cores, ghost_route)
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
