"""linft.activations: known elementwise-chain activations run as their fused torch equivalent while
linft runs the model, with the same function (to rounding) and the module restored afterwards."""
import pytest
import torch
from tiny_models import batch, build, kernel_from_jacobian, reference_jacobian

import linft
from linft.activations import fused_activations


def _new_gelu_modules(model):
    from transformers.activations import NewGELUActivation
    return [m for m in model.modules() if isinstance(m, NewGELUActivation)]


def test_fused_new_gelu_is_the_same_function_and_is_restored():
    from transformers.activations import NewGELUActivation
    model = build("gpt2")
    acts = _new_gelu_modules(model)
    assert acts, "tiny GPT-2 should use gelu_new"
    x = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    want = NewGELUActivation()(x)
    (gw,) = torch.autograd.grad(want.sum(), x)
    with fused_activations(model) as n:
        assert n == len(acts) and all("forward" in m.__dict__ for m in acts)
        got = acts[0](x)
        assert got.grad_fn.name() == "_GeluTanhBackward"  # one fused op, not a chain
        (gg,) = torch.autograd.grad(got.sum(), x)
        # one backward per output over the same forward (the derivative is computed by the first and
        # reused): each gives torch's fused gelu backward for its cotangent, bitwise
        y = acts[0](x)
        for c in (torch.randn_like(x), torch.randn_like(x)):
            (gc,) = torch.autograd.grad(y, x, grad_outputs=c, retain_graph=True)
            assert torch.equal(gc, torch.ops.aten.gelu_backward(c, x.detach(), approximate="tanh"))
        # a differentiated backward (a second derivative) and forward mode stay exact
        (g1,) = torch.autograd.grad(acts[0](x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g1 ** 2).sum(), x)
        (w1,) = torch.autograd.grad(NewGELUActivation()(x).sum(), x, create_graph=True)
        torch.testing.assert_close(h, torch.autograd.grad((w1 ** 2).sum(), x)[0], rtol=1e-12, atol=1e-13)
        t = torch.randn_like(x)
        _, jt = torch.func.jvp(acts[0], (x.detach(),), (t,))
        torch.testing.assert_close(jt, torch.func.jvp(NewGELUActivation(), (x.detach(),), (t,))[1],
                                   rtol=1e-13, atol=1e-14)
        xb = x.detach().to(torch.bfloat16).requires_grad_()  # 16-bit: torch's own backward
        assert acts[0](xb).grad_fn.name().startswith("GeluBackward")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(gg, gw, rtol=1e-13, atol=1e-14)
    assert not any("forward" in m.__dict__ for m in acts)
    with pytest.raises(RuntimeError, match="boom"):  # restored on error too
        with fused_activations(model):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in acts)
    with fused_activations(model, enabled=False) as n:
        assert n == 0


@pytest.mark.parametrize("fuse", [True, False])
def test_empirical_ntk_with_and_without_fused_activations(fuse):
    """Both settings give the float64 torch.func kernel of the model as written; the fused one runs
    the fused op during capture (seen from a forward hook) and says so in the plan."""
    model = build("gpt2")
    inputs = batch(3, 6)
    out = linft.outputs.label_word_logits([5, 9])
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, y: seen.append("forward" in m.__dict__))
             for m in _new_gelu_modules(model)]
    ntk = linft.empirical_ntk(model, inputs, output=out, fuse_activations=fuse)
    for h in hooks:
        h.remove()
    assert seen and all(s == fuse for s in seen)
    assert any("fused" in n for n in ntk.plan["notes"]) == fuse
    J = reference_jacobian(model, inputs, out, list(ntk.meta["params"]))
    K = kernel_from_jacobian(J, J, "sgd")
    assert (ntk.matrix - K).abs().max().item() < 1e-10 * K.abs().max().item()
    assert not any("forward" in m.__dict__ for m in _new_gelu_modules(model))


def _rms_norms(model):
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


