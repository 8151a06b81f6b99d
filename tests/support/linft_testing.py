"""Tolerances and comparison helpers shared by the test suites.

One table, keyed by the accumulator dtype of the result (the precision the kernels add in), states how
far a result may be from its float64 oracle relative to the oracle's largest magnitude. Oracles are
computed from the *same rounded inputs* upcast to float64, so low-precision inputs cost nothing here:
what remains is accumulation error.
"""
from __future__ import annotations

import importlib.util

import torch

HAS_GPU = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Relative to max |oracle|. fp32 accumulation over reductions of up to ~1e4 terms: a few eps*sqrt(L).
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def native_cpu_available() -> bool:
    from linft_kernels import _native
    return _native.cpu_lib() is not None


def cpu_backends() -> list[str]:
    """Backends that can run on CPU tensors in this process."""
    names = ["reference"]
    if native_cpu_available():
        names.append("cpu")
    return names


def assert_close_to_oracle(got: torch.Tensor, oracle: torch.Tensor, acc_dtype: torch.dtype,
                           extra_atol: float = 0.0, what: str = "") -> None:
    """max |got - oracle| <= RTOL[acc] * max |oracle| + extra_atol, with a report of where it fails."""
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    got64 = got.detach().to(torch.float64).cpu()
    oracle = oracle.detach().to(torch.float64).cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values in result"
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    tol = RTOL[acc_dtype] * max(scale, 1e-300) + extra_atol
    if oracle.numel() == 0:
        return
    err = (got64 - oracle).abs()
    worst = err.max().item()
    if worst > tol:
        idx = tuple(int(i) for i in torch.nonzero(err == worst)[0])
        raise AssertionError(
            f"{what}: max error {worst:.3e} > tolerance {tol:.3e} (scale {scale:.3e}, "
            f"acc {acc_dtype}) at {idx}: got {got64[idx].item():.10g}, expected {oracle[idx].item():.10g}")


# ---- float64 oracles, written independently of linft_kernels.reference -----------------------

def per_sample_grads64(x, g, m=None):
    """Explicit per-sample gradients F_i = G_i^T X_i (N, d_out, d_in) of y = W x, in float64."""
    x, g = x.double(), g.double()
    if m is not None:
        g = g * (m != 0).double().unsqueeze(-1)
    return g.transpose(1, 2) @ x


def psg_oracle(x1, g1, m1=None, x2=None, g2=None, m2=None, kernel="sgd"):
    f1 = per_sample_grads64(x1, g1, m1).flatten(1)
    f2 = f1 if x2 is None else per_sample_grads64(x2, g2, m2).flatten(1)
    if kernel == "signgd":
        return torch.sign(f1) @ torch.sign(f2).T
    if kernel == "asymmetric-signgd":
        return f1 @ torch.sign(f2).T
    return f1 @ f2.T


def sign_flip_atol(x1, g1, m1, x2, g2, m2, kernel, acc_dtype) -> float:
    """Error allowed for sign kernels when accumulating in fp32: entries of F near zero may get the
    opposite sign (or zero) from rounding. Bounded by 2 * (near-zero entries) * (largest factor)."""
    if kernel == "sgd" or acc_dtype == torch.float64:
        return 0.0
    f1 = per_sample_grads64(x1, g1, m1).flatten(1)
    f2 = f1 if x2 is None else per_sample_grads64(x2, g2, m2).flatten(1)
    fmax = max(f1.abs().max().item() if f1.numel() else 0.0, f2.abs().max().item() if f2.numel() else 0.0)
    delta = 1e-4 * fmax
    def near_zero(f):  # exact zeros (masked tokens, padded samples) are exact in every backend
        return ((f.abs() < delta) & (f != 0)).sum(dim=1).max().item() if f.numel() else 0
    near = int(near_zero(f1) + near_zero(f2))
    other = 1.0 if kernel == "signgd" else fmax
    return 2.0 * near * other + 1e-6


# ---- backend axis ---------------------------------------------------------------------------

def backend_params():
    """(backend, device) pairs for every op test: CPU ones run here, GPU ones are marked `gpu`."""
    import os

    import pytest

    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return [
        pytest.param("reference", "cpu", id="reference-cpu"),
        pytest.param("cpu", "cpu", id="native-cpu"),
        pytest.param("triton", "cpu", id="triton-interpreter", marks=[pytest.mark.skipif(
            not (interp and HAS_TRITON), reason="Triton interpreter only on GPU-less machines")]),
        pytest.param("reference", "cuda", id="reference-cuda", marks=pytest.mark.gpu),
        pytest.param("cuda", "cuda", id="native-cuda", marks=pytest.mark.gpu),
        pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    ]


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)


def random_mask(n, t, device="cpu", padded_sample=True):
    """Right-padded attention mask with random lengths; sample 0 fully padded when asked (and n > 1)."""
    lengths = torch.randint(1, t + 1, (n,))
    if padded_sample and n > 1:
        lengths[0] = 0
    m = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.uint8)
    return m.to(device)
