"""Operator adapter for the spectral engine: one interface over explicit matrices and operators.

Everything in :mod:`linft_kernels.linalg` talks to an :class:`Operator`, which wraps

* a torch tensor (2-D, any device, float16/bfloat16/float32/float64; half precision is upcast to
  float32 once, since Krylov products in half precision are too inexact),
* a numpy array or a scipy sparse matrix / ``LinearOperator`` (applied through numpy),
* any object with ``.shape`` and ``@`` on a block of column vectors (``A @ X`` with ``X`` of shape
  ``(N, b)``), such as a matrix-free NTK operator. Optional attributes it honours: ``.dtype`` and
  ``.device`` (the block it is fed), ``.T`` (for singular values), ``.diagonal()`` and ``.trace()``.

The adapter validates input (2-D, square where required, finite, non-empty), counts products (one per
column applied, so a block of ``b`` vectors costs ``b``) and passes (one per ``@`` call, which for a
matrix-free NTK is one pass over the data), and checks every block it gets back for non-finite values.

It never touches CUDA unless handed CUDA tensors, and never imports anything outside torch/numpy (scipy
only when given a scipy object).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch

__all__ = [
    "Operator",
    "as_operator",
    "accuracy_floor",
    "work_dtype",
    "check_k",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the Krylov basis for an operator of ``dtype``: float64 stays, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accuracy_floor(n: int, dtype: torch.dtype, anorm: float, factor: Optional[float] = None) -> float:
    """What the arithmetic can resolve for an ``n x n`` operator of ``dtype`` with norm ``anorm``.

    ``factor * eps(dtype) * anorm`` with ``factor = 4 * sqrt(n)`` by default: the size of the rounding
    error of one product ``A @ v`` in that precision (a modest over-estimate of the typical
    ``sqrt(n) * eps * ||A||``). Residuals below it are as good as the arithmetic allows, and eigenvalues
    below it are indistinguishable from zero.
    """
    if factor is None:
        factor = 4.0 * math.sqrt(max(n, 1))
    return float(factor) * float(torch.finfo(dtype).eps) * float(anorm)


def check_k(k: Any, n: int, name: str = "k") -> int:
    """Validate a requested number of pairs against the dimension ``n``."""
    if isinstance(k, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(k).__name__}") from None
    if k < 1:
        raise ValueError(f"{name} must be at least 1, got {name}={k}")
    if k > n:
        raise ValueError(f"{name}={k} exceeds the dimension N={n} of the operator")
    return k


def _is_scipy(obj: Any) -> bool:
    mod = type(obj).__module__ or ""
    return mod.startswith("scipy")


class Operator:
    """A linear operator of shape ``(m, n)`` applied to blocks of column vectors, with counters.

    Attributes:
        shape: ``(m, n)``.
        dtype: dtype the operator works in (the explicit matrix's dtype, or the operator's ``.dtype``,
            float64 when it declares none).
        device: device of the blocks it is fed.
        explicit: the matrix as a torch tensor when the operator is an explicit matrix, else ``None``.
        products: columns applied so far (``A`` and ``A^T`` both count).
        passes: ``@`` calls so far.
    """

    def __init__(self, obj: Any, *, kind: str, matrix: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float64, device: torch.device = torch.device("cpu"),
                 shape: tuple = (0, 0), transpose: Any = None, name: str = "A"):
        self._obj = obj
        self.kind = kind  # "tensor" | "numpy" | "generic"
        self.explicit = matrix
        self.dtype = dtype
        self.device = device
        self.shape = tuple(int(s) for s in shape)
        self._transpose = transpose
        self.name = name
        self.products = 0
        self.passes = 0

    # ------------------------------------------------------------------ helpers
    @property
    def n(self) -> int:
        return self.shape[1]

    @property
    def work_dtype(self) -> torch.dtype:
        return work_dtype(self.dtype)

    @property
    def eps(self) -> float:
        return float(torch.finfo(self.dtype).eps)

    def require_square(self) -> int:
        m, n = self.shape
        if m != n:
            raise ValueError(f"{self.name} must be square, got shape ({m}, {n}); "
                             "for a rectangular or asymmetric kernel ask for singular values (svds)")
        return n

    # ------------------------------------------------------------------ application
    def _apply(self, obj: Any, x: torch.Tensor, out_rows: int, what: str) -> torch.Tensor:
        if self.kind == "tensor":
            y = obj @ x.to(obj.dtype)
        elif self.kind == "numpy":
            import numpy as np

            xn = x.detach().to("cpu", torch.float64).numpy()
            y = obj @ xn
            if hasattr(y, "toarray"):
                y = y.toarray()
            y = torch.from_numpy(np.ascontiguousarray(np.asarray(y, dtype=np.float64)))
        else:
            y = obj @ x.to(self.dtype)
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
        if y.dim() == 1 and x.dim() == 2 and x.shape[1] == 1:
            y = y.unsqueeze(1)
        if tuple(y.shape) != (out_rows, x.shape[1]):
            raise ValueError(f"{what} returned shape {tuple(y.shape)} for a block of shape "
                             f"{tuple(x.shape)}; expected ({out_rows}, {x.shape[1]})")
        y = y.to(device=x.device, dtype=x.dtype)
        if not bool(torch.isfinite(y.sum(dtype=torch.float64))) and not bool(torch.isfinite(y).all()):
            raise FloatingPointError(f"{what} returned non-finite values (NaN or Inf) on product pass "
                                     f"{self.passes}; the operator or its input is not finite")
        return y

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for a block ``x`` of shape ``(n, b)``; counts ``b`` products and one pass."""
        if x.shape[1] == 0:
            return x.new_zeros((self.shape[0], 0))
        y = self._apply(self._obj, x, self.shape[0], f"{self.name} @ X")
        self.products += int(x.shape[1])
        self.passes += 1
        return y

    __matmul__ = matmat

    def rmatmat(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T @ x`` for a block ``x`` of shape ``(m, b)``; counts ``b`` products and one pass."""
        if x.shape[1] == 0:
            return x.new_zeros((self.shape[1], 0))
        t = self._transpose
        if t is None:
            raise TypeError(f"{self.name} has no transpose: give an explicit matrix, or an operator "
                            "with a .T attribute that supports @")
        y = self._apply(t, x, self.shape[1], f"{self.name}.T @ X")
        self.products += int(x.shape[1])
        self.passes += 1
        return y

    def randn(self, n: int, b: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian block drawn on the CPU from ``generator`` (same numbers on every device)."""
        x = torch.randn(n, b, generator=generator, dtype=torch.float64)
        return x.to(device=self.device, dtype=self.work_dtype)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"Operator(kind={self.kind}, shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device}, products={self.products})")


