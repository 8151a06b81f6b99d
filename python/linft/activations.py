"""Fused equivalents of activation modules that are written as chains of elementwise torch ops.

transformers' `NewGELUActivation` (GPT-2's "gelu_new") computes 0.5 x (1 + tanh(sqrt(2/pi) (x +
0.044715 x^3))) with eight separate tensor ops, and autograd differentiates it op by op: about fifteen
passes over the activation per backward. Capture runs one backward per model output, so on the CPU
NTK benchmark (GPT-2 shape, C = 2) those passes were ~0.5 s of a 3.7 s capture. torch's
`gelu(approximate="tanh")` is the same function (same formula and constants) in one fused kernel with
a fused backward. While linft runs the model, such modules use it; results differ from the module's
own only by rounding (fp64: ~1e-16, fp32: ~1e-7 relative on the NTK).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["fused_activations"]


def _gelu_tanh(input: torch.Tensor) -> torch.Tensor:
    return F.gelu(input, approximate="tanh")


# (module path, class name) -> the fused forward of the same function
_FUSED = {
    ("transformers.activations", "NewGELUActivation"): _gelu_tanh,
}


def _fused_forward(module: torch.nn.Module):
    cls = type(module)
    return _FUSED.get((cls.__module__, cls.__name__))


@contextlib.contextmanager
def fused_activations(model: torch.nn.Module, enabled: bool = True):
    """Within the block, the model's known activation modules run their fused equivalent (an instance
    `forward`, removed on exit, also on error). Yields the number of modules changed."""
    swapped = []
    try:
        if enabled:
            for m in model.modules():
                fused = _fused_forward(m)
                if fused is not None and "forward" not in m.__dict__:  # leave instance overrides alone
                    m.forward = fused
                    swapped.append(m)
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward
