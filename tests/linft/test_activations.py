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
