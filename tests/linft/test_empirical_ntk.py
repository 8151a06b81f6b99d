"""empirical_ntk against float64 torch.func Jacobians (J J^T and the sign variants from the same J),
on tiny random GPT-2, Llama, BERT, RoBERTa and OPT models, with and without peft LoRA, with padding."""
import copy

import pytest
import torch
from tiny_models import (batch, build, column_slices, kernel_from_jacobian, reference_jacobian,
                         with_lora)

import linft

ARCHS = ["gpt2", "llama", "bert", "roberta", "opt"]
PAD = {"gpt2": 0, "llama": 0, "bert": 0, "roberta": 1, "opt": 1}
RTOL = 1e-10  # float64 model, float64 accumulation


def _rel(a, b):
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-300)


def _check(ntk, model, inputs, output, inputs2=None, kernel="sgd"):
    names = list(ntk.meta["params"])
    J1 = reference_jacobian(model, inputs, output, names)
    J2 = J1 if inputs2 is None else reference_jacobian(model, inputs2, output, names)
    K = kernel_from_jacobian(J1, J2, kernel)
    assert ntk.matrix.shape == K.shape
    assert _rel(ntk.matrix, K) < RTOL, f"total kernel: relative error {_rel(ntk.matrix, K):.2e}"
    if ntk.blocks:
        cols = column_slices(model, names)
        assert set(ntk.blocks) == set(names)  # no trainable parameter is skipped
        for name, blk in ntk.blocks.items():
            Kl = kernel_from_jacobian(J1[:, cols[name]], J2[:, cols[name]], kernel)
            err = (blk - Kl).abs().max().item() / max(K.abs().max().item(), 1e-300)
            assert err < RTOL, f"block {name}: error {err:.2e} relative to the total's scale"
        assert _rel(sum(ntk.blocks.values()), ntk.matrix) < 1e-12
    return K


@pytest.mark.parametrize("arch", ARCHS)
def test_full_model_lm_head_with_padding(arch):
    """All parameters trainable (embeddings, norms, tied weights included), label-word logits C=3."""
    model = build(arch)
    inputs = batch(4, 6, pad_id=PAD[arch])
    out = linft.outputs.label_word_logits([5, 9, 13])
    ntk = linft.empirical_ntk(model, inputs, output=out, per_layer=True)
    assert ntk.meta["n_outputs"] == 3 and ntk.matrix.shape == (12, 12)
    _check(ntk, model, inputs, out)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_sdpa_attention_with_padding(arch):
    """Models as transformers loads them by default (attn_implementation="sdpa", fused attention
    kernels): the same kernel as the float64 Jacobian, with padding, LoRA and per-layer blocks."""
    model = with_lora(build(arch, attn="sdpa"), arch)
    assert model.config._attn_implementation == "sdpa"
    inputs = batch(4, 6, pad_id=PAD[arch])
    out = linft.outputs.label_word_logits([5, 9])
    ntk = linft.empirical_ntk(model, inputs, output=out, per_layer=True)
    _check(ntk, model, inputs, out)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma", "phi3", "gpt_neox"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_more_decoder_families(arch, lora):
    """Qwen2 (biased q/k/v), Mistral, Gemma (RMSNorm scaled by 1 + weight; scaled embeddings tied to the
    LM head), Phi-3 (fused qkv and gate_up projections), GPT-NeoX, as loaded by default (sdpa attention),
    with padding: every parameter trainable, or LoRA on all linear layers."""
    from tiny_models import MORE_DECODERS
    import transformers as tf
    if not hasattr(tf, MORE_DECODERS[arch][0]):
        pytest.skip(f"{arch} is not in this transformers")
    model = build(arch, attn="sdpa")
    if lora:
        model = with_lora(model, arch)
    inputs = batch(4, 6)
    out = linft.outputs.label_word_logits([5, 9])
    ntk = linft.empirical_ntk(model, inputs, output=out, per_layer=True)
    _check(ntk, model, inputs, out)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trained_cross_kernel_classification(arch):
    """peft LoRA with B != 0 plus a trainable classifier head; train/test cross kernel K(X, X2)."""
    model = with_lora(build(arch, head="cls"), arch)
    for n, p in model.named_parameters():
        if "classifier" in n or "score" in n:
            p.requires_grad_(True)
    inputs, inputs2 = batch(4, 6, seed=1, pad_id=PAD[arch]), batch(3, 5, seed=2, pad_id=PAD[arch])
    out = linft.outputs.logits()
    ntk = linft.empirical_ntk(model, inputs, inputs2, output=out, per_layer=True)
    assert ntk.matrix.shape == (12, 9)
    assert any("lora_A" in n for n in ntk.blocks) and any("lora_B" in n for n in ntk.blocks)
    _check(ntk, model, inputs, out, inputs2)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_at_initialization_a_blocks_are_zero(arch):
    model = with_lora(build(arch), arch, at_init=True)
    inputs = batch(3, 5, pad_id=PAD[arch])
    out = linft.outputs.label_word_logits([4, 8])
    ntk = linft.empirical_ntk(model, inputs, output=out, per_layer=True)
    a_blocks = {n: k for n, k in ntk.blocks.items() if "lora_A" in n}
    b_blocks = {n: k for n, k in ntk.blocks.items() if "lora_B" in n}
    assert a_blocks and b_blocks
    for n, k in a_blocks.items():
        assert torch.count_nonzero(k) == 0, n
    assert all(k.abs().max() > 0 for k in b_blocks.values())
    _check(ntk, model, inputs, out)


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize", "generic"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_strategy_gives_the_same_kernel(arch, strategy):
    model = build(arch)
    inputs = batch(4, 6, pad_id=PAD[arch])
    out = linft.outputs.label_word_logits([5, 9])
    params = ["*h.1.*", "*ln_f*"] if arch == "gpt2" else ["*layers.1.*", "*norm*"]
    ntk = linft.empirical_ntk(model, inputs, output=out, strategy=strategy, per_layer=True, params=params)
    methods = {b["method"] for b in ntk.plan["blocks"]}
    if strategy == "generic":
        assert methods == {"generic"}
    elif strategy == "ghost":
        assert "ghost" in methods
    _check(ntk, model, inputs, out)


