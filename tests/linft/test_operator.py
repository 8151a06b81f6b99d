"""The matrix-free NTK operator agrees with the explicit kernel on small transformers."""
import pytest
import torch
from tiny_models import batch, build, with_lora

import linft

# Llama's RMSNorm computes in float32 even in a float64 model; forward-mode (JVP) and reverse-mode
# rounding then differ at the fp32 level. The others are float64 throughout.
TOL = {"gpt2": 1e-12, "bert": 1e-12, "llama": 1e-5}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_operator_products_match_explicit_kernel(arch):
    model = with_lora(build(arch), arch)
    inputs = batch(5, 6)
    out = linft.outputs.label_word_logits([5, 9])
    K = linft.empirical_ntk(model, inputs, output=out).matrix
    op = linft.ntk_operator(model, inputs, output=out, sample_tile=2)
    assert op.shape == K.shape == (10, 10)
    V = torch.randn(10, 3, dtype=torch.float64)
    KV = K @ V
    assert (op @ V - KV).abs().max() <= TOL[arch] * KV.abs().max()
    v = torch.randn(10, dtype=torch.float64)
    assert (op @ v).shape == (10,)
    assert op.products == 4
    torch.testing.assert_close(op.diagonal(), K.diag(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot multiply a block with 7 rows"):
        op @ torch.randn(7)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_operator_with_sdpa_attention(arch):
    """Models loaded with transformers' default attention ("sdpa": fused kernels without a
    forward-mode derivative) work too: the JVP runs attention by its math backend."""
    model = with_lora(build(arch, attn="sdpa"), arch)
    assert model.config._attn_implementation == "sdpa"
    inputs = batch(4, 6)
    out = linft.outputs.label_word_logits([5, 9])
    K = linft.empirical_ntk(model, inputs, output=out).matrix
    op = linft.ntk_operator(model, inputs, output=out, sample_tile=3)
    V = torch.randn(8, 2, dtype=torch.float64)
    KV = K @ V
    assert (op @ V - KV).abs().max() <= TOL[arch] * KV.abs().max()


def test_spectrum_of_operator_equals_spectrum_of_matrix():
    """Top eigenpairs through the matrix-free operator equal those of the explicit kernel."""
    model = with_lora(build("gpt2"), "gpt2")
    inputs = batch(6, 5)
    out = linft.outputs.label_word_logits([5, 9])
    ntk = linft.empirical_ntk(model, inputs, output=out)
    op = linft.ntk_operator(model, inputs, output=out, sample_tile=3)
    dense = torch.linalg.eigvalsh(ntk.matrix).flip(0)[:3]
    from_matrix = linft.spectrum(ntk, 3)
    from_operator = linft.spectrum(op, 3, seed=1)
    torch.testing.assert_close(from_matrix.eigenvalues, dense, rtol=1e-8, atol=0)
    torch.testing.assert_close(from_operator.eigenvalues.to(dense.dtype), dense, rtol=1e-8, atol=0)
    assert bool(from_operator.converged.all())
    assert op.products == from_operator.products
