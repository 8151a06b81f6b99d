"""Fused equivalents of modules that are written as chains of elementwise torch ops.

transformers' `NewGELUActivation` (GPT-2's "gelu_new") computes 0.5 x (1 + tanh(sqrt(2/pi) (x +
0.044715 x^3))) with eight separate tensor ops, and autograd differentiates it op by op: about fifteen
passes over the activation per backward. Capture runs one backward per model output, so on the CPU
NTK benchmark (GPT-2 shape, C = 2) those passes were ~0.5 s of a 3.7 s capture. torch's
`gelu(approximate="tanh")` is the same function (same formula and constants) in one fused kernel with
a fused backward. While linft runs the model, such modules use it (with the derivative computed once
per forward and reused by each output's backward, `_GeluTanh`); results differ from the module's own
only by rounding (fp64: ~1e-16, fp32: ~1e-7 relative on the NTK).

Llama's RMSNorm (and the ~140 transformers classes that copy its forward statement for statement)
upcasts to fp32, squares, averages, adds, takes rsqrt, multiplies, rounds back and multiplies by the
weight: about six kernels forward and twelve per backward, most over fp32 copies of the activation.
`torch.nn.functional.rms_norm` is the same function; on CUDA it is one fused kernel each way
(elsewhere torch runs its decomposition: about as many ops as the module, rounding 16-bit results
once). See `_rms_norm`.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

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

# The statements of transformers' LlamaRMSNorm.forward (input hidden_states, attributes weight and
# variance_epsilon). A class whose forward is exactly these runs `_rms_norm` instead.
_LLAMA_RMS_NORM = (
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)


@functools.cache
def _is_llama_rms_norm(cls: type) -> bool:
    """Whether cls.forward is Llama's RMSNorm, statement for statement (read from its source: a model
    whose RMSNorm differs in any way, e.g. Gemma's 1 + weight, or a transformers release that changes
    the formula, is not matched and runs as written)."""
    if not cls.__name__.endswith("RMSNorm"):
        return False
    try:
        lines = inspect.getsource(cls.forward).splitlines()
    except (OSError, TypeError):
        return False
    body = [ln.strip() for ln in lines[1:]]
    return tuple(ln for ln in body if ln and not ln.startswith("#")) == _LLAMA_RMS_NORM


def _rms_norm(module: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A Llama-form RMSNorm by `F.rms_norm` (on CUDA torch's fused kernel forward and backward: the
    backward, run once per output, is one pass over the activation instead of about twelve, and no fp32
    copy of the activation is kept for it). fp32: the module's function to rounding. 16-bit: the
    normalized value times the weight is rounded once (the module rounds the normalized value, then the
    product). The module's own forward runs where that is not the same function or where its weight is
    differentiated: fp64 inputs (the module computes in fp32), a weight of another dtype or shape."""
    w = module.weight
    x = hidden_states
    if (x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w.dtype != x.dtype
            or w.shape != x.shape[-1:] or (w.requires_grad and torch.is_grad_enabled())):
        return type(module).forward(module, x)
    return F.rms_norm(x, w.shape, w, module.variance_epsilon)


def _fused_forward(module: torch.nn.Module):
    cls = type(module)
    fused = _FUSED.get((cls.__module__, cls.__name__))
    if fused is None and _is_llama_rms_norm(cls):
        fused = functools.partial(_rms_norm, module)
    return fused


@contextlib.contextmanager
def fused_activations(model: torch.nn.Module, enabled: bool = True):
    """Within the block, the model's known activation and RMSNorm modules run their fused equivalent
    (an instance `forward`, removed on exit, also on error). Yields the number of modules changed."""
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
