"""Loading of the pybind11 native libraries and the calls into them.

The libraries (`_C_cpu`, `_C_cuda`) take raw pointers (see csrc/README.md). This module is the only
place that turns tensors into pointers. Loading is lazy and never raises: a library that is missing or
fails to load records why, and `python -m linft_kernels` prints it.
"""
from __future__ import annotations

import importlib
import json
import os
import threading

import torch

# Keep in sync with csrc/include/linft/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KERNEL_CODES = {"sgd": 0, "signgd": 1, "asymmetric-signgd": 2}

_lock = threading.Lock()
_libs: dict[str, object] = {}
_errors: dict[str, str] = {}


def _load(name: str):
    with _lock:
        if name in _libs:
            return _libs[name]
        if name in _errors:
            return None
        try:
            lib = importlib.import_module(f"linft_kernels.{name}")
        except ImportError as e:  # not built, or built for another Python / libc
            _errors[name] = f"{type(e).__name__}: {e}"
            if name == "_C_cuda":
                info = build_info().get("cuda", {})
                if info.get("reason"):
                    _errors[name] = f"not built ({info['reason']})"
            return None
        _libs[name] = lib
        return lib


def cpu_lib():
    """The CPU library, or None (see `load_error('_C_cpu')`)."""
    return _load("_C_cpu")


def cuda_lib():
    """The CUDA library, or None. Loading it does not initialize CUDA."""
    return _load("_C_cuda")


def load_error(name: str) -> str | None:
    _load(name)
    return _errors.get(name)


def cuda_device_count() -> int:
    """GPUs visible to the native CUDA library (0 when it is absent); no torch CUDA init."""
    lib = cuda_lib()
    return int(lib.device_count()) if lib is not None else 0


def gram_tensor_core_path() -> str | None:
    """The tensor-core kernel the native CUDA gram runs on the current device ("wgmma", "wgmma
    overlap", "mma.sync" or "cuda cores"; csrc/README.md), None without the CUDA library, or why
    the query failed (no driver; a library built before the query existed). A CUDA call."""
    lib = cuda_lib()
    if lib is None:
        return None
    try:
        return lib.gram_tensor_core_path()
    except (AttributeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"


def build_info() -> dict:
    """What setup.py recorded at build time (compiler, flags, CUDA version and architectures)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream_args(lib, ref: torch.Tensor):
    if ref.device.type != "cuda":
        return ()
    return (torch.cuda.current_stream(ref.device).cuda_stream,)


def _call(lib, fn_name: str, ref: torch.Tensor, *args):
    fn = getattr(lib, fn_name)
    if ref.device.type == "cuda":
        with torch.cuda.device(ref.device):
            return fn(*args, *_stream_args(lib, ref))
    return fn(*args)


def gram(lib, a, b, out):
    N, P = a.shape
    M = N if b is None else b.shape[0]
    _call(lib, "gram", a, _ptr(a), _ptr(b), _ptr(out), N, M, P,
          DTYPE_CODES[a.dtype], DTYPE_CODES[out.dtype])


def ghost_gram(lib, x1, g1, m1, x2, g2, m2, out):
    N, T, d_in = x1.shape
    d_out = g1.shape[2]
    M, S = (N, T) if x2 is None else x2.shape[:2]
    _call(lib, "ghost_gram", x1, _ptr(x1), _ptr(g1), _ptr(m1), _ptr(x2), _ptr(g2), _ptr(m2),
          _ptr(out), N, M, T, S, d_in, d_out, DTYPE_CODES[x1.dtype], DTYPE_CODES[out.dtype])


def psg_gram(lib, x1, g1, m1, x2, g2, m2, out, kernel: str, tile_dtype: torch.dtype | None = None):
    """tile_dtype (None: out's dtype): the dtype per-sample-gradient tiles are built in. Both libraries
    take fp32 with an fp64 out (the mixed mode); the CUDA library also the inputs' 16-bit dtype."""
    N, T, d_in = x1.shape
    d_out = g1.shape[2]
    M, S = (N, T) if x2 is None else x2.shape[:2]
    _call(lib, "psg_gram", x1, _ptr(x1), _ptr(g1), _ptr(m1), _ptr(x2), _ptr(g2), _ptr(m2),
          _ptr(out), N, M, T, S, d_in, d_out, DTYPE_CODES[x1.dtype], DTYPE_CODES[out.dtype],
          KERNEL_CODES[kernel], -1 if tile_dtype is None else DTYPE_CODES[tile_dtype])