def test_llama_form_rms_norms_are_recognized_by_their_forward():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from linft.activations import _is_llama_rms_norm

    class SubclassRMSNorm(LlamaRMSNorm):  # inherits the forward: the same function
        pass

    class ChangedRMSNorm(LlamaRMSNorm):  # same name pattern, another function
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    assert all(_is_llama_rms_norm(c) for c in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, SubclassRMSNorm))
    assert not _is_llama_rms_norm(GemmaRMSNorm)  # (1 + weight), computed in fp32 throughout
    assert not _is_llama_rms_norm(ChangedRMSNorm)
    assert not _is_llama_rms_norm(torch.nn.RMSNorm)
    model = build("gemma")
    with fused_activations(model) as n:
        assert n == 0 and not any("forward" in m.__dict__ for m in _rms_norms(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fused_rms_norm_is_the_same_function(dtype, monkeypatch):
    """fp32: the module's values and gradients to fp32 rounding. 16-bit: the exact value rounded once
    (at least as close to it as the module, which rounds twice). fp64 (the module computes in fp32),
    a weight that is differentiated, or of another dtype: the module's own forward."""
    import linft.activations as acts
    calls = []
    real = acts.F.rms_norm
    monkeypatch.setattr(acts.F, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build("llama").to(dtype)
    norms = _rms_norms(model)
    assert len(norms) == 5  # two per layer and the final one
    norm = norms[0]
    d = norm.weight.shape[0]
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, dtype=torch.float64))
    norm.weight.requires_grad_(False)
    x = 3 * torch.randn(4, 7, d, dtype=torch.float64)
    x[0, :3] *= 1e-4  # rows where the epsilon matters (mean square below it)
    x = x.to(dtype).requires_grad_()
    want = type(norm).forward(norm, x)
    (g_want,) = torch.autograd.grad(want, x, grad_outputs=torch.ones_like(want))
    with fused_activations(model) as n:
        assert n == 5
        got = norm(x)
        (g_got,) = torch.autograd.grad(got, x, grad_outputs=torch.ones_like(got))
    assert len(calls) == (0 if dtype == torch.float64 else 1)
    eps = norm.variance_epsilon
    x64, w64 = x.detach().double(), norm.weight.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=2e-5, atol=1e-5)
    else:
        ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
        err_fused = ((got.double() - exact).abs() / exact.abs().clamp(min=1e-3)).max().item()
        err_module = ((want.double() - exact).abs() / exact.abs().clamp(min=1e-3)).max().item()
        assert err_fused <= ulp * 1.01 and err_fused <= err_module
        torch.testing.assert_close(g_got.double(), g_want.double(), rtol=4 * ulp, atol=4 * ulp)
    if dtype != torch.float32:
        return
    calls.clear()
    with fused_activations(model):
        norm.weight.requires_grad_(True)  # a differentiated weight: the module as written
        norm(x)
        norm.weight.requires_grad_(False)
        norm(x.detach().double())  # another dtype than the weight: as written
    assert not calls


def test_empirical_ntk_of_fp32_llama_lora_with_and_without_fused_rms_norm():
    """An fp32 Llama with LoRA: the fused RMSNorm capture gives the unfused kernel to fp32 rounding,
    and both are the float64 torch.func kernel of the model to fp32 accuracy."""
    from tiny_models import with_lora
    model = with_lora(build("llama"), "llama").float()
    inputs = batch(3, 6)
    out = linft.outputs.label_word_logits([5, 9])
    fused = linft.empirical_ntk(model, inputs, output=out)
    plain = linft.empirical_ntk(model, inputs, output=out, fuse_activations=False)
    assert any("5 activation" in n for n in fused.plan["notes"])
    assert not any("fused" in n for n in plain.plan["notes"])
    scale = plain.matrix.abs().max().item()
    assert (fused.matrix - plain.matrix).abs().max().item() < 1e-5 * scale
    m64 = with_lora(build("llama"), "llama")
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    J = reference_jacobian(m64, inputs, out, list(fused.meta["params"]))
    K = kernel_from_jacobian(J, J, "sgd")
    assert (fused.matrix - K).abs().max().item() < 1e-4 * K.abs().max().item()
    assert not any("forward" in m.__dict__ for m in _rms_norms(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_on_cuda_is_one_kernel_each_way(dtype):
    """On CUDA the fused RMSNorm is torch's fused op (one autograd node, not a chain), with the
    module's values to rounding and gradients to a few ulps of the dtype."""
    model = build("llama").to(device="cuda", dtype=dtype)
    norm = _rms_norms(model)[0]
    d = norm.weight.shape[0]
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, device="cuda"))
    norm.weight.requires_grad_(False)
    x = (3 * torch.randn(5, 9, d, device="cuda")).to(dtype).requires_grad_()
    want = type(norm).forward(norm, x)
    (g_want,) = torch.autograd.grad(want, x, grad_outputs=torch.ones_like(want))
    with fused_activations(model):
        got = norm(x)
        assert "RmsNorm" in got.grad_fn.name(), got.grad_fn.name()
        (g_got,) = torch.autograd.grad(got, x, grad_outputs=torch.ones_like(got))
    tol = 2e-6 if dtype == torch.float32 else 2.0 ** -7
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=4 * tol, atol=4 * tol)
