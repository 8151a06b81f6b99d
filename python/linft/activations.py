"""Fused equivalents of activation modules that are written as chains of elementwise torch ops.

transformers' `NewGELUActivation` (GPT-2's "gelu_new") computes 0.5 x (1 + tanh(sqrt(2/pi) (x +
0.044715 x^3))) with eight separate tensor ops, and autograd differentiates it op by op: about fifteen
passes over the activation per backward. Capture runs one backward per model output, so on the CPU
NTK benchmark (GPT-2 shape, C = 2) those passes were ~0.5 s of a 3.7 s capture. torch's
`gelu(approximate="tanh")` is the same function (same formula and constants) in one fused kernel with
a fused backward. While linft runs the model, such modules use it (with the derivative computed once
per forward and reused by each output's backward, `_GeluTanh`); results differ from the module's own
only by rounding (fp64: ~1e-16, fp32: ~1e-7 relative on the NTK).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["fused_activations"]


class _GeluTanh(torch.autograd.Function):
    """gelu(x, approximate="tanh") whose derivative is computed once per forward, by the first backward
    pass, and reused by the next ones: each of those is then one multiply. Capture runs one backward
    pass per output over the same tile, and torch's gelu backward recomputes the derivative (a tanh per
    element) in every one: at C = 2 on the CPU benchmark's GELU (16 x 128 x 2048), 2 x 4.1 ms of
    backward per layer and tile becomes 4.1 + 2 x 0.9 ms. The derivative is torch's own (its gelu
    backward with a unit cotangent), so the gradients are the ones torch's backward gives (bitwise for
    the contiguous activations of capture). fp32 and fp64 only: a 16-bit derivative would round once
    more than torch's backward, which multiplies by it in fp32. A backward that is itself differentiated
    (create_graph, torch.func's nested transforms) and forward mode use torch's gelu backward."""
    generate_vmap_rule = True  # torch.func transforms (batched output gradients) see plain torch ops

    @staticmethod
    def forward(x):
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.derivative = None

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # this backward is differentiated: keep torch's differentiable op
            return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
        if ctx.derivative is None:
            unit = torch.ones((), dtype=x.dtype, device=x.device).expand_as(x)
            ctx.derivative = torch.ops.aten.gelu_backward(unit, x, approximate="tanh")
        return grad * ctx.derivative

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(tangent, x, approximate="tanh")


def _gelu_tanh(input: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and input.requires_grad and input.dtype in (torch.float32, torch.float64):
        return _GeluTanh.apply(input)
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
