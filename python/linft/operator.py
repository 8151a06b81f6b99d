"""Matrix-free NTK operator: K V = J (J^T V) by one VJP and one JVP per sample tile, for N too large to
hold K. Plugs into `linft.spectrum` (anything with `.shape` and `@` on a block of vectors)."""
from __future__ import annotations

import torch

from . import data as _data
from .blocks import select_parameters
from .capture import run_output
from .engine import _model_device, _model_state


def _forward_ad_attention():
    """scaled_dot_product_attention by its math backend (matmuls and a softmax) while forward-mode AD
    runs: the fused flash / memory-efficient kernels that transformers models use by default
    ("sdpa") have no forward-mode derivative (NotImplementedError on CPU and CUDA). The same function
    up to rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


class _Output(torch.nn.Module):
    """`output(model, batch)` as a module, so torch.func.functional_call can swap parameters."""

    def __init__(self, model, output):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, batch):
        return run_output(self.model, batch, self.output)


class NTKOperator:
    """K = J J^T of the selected parameters over `inputs`, row index i*C + a, never formed.

    `op @ V` for V of shape (N*C,) or (N*C, k) costs, per column, one backward and one forward-mode
    pass over the data. `products` counts columns multiplied so far. Results are in `dtype`.
    """

    def __init__(self, model, inputs, *, output, params="trainable", sample_tile: int = 16,
                 dtype: torch.dtype = torch.float64):
        self.model = model
        self.output = output
        self.batches = _data.as_batches(inputs, "inputs")
        self.selected = select_parameters(model, params)
        self.sample_tile = sample_tile
        self.dtype = dtype
        self.device = _model_device(model)
        self.n_samples = _data.n_samples(self.batches)
        with _model_state(model, self.selected), torch.no_grad():
            first = _data.to_device(next(_data.tiles(self.batches, 1))[1], self.device)
            self.n_outputs = run_output(model, first, output).shape[1]
        n = self.n_samples * self.n_outputs
        self.shape = (n, n)
        self.products = 0

    def _tiles(self):
        for start, batch in _data.tiles(self.batches, self.sample_tile):
            batch = _data.to_device(batch, self.device)
            B = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            yield start, B, batch

    def _jt(self, V: torch.Tensor) -> list[torch.Tensor]:
        """J^T V: one list of parameter-shaped tensors per column of V (N*C, k)."""
        C, k = self.n_outputs, V.shape[1]
        params = list(self.selected.values())
        acc = [[torch.zeros_like(p, dtype=self.dtype) for p in params] for _ in range(k)]
        for start, B, batch in self._tiles():
            with torch.enable_grad():
                f = run_output(self.model, batch, self.output)  # (B, C)
            rows = V[start * C:(start + B) * C].reshape(B, C, k).to(f.dtype)
            for col in range(k):
                gs = torch.autograd.grad(f, params, grad_outputs=rows[:, :, col], retain_graph=col < k - 1,
                                         allow_unused=True)
                for a, g in zip(acc[col], gs):
                    if g is not None:
                        a += g.to(self.dtype)
        return acc

    def _j(self, U: list[list[torch.Tensor]]) -> torch.Tensor:
        """J U for each column's parameter-shaped tangent: (N*C, k)."""
        C, k = self.n_outputs, len(U)
        names = list(self.selected)
        wrapped = _Output(self.model, self.output)
        primals = {f"model.{n}": p.detach() for n, p in self.selected.items()}
        out = torch.zeros(self.n_samples * C, k, dtype=self.dtype, device=self.device)
        for start, B, batch in self._tiles():
            for col in range(k):
                tangents = {f"model.{n}": u.to(primals[f"model.{n}"].dtype) for n, u in zip(names, U[col])}
                with _forward_ad_attention():
                    _, jv = torch.func.jvp(
                        lambda p: torch.func.functional_call(wrapped, p, (batch,), strict=False),
                        (primals,), (tangents,))
                out[start * C:(start + B) * C, col] = jv.reshape(-1).to(self.dtype)
        return out

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        vec = V.dim() == 1
        V = V.unsqueeze(1) if vec else V
        if V.shape[0] != self.shape[1]:
            raise ValueError(f"NTK operator of shape {self.shape} cannot multiply a block with {V.shape[0]} rows")
        V = V.to(device=self.device, dtype=self.dtype)
        with _model_state(self.model, self.selected):
            KV = self._j(self._jt(V))
        self.products += V.shape[1]
        return KV[:, 0] if vec else KV

    def diagonal(self) -> torch.Tensor:
        """diag K = squared norms of the per-sample, per-output gradients (exact, N*C backward passes)."""
        C = self.n_outputs
        params = list(self.selected.values())
        d = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        with _model_state(self.model, self.selected):
            for start, B, batch in self._tiles():
                for i in range(B):
                    one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                           for k, v in batch.items()}
                    with torch.enable_grad():
                        f = run_output(self.model, one, self.output)
                    for c in range(C):
                        gs = torch.autograd.grad(f[0, c], params, retain_graph=c < C - 1, allow_unused=True)
                        d[(start + i) * C + c] = sum((g.to(self.dtype) ** 2).sum() for g in gs if g is not None)
        return d

    def trace(self) -> float:
        return float(self.diagonal().sum())

    def __repr__(self) -> str:
        return (f"NTKOperator(shape={self.shape}, n_outputs={self.n_outputs}, "
                f"params={sum(p.numel() for p in self.selected.values())})")


def ntk_operator(model, inputs, *, output, params="trainable", sample_tile: int = 16,
                 dtype: torch.dtype = torch.float64) -> NTKOperator:
    """The matrix-free empirical NTK of `model` on `inputs` (see `NTKOperator`)."""
    return NTKOperator(model, inputs, output=output, params=params, sample_tile=sample_tile, dtype=dtype)