@pytest.mark.parametrize("kernel", ["signgd", "asymmetric-signgd"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_sign_kernels(arch, kernel):
    """BERT's attention key biases are left out: their gradient is exactly zero in exact arithmetic
    (softmax ignores a per-query constant), so its computed entries are rounding noise whose sign no
    two correct implementations share."""
    model = build(arch)
    for n, p in model.named_parameters():
        p.requires_grad_("key.bias" not in n)
    inputs, inputs2 = batch(3, 6, pad_id=PAD[arch]), batch(2, 4, seed=5, pad_id=PAD[arch])
    out = linft.outputs.label_word_logits([5, 9])
    ntk = linft.empirical_ntk(model, inputs, output=out, kernel=kernel, per_layer=True)
    _check(ntk, model, inputs, out, kernel=kernel)
    cross = linft.empirical_ntk(model, inputs, inputs2, output=out, kernel=kernel, strategy="materialize")
    _check(cross, model, inputs, out, inputs2, kernel=kernel)


def test_scalar_output_sequence_log_likelihood():
    model = build("llama")
    inputs = batch(4, 6)
    out = linft.outputs.sequence_log_likelihood()
    ntk = linft.empirical_ntk(model, inputs, output=out, params=["*layers.0.mlp.*", "*lm_head*"])
    assert ntk.meta["n_outputs"] == 1 and ntk.matrix.shape == (4, 4)
    _check(ntk, model, inputs, out)


def test_iterable_of_batches_with_different_lengths():
    model = build("gpt2")
    out = linft.outputs.label_word_logits([5, 9])
    parts = [batch(2, 5, seed=1), batch(3, 7, seed=2)]
    ntk = linft.empirical_ntk(model, parts, output=out, params=["*h.0.mlp.*"], sample_tile=2)
    names = list(ntk.meta["params"])
    J = torch.cat([reference_jacobian(model, b, out, names) for b in parts])
    assert _rel(ntk.matrix, J @ J.T) < RTOL


class _Scaled(torch.nn.Module):
    """A custom layer linft has no closed form for: y = x * s + mixing(x) with a trainable vector s."""

    def __init__(self, d):
        super().__init__()
        self.s = torch.nn.Parameter(torch.randn(d, dtype=torch.float64))
        self.mix = torch.nn.Linear(d, d, dtype=torch.float64)

    def forward(self, x, gate=None):
        return x * self.s + self.mix(x)


def test_unsupported_custom_module_goes_through_generic_path():
    model = build("llama")
    layer = model.model.layers[0]
    custom = _Scaled(16)
    orig_forward = layer.mlp.forward
    layer.mlp.custom = custom
    layer.mlp.forward = lambda x: custom(orig_forward(x), gate=None)
    for p in model.parameters():
        p.requires_grad_(False)
    custom.s.requires_grad_(True)
    custom.mix.weight.requires_grad_(True)
    inputs = batch(3, 5)
    out = linft.outputs.label_word_logits([5, 9])
    ntk = linft.empirical_ntk(model, inputs, output=out, per_layer=True)
    kinds = {b["name"]: b["method"] for b in ntk.plan["blocks"]}
    assert kinds["model.layers.0.mlp.custom.s"] == "generic"
    assert kinds["model.layers.0.mlp.custom.mix.weight"] in ("ghost", "psg", "features")
    _check(ntk, model, inputs, out)


def test_restores_model_state():
    """During the call: eval mode and no key/value cache (the same outputs, no cache built); after it,
    also when the output raises, training mode, requires_grad flags and use_cache are as they were."""
    model = build("gpt2").train()
    model.config.use_cache = True
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    words = linft.outputs.label_word_logits([3])

    def out(m, b):
        seen.append((m.training, m.config.use_cache))
        return words(m, b)

    linft.empirical_ntk(model, batch(2, 4), output=out, params=["*h.0.attn.c_attn.*"])
    assert seen and set(seen) == {(False, False)}
    assert model.training and model.config.use_cache is True
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}

    def broken(m, b):
        raise RuntimeError("output failed")

    with pytest.raises(RuntimeError, match="output failed"):
        linft.empirical_ntk(model, batch(2, 4), output=broken, params=["*h.0.attn.c_attn.*"])
    assert model.training and model.config.use_cache is True
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_parameter_used_outside_its_module_forward():
    """An output that reads lm_head.weight directly (never calling the module) must still get that
    parameter's kernel: the block goes through the generic path instead of being taken as zero."""
    model = build("llama")

    def direct(model, b):
        h = model.model(**b).last_hidden_state[:, -1]
        return h @ model.lm_head.weight[[5, 9]].T

    inputs = batch(3, 5, padded=False)
    ntk = linft.empirical_ntk(model, inputs, output=direct, params=["lm_head.weight", "*layers.1.mlp.up_proj*"],
                              per_layer=True)
    methods = {b["name"]: b["method"] for b in ntk.plan["blocks"]}
    assert methods["lm_head.weight"] == "generic"
    assert ntk.blocks["lm_head.weight"].abs().max() > 0
    _check(ntk, model, inputs, direct)


@pytest.mark.parametrize("strategy", ["materialize", "ghost"])
def test_bf16_model_per_sample_gradients_in_bf16(strategy):
    """A bf16 model (LoRA and full weights; padding): per-sample gradients are built as the model's own
    weight gradients would be (fp32 sums rounded once to bf16), their Gram accumulated in fp64. Against
    the float64 Jacobian of the same rounded weights: within bf16 activation/gradient rounding, and the
    strategies agree with each other far more closely than that."""
    torch.manual_seed(4)
    lora = with_lora(build("llama"), "llama").to(torch.bfloat16)
    full = build("gpt2").to(torch.bfloat16)
    out = linft.outputs.label_word_logits([4, 11])
    for model, params in ((lora, "trainable"), (full, ["*.mlp.c_fc.weight", "*.attn.c_attn.weight"])):
        inputs = batch(5, 7, seed=8)
        ntk = linft.empirical_ntk(model, inputs, output=out, params=params, strategy=strategy)
        names = list(ntk.meta["params"])
        ref = reference_jacobian(copy.deepcopy(model).double(), inputs, out, names)
        assert ntk.matrix.dtype == torch.float64
        assert _rel(ntk.matrix, ref @ ref.T) < 5e-2
        other = linft.empirical_ntk(model, inputs, output=out, params=params, strategy="materialize")
        assert _rel(ntk.matrix, other.matrix) < 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_output_gradients_give_the_same_kernel(arch, monkeypatch):
    """LINFT_BATCHED_OUTPUT_GRADS=1 runs the C backward passes of a tile as one batched pass: the same
    kernel (against the float64 Jacobian, every block, LoRA and full weights, C=3 with padding)."""
    from linft import capture
    monkeypatch.setenv("LINFT_BATCHED_OUTPUT_GRADS", "1")
    assert capture.batched_output_gradients()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(k.get("is_grads_batched")) or real(*a, **k))
    out = linft.outputs.label_word_logits([3, 5, 8])
    inputs = batch(4, 6, seed=11, pad_id=PAD[arch])
    for model in (with_lora(build(arch), arch), build(arch)):
        calls.clear()
        ntk = linft.empirical_ntk(model, inputs, output=out, per_layer=True)
        assert True in calls  # the capture ran its batched pass
        _check(ntk, model, inputs, out)