def _unwrap(obj: Any) -> Any:
    """An NTK result (or anything else) that carries its explicit matrix as ``.matrix``."""
    if isinstance(obj, torch.Tensor):
        return obj
    mat = getattr(obj, "matrix", None)
    if mat is not None and (isinstance(mat, torch.Tensor) or type(mat).__module__ == "numpy"):
        return mat
    return obj


def as_operator(obj: Any, *, square: bool = True, check_finite: bool = True,
                name: str = "A") -> Operator:
    """Wrap ``obj`` as an :class:`Operator`, validating it.

    Raises ``ValueError`` (naming the problem) for a matrix that is not 2-D, not square when ``square``,
    empty, or has non-finite entries; ``TypeError`` for an object that is neither a matrix nor an
    operator with ``.shape`` and ``@``.
    """
    if isinstance(obj, Operator):
        if square:
            obj.require_square()
        return obj
    obj = _unwrap(obj)

    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None

    if np is not None and isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be a real floating-point array, got dtype {obj.dtype}")
        arr = obj if obj.dtype in (np.float32, np.float64) else obj.astype(np.float64)
        obj = torch.from_numpy(np.ascontiguousarray(arr))

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_complex():
            raise TypeError(f"{name} must be real, got complex dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got a {t.dim()}-D tensor of shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            t = t.to(torch.float64)
        elif t.dtype in (torch.float16, torch.bfloat16):
            # products in half precision lose too much for a Krylov method: work in float32 on the
            # rounded matrix (floors and resolutions are then those of float32 arithmetic)
            t = t.to(torch.float32)
        m, n = t.shape
        if m == 0 or n == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if square and m != n:
            raise ValueError(f"{name} must be square, got shape ({m}, {n}); for a rectangular or "
                             "asymmetric kernel ask for singular values (svds)")
        # fast path: a finite sum proves every entry finite (NaN/Inf propagate); count only if not
        if check_finite and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                nbad = int(bad.sum())
                raise ValueError(f"{name} contains {nbad} non-finite entr{'y' if nbad == 1 else 'ies'} "
                                 "(NaN or Inf)")
        return Operator(t, kind="tensor", matrix=t, dtype=t.dtype, device=t.device, shape=(m, n),
                        transpose=t.mT, name=name)

    shape = getattr(obj, "shape", None)
    if shape is None or not hasattr(obj, "__matmul__"):
        raise TypeError(f"{name} must be a torch tensor, a numpy array, an object with .matrix, or an "
                        f"operator with .shape and @; got {type(obj).__name__}")
    try:
        shape = tuple(int(s) for s in shape)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{name}.shape must be a pair of integers, got {shape!r}") from exc
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {shape})")
    if square and shape[0] != shape[1]:
        raise ValueError(f"{name} must be square, got shape {shape}; for a rectangular or asymmetric "
                         "kernel ask for singular values (svds)")
    transpose = None
    for attr in ("T", "mT", "H"):
        try:
            cand = getattr(obj, attr, None)
        except Exception:  # noqa: BLE001
            cand = None
        if cand is not None and hasattr(cand, "__matmul__"):
            transpose = cand
            break
    if _is_scipy(obj):
        import numpy as np  # noqa: F811

        dt = getattr(obj, "dtype", np.float64)
        if check_finite and hasattr(obj, "data") and hasattr(obj, "tocsr"):
            if not np.isfinite(obj.data).all():
                raise ValueError(f"{name} contains non-finite entries (NaN or Inf)")
        dtype = torch.float32 if np.dtype(dt) == np.float32 else torch.float64
        return Operator(obj, kind="numpy", dtype=dtype, device=torch.device("cpu"), shape=shape,
                        transpose=transpose, name=name)
    dtype = getattr(obj, "dtype", torch.float64)
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        dtype = torch.float64
    device = getattr(obj, "device", torch.device("cpu"))
    try:
        device = torch.device(device)
    except Exception:  # noqa: BLE001
        device = torch.device("cpu")
    return Operator(obj, kind="generic", dtype=dtype, device=device, shape=shape,
                    transpose=transpose, name=name)
