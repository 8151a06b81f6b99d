"""The public kernel ops: argument checking, torch.library registration and backend dispatch.

Each op is one mutating custom op ``linft::<name>_`` (adds into ``out``) declared once with
`torch.library.custom_op`, with a fake kernel so it traces under `torch.compile` without graph breaks.
Its implementation forwards to the backend chosen in Python before the call (see `_dispatch`), so the
chosen backend is a constant of the traced graph.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _blas, _dispatch, _native, reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OUT_DTYPES = (torch.float32, torch.float64)
KERNELS = tuple(_native.KERNEL_CODES)


# --------------------------------------------------------------------------------------------------
# Argument checking: every error names the argument and what was expected.

def _check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dimensions), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")


def _check_same(names_tensors, what: str) -> None:
    first_name, first = names_tensors[0]
    for name, t in names_tensors[1:]:
        if what == "dtype" and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                            "all inputs of one call must share a dtype")
        if what == "device" and t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors of one call must be on one device")


def _check_dim(name: str, got: int, expected: int, what: str) -> None:
    if got != expected:
        raise ValueError(f"{name}: {what} is {got}, expected {expected}")


def _mask(name: str, m, n: int, t: int, device) -> Optional[torch.Tensor]:
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({n}, {t}) or None")
    if tuple(m.shape) != (n, t):
        raise ValueError(f"{name} must have shape ({n}, {t}) (samples, tokens), got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"{name} is on {m.device} but the inputs are on {device}")
    return (m != 0).to(torch.uint8).contiguous()


def _out(out, shape, in_dtype: torch.dtype, device) -> torch.Tensor:
    if out is None:
        dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
        return torch.zeros(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor of shape {shape} or None")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype not in OUT_DTYPES:
        raise TypeError(f"out has dtype {out.dtype}; it must be float32 or float64 (the accumulator)")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the inputs are on {device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (results are added into it in place); "
                         f"got strides {out.stride()} for shape {tuple(out.shape)}")
    return out


def _tensor_core_shaped(tensors, widths) -> bool:
    """Whether the native CUDA kernels would take these inputs on tensor cores: 16-bit, every row width
    a multiple of 8 (16 bytes) and every tensor 16-byte aligned (a non-contiguous one is first copied,
    aligned). Auto's order on CUDA depends on it (`_dispatch`); the libraries check it again. Under
    torch.compile the addresses are unknown while tracing: taken as aligned."""
    ts = [t for t in tensors if t is not None]
    if ts[0].dtype not in (torch.bfloat16, torch.float16) or any(w % 8 for w in widths):
        return False
    return torch.compiler.is_compiling() or all(t.data_ptr() % 16 == 0 or not t.is_contiguous() for t in ts)


def _contig(t):
    return None if t is None else t.contiguous()


# --------------------------------------------------------------------------------------------------
# Backend implementations behind one name.

def _triton():
    from . import triton as tk
    return tk


def _run_gram(out, a, b, backend):
    if backend == "reference":
        reference.gram(a, b, out)
    elif backend == "triton":
        _triton().gram(a, b, out)
    elif backend == "cpu" and _blas.applies(a, b, out):
        _blas.gram(a, b, out)  # same-dtype fp32/fp64: the vendor GEMM in diagonal blocks (see _blas)
    else:
        lib = _native.cpu_lib() if backend == "cpu" else _native.cuda_lib()
        _native.gram(lib, a, b, out)


def ghost_route(N: int, M: int, T: int, S: int, d_in: int, d_out: int, symmetric: bool) -> str:
    """"ghost" or "materialize": the cheaper exact way to get a linear layer's sgd Gram, in multiply-adds.

    ghost: the T x S products of inputs and of output gradients for each pair, N·M·T·S·(d_in + d_out);
    materialize: each sample's gradient once, (N·T + M·S)·d_in·d_out, then the Gram N·M·d_in·d_out.
    The symmetric form computes half of the pairs either way and its gradients once.
    """
    pairs = N * (N + 1) // 2 if symmetric else N * M
    ghost = pairs * T * S * (d_in + d_out)
    materialize = (N * T + (0 if symmetric else M * S)) * d_in * d_out + pairs * d_in * d_out
    return "materialize" if materialize < ghost else "ghost"


def _run_ghost(out, x1, g1, m1, x2, g2, m2, backend, route="auto"):
    if backend == "reference":
        reference.ghost_gram(x1, g1, m1, x2, g2, m2, out)
        return
    (N, T, d_in), d_out = x1.shape, g1.shape[2]
    M, S = (N, T) if x2 is None else x2.shape[:2]
    if route == "auto":
        route = ghost_route(N, M, T, S, d_in, d_out, x2 is None)
    if route == "materialize":
        # Same value, fewer operations: the backend's per-sample-gradient Gram (sgd). On 2 CPU cores
        # the ghost kernel ran 0.15x and on an H200 0.01-0.05x the materializing einsum at such shapes.
        _run_psg(out, x1, g1, m1, x2, g2, m2, "sgd", backend)
    elif backend == "triton":
        _triton().ghost_gram(x1, g1, m1, x2, g2, m2, out)
    else:
        lib = _native.cpu_lib() if backend == "cpu" else _native.cuda_lib()
        _native.ghost_gram(lib, x1, g1, m1, x2, g2, m2, out)


def per_output_rows(x, g, m):
    """(x, g, m) with g (N, C, T, d_out) -> rows i*C + a: x and m repeated per output (a copy)."""
    if g is None or g.dim() == 3:
        return x, g, m
    N, C, T = g.shape[:3]
    x = x.unsqueeze(1).expand(N, C, T, x.shape[-1]).reshape(N * C, T, x.shape[-1])
    m = None if m is None else m.unsqueeze(1).expand(N, C, T).reshape(N * C, T)
    return x, g.reshape(N * C, T, g.shape[-1]), m


def _psg_by_gemm(device: torch.device, tile_dtype: Optional[torch.dtype]) -> bool:
    """Whether the Triton backend's psg_gram builds F with torch's batched GEMM (cuBLAS) instead of its
    own features kernel: 16-bit tiles on a GPU (`_psg_gemm_then_triton_gram`)."""
    return device.type == "cuda" and tile_dtype in (torch.bfloat16, torch.float16)


def _psg_gemm_then_triton_gram(out, x1, g1, m1, x2, g2, m2, kernel):
    """psg_gram with 16-bit tiles as cuBLAS + Triton: `_blas.psg_gram` builds F by batched GEMMs (each
    entry summed over tokens in fp32, rounded once) in chunks of up to _blas.PSG_BUFFER_GPU entries
    (all of F at the ops sweep's shape), each chunk's Gram by the Triton gram (16-bit operands on
    tensor cores into an fp32 out, split-K; into an fp64 out on CUDA cores), adding into one scratch
    that the symmetric form mirrors once from its upper triangle at the end (exactly symmetric: a
    diagonal tile's two halves could round apart). On an H200 at N=256, T=256, d_in=d_out=1024 bf16
    (bench/profile_psg_gpu.py): cuBLAS builds F in 0.30 ms where the Triton features kernel took about
    twice that; the Triton gram of all of F took 0.28 ms, cuBLAS's 0.27 ms; this route with cuBLAS's
    Gram took 0.56 ms against 0.91 ms for the Triton two-stage kernel (this exact route: not yet
    timed). An fp64 out takes each chunk's Gram from cuBLAS's fp64 GEMM on fp64 copies instead
    (`_blas.gram_fp64_copies`; the Triton gram into fp64 runs on CUDA cores), in chunks a quarter the
    size so that the copies stay within the 16-bit buffer's bytes twice over."""
    if out.dtype == torch.float64:
        gram, buffer = _blas.gram_fp64_copies, _blas.PSG_BUFFER_GPU // 4
    else:
        gram, buffer = (lambda a, b, k: _run_gram(k, a, b, "triton")), _blas.PSG_BUFFER_GPU
    _blas.psg_gram(x1, g1, m1, x2, g2, m2, out, kernel, gram=gram, buffer=buffer, gram_upper=True)


def _run_psg(out, x1, g1, m1, x2, g2, m2, kernel, backend, tiles="out"):
    tile_dtype = None if tiles == "out" else getattr(torch, tiles)
    if backend == "cpu" and _blas.psg_applies(x1, x2, out, tile_dtype):
        # tiles in the factors' dtype; tiles coarser than out take their Gram from the native kernel
        native = lambda a, b, k: _run_gram(k, a, b, "cpu")  # noqa: E731
        _blas.psg_gram(x1, g1, m1, x2, g2, m2, out, kernel, gram=native if x1.dtype != out.dtype else None,
                       few_rows_gram=native)
        return
    if backend == "triton" and _psg_by_gemm(x1.device, tile_dtype):
        _psg_gemm_then_triton_gram(out, x1, g1, m1, x2, g2, m2, kernel)
        return
    x1, g1, m1 = per_output_rows(x1, g1, m1)
    x2, g2, m2 = per_output_rows(x2, g2, m2)
    if backend == "reference":
        reference.psg_gram(x1, g1, m1, x2, g2, m2, out, kernel, tile_dtype)
    elif backend == "triton":
        _triton().psg_gram(x1, g1, m1, x2, g2, m2, out, _native.KERNEL_CODES[kernel], tile_dtype=tile_dtype)
    else:
        lib = _native.cpu_lib() if backend == "cpu" else _native.cuda_lib()
        _native.psg_gram(lib, x1, g1, m1, x2, g2, m2, out, kernel, tile_dtype)


@torch.library.custom_op("linft::gram_", mutates_args=("out",))
def _gram_op(out: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], backend: str) -> None:
    _run_gram(out, a, b, backend)


@_gram_op.register_fake
def _(out, a, b, backend):
    return None


@torch.library.custom_op("linft::ghost_gram_", mutates_args=("out",))
def _ghost_op(out: torch.Tensor, x1: torch.Tensor, g1: torch.Tensor, m1: Optional[torch.Tensor],
              x2: Optional[torch.Tensor], g2: Optional[torch.Tensor], m2: Optional[torch.Tensor],
              backend: str, route: str) -> None:
    _run_ghost(out, x1, g1, m1, x2, g2, m2, backend, route)


@_ghost_op.register_fake
def _(out, x1, g1, m1, x2, g2, m2, backend, route):
    return None


@torch.library.custom_op("linft::psg_gram_", mutates_args=("out",))
def _psg_op(out: torch.Tensor, x1: torch.Tensor, g1: torch.Tensor, m1: Optional[torch.Tensor],
            x2: Optional[torch.Tensor], g2: Optional[torch.Tensor], m2: Optional[torch.Tensor],
            kernel: str, backend: str, tiles: str) -> None:
    _run_psg(out, x1, g1, m1, x2, g2, m2, kernel, backend, tiles)


@_psg_op.register_fake
def _(out, x1, g1, m1, x2, g2, m2, kernel, backend, tiles):
    return None


# --------------------------------------------------------------------------------------------------
# Public functions.

def gram(a: torch.Tensor, b: Optional[torch.Tensor] = None, *, out: Optional[torch.Tensor] = None,
         backend: Optional[str] = None) -> torch.Tensor:
    """Gram matrix of feature rows: ``out (+)= a @ b.T``.

    a: (N, P), b: (M, P) or None for the symmetric ``a @ a.T`` (half the tiles are computed).
    Inputs fp16/bf16/fp32/fp64 (one dtype per call); accumulation in fp32, or fp64 when `out` is fp64.
    out: (N, M) float32/float64 to add into; a new zeroed tensor when None (fp64 for fp64 inputs,
    else fp32). Returns `out`.
    """
    _check_tensor("a", a, 2, "(N, P)")
    if b is a:
        b = None
    if b is not None:
        _check_tensor("b", b, 2, "(M, P)")
        _check_same([("a", a), ("b", b)], "dtype")
        _check_same([("a", a), ("b", b)], "device")
        _check_dim("b", b.shape[1], a.shape[1], "the feature dimension P (b.shape[1])")
    N, M = a.shape[0], (a.shape[0] if b is None else b.shape[0])
    out = _out(out, (N, M), a.dtype, a.device)
    name = _dispatch.resolve("gram", a.device, backend, out.dtype, _tensor_core_shaped((a, b), (a.shape[1],)))
    if a.numel() and (b is None or b.numel()):
        _gram_op(out, a.contiguous(), _contig(b), name)
    return out


def _check_factors(x1, g1, mask1, x2, g2, mask2, outputs: bool = False):
    """Shapes, dtypes and devices of a layer's factors. outputs=True (psg_gram) also accepts g of shape
    (N, C, T, d_out): C output gradients per sample sharing its input. Returns N, M (rows of out:
    samples times outputs) and the masks as uint8."""
    _check_tensor("x1", x1, 3, "(N, T, d_in)")
    g_doc = "(N, T, d_out) or (N, C, T, d_out)" if outputs else "(N, T, d_out)"
    _check_tensor("g1", g1, _g_ndim(g1, outputs), g_doc)
    N, T, d_in = x1.shape
    _check_dim("g1", g1.shape[0], N, "the sample count (g1.shape[0], x1.shape[0])")
    _check_dim("g1", g1.shape[-2], T, f"the token count (g1.shape[{g1.dim() - 2}], x1.shape[1])")
    d_out = g1.shape[-1]
    tensors = [("x1", x1), ("g1", g1)]
    if (x2 is None) != (g2 is None):
        raise ValueError("x2 and g2 must be given together (cross kernel) or both be None (symmetric)")
    if x2 is None and mask2 is not None:
        raise ValueError("mask2 given without x2/g2; for the symmetric kernel pass only mask1")
    if x2 is not None:
        _check_tensor("x2", x2, 3, f"(M, S, {d_in})")
        g2_doc = f"(M, S, {d_out}) or (M, C, S, {d_out})" if outputs else f"(M, S, {d_out})"
        _check_tensor("g2", g2, _g_ndim(g2, outputs), g2_doc)
        M, S = x2.shape[:2]
        _check_dim("x2", x2.shape[2], d_in, "d_in (x2.shape[2], x1.shape[2])")
        _check_dim("g2", g2.shape[0], M, "the sample count (g2.shape[0], x2.shape[0])")
        _check_dim("g2", g2.shape[-2], S, f"the token count (g2.shape[{g2.dim() - 2}], x2.shape[1])")
        _check_dim("g2", g2.shape[-1], d_out, f"d_out (g2.shape[{g2.dim() - 1}], g1.shape[{g1.dim() - 1}])")
        tensors += [("x2", x2), ("g2", g2)]
    _check_same(tensors, "dtype")
    _check_same(tensors, "device")
    m1 = _mask("mask1", mask1, N, T, x1.device)
    m2 = None if x2 is None else _mask("mask2", mask2, x2.shape[0], x2.shape[1], x1.device)
    M = N if x2 is None else x2.shape[0]
    return N * _outputs(g1), M * _outputs(g1 if g2 is None else g2), m1, m2


def _g_ndim(g, outputs: bool) -> int:
    """The dimension count g must have: 4 only where per-output gradients are accepted and given."""
    return 4 if outputs and isinstance(g, torch.Tensor) and g.dim() == 4 else 3


def _outputs(g: torch.Tensor) -> int:
    return g.shape[1] if g.dim() == 4 else 1


def ghost_gram(x1: torch.Tensor, g1: torch.Tensor, x2: Optional[torch.Tensor] = None,
               g2: Optional[torch.Tensor] = None, *, mask1: Optional[torch.Tensor] = None,
               mask2: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
               backend: Optional[str] = None, route: str = "auto") -> torch.Tensor:
    """Per-sample-gradient Gram of a linear layer y = W x, from its factors.

    K[i, j] = sum_{t, s} (x1[i,t] . x2[j,s]) (g1[i,t] . g2[j,s]) over real tokens, which equals
    <g1_i^T x1_i, g2_j^T x2_j>, without forming T x S products or per-sample gradients in memory.
    x1: (N, T, d_in) layer inputs, g1: (N, T, d_out) output gradients, mask1: (N, T) nonzero for real
    tokens (None: all real); x2/g2/mask2 likewise with (M, S, .) or None for the symmetric kernel.
    route: "ghost" (the T x S algorithm), "materialize" (the backend's `psg_gram`, sgd) or "auto" (the
    one with fewer multiply-adds, `ghost_route`); every route gives the same value. The reference
    backend always chooses for itself.
    Returns out (N, M), accumulated as in `gram`.
    """
    if route not in ("auto", "ghost", "materialize"):
        raise ValueError(f"route must be 'auto', 'ghost' or 'materialize', got {route!r}")
    N, M, m1, m2 = _check_factors(x1, g1, mask1, x2, g2, mask2)
    out = _out(out, (N, M), x1.dtype, x1.device)
    T, S = x1.shape[1], (x1 if x2 is None else x2).shape[1]
    takes = route if route != "auto" else ghost_route(N, M, T, S, x1.shape[2], g1.shape[2], x2 is None)
    name = _dispatch.resolve("ghost_gram", x1.device, backend, out.dtype,
                             _tensor_core_shaped((x1, g1, x2, g2), (x1.shape[2], g1.shape[2])),
                             ghost_route=takes == "ghost")
    if out.numel() and x1.shape[1] * x1.shape[2] * g1.shape[2] and (x2 is None or x2.shape[1]):
        _ghost_op(out, x1.contiguous(), g1.contiguous(), m1, _contig(x2), _contig(g2), m2, name, route)
    return out


def psg_gram(x1: torch.Tensor, g1: torch.Tensor, x2: Optional[torch.Tensor] = None,
             g2: Optional[torch.Tensor] = None, *, kernel: str = "sgd",
             mask1: Optional[torch.Tensor] = None, mask2: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None, backend: Optional[str] = None,
             tile_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Blocked contraction of per-sample gradients F_i = g_i^T x_i (d_out, d_in) of a linear layer.

    kernel="sgd": <F_i, F_j> (equals `ghost_gram`); "signgd": <sign F_i, sign F_j>;
    "asymmetric-signgd": <F_i, sign F_j> (not symmetric, even when x2 is None).
    F is built tile by tile and never whole. Shapes, masks, dtypes and `out` as in `ghost_gram`, and g
    may also be (N, C, T, d_out): C outputs' gradients per sample, sharing the sample's input x and
    mask; then out is (N*C, M*C2) with row i*C + a, as if x were repeated per output (the CPU path
    does not repeat it).
    tile_dtype: None builds F in out's dtype (exact to its rounding); torch.float32 with an fp64 out
    builds each F entry (a sum over one sample's tokens) in fp32 and the Gram in fp64, the precision of
    an fp32 model's own weight gradients with fp64 accumulation over parameters, and about twice as
    fast on CPU. The factors' own 16-bit dtype (bf16/fp16 factors only) sums each F entry in fp32 and
    rounds it once to that dtype, as a 16-bit model's own weight gradients are, then accumulates the
    Gram in out's dtype: the Gram's products run on bf16/fp16 matrix units (tensor cores, AMX). fp16
    tiles hold |F| <= 65504, as an fp16 model's weight gradients do: a larger entry becomes inf, and
    the sgd Gram inf or NaN (bf16 has fp32's range); signs are exact in either.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    N, M, m1, m2 = _check_factors(x1, g1, mask1, x2, g2, mask2, outputs=True)
    out = _out(out, (N, M), x1.dtype, x1.device)
    if tile_dtype in (torch.bfloat16, torch.float16):
        factors = {t.dtype for t in (x1, g1, x2, g2) if t is not None}
        if factors != {tile_dtype}:
            raise ValueError(f"tile_dtype={tile_dtype} needs factors x and g of that dtype, got "
                             f"{sorted(str(d) for d in factors)}")
    elif tile_dtype not in (None, torch.float32, torch.float64):
        raise ValueError("tile_dtype must be None, torch.float32, torch.float64 or the factors' 16-bit "
                         f"dtype, got {tile_dtype}")
    if tile_dtype == torch.float64 and out.dtype != torch.float64:
        raise ValueError("tile_dtype=torch.float64 needs an fp64 out (tiles are never finer than out)")
    tiles = "out" if tile_dtype in (None, out.dtype) else str(tile_dtype).replace("torch.", "")
    name = _dispatch.resolve("psg_gram", x1.device, backend, out.dtype)
    if out.numel() and x1.shape[1] * x1.shape[2] * g1.shape[-1] and (x2 is None or x2.shape[1]):
        _psg_op(out, x1.contiguous(), g1.contiguous(), m1, _contig(x2), _contig(g2), m2, kernel, name,
                tiles)
    return out
