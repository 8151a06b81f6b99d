"""The NTK result object and the engine's contract around it: save/load, block sums, errors."""
import math

import pytest
import torch
from tiny_models import batch, build, reference_jacobian

import linft


@pytest.fixture(scope="module")
def gpt2_ntk():
    model = build("gpt2")
    inputs = batch(3, 5)
    out = linft.outputs.label_word_logits([5, 9])
    return model, inputs, out, linft.empirical_ntk(model, inputs, output=out, per_layer=True,
                                                   params=["*h.*.attn.*", "*h.*.ln_1.*"])


def test_save_load_roundtrip(gpt2_ntk, tmp_path):
    *_, ntk = gpt2_ntk
    path = tmp_path / "k.safetensors"
    ntk.save(path)
    back = linft.NTK.load(path)
    assert torch.equal(back.matrix, ntk.matrix)
    assert list(back.blocks) == list(ntk.blocks)
    for n in ntk.blocks:
        assert torch.equal(back.blocks[n], ntk.blocks[n])
    assert back.meta == ntk.meta and back.plan["passes"] == ntk.plan["passes"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries
    with pytest.raises(FileNotFoundError, match="missing"):
        linft.NTK.load(tmp_path / "nothing.safetensors")


def test_by_layer_and_by_module_sum_to_total(gpt2_ntk):
    *_, ntk = gpt2_ntk
    layers = ntk.by_layer()
    assert set(layers) == {0, 1}
    torch.testing.assert_close(sum(layers.values()), ntk.matrix, rtol=1e-12, atol=1e-12)
    modules = ntk.by_module()
    assert "transformer.h.0.attn.c_attn" in modules
    torch.testing.assert_close(sum(modules.values()), ntk.matrix, rtol=1e-12, atol=1e-12)
    k0 = ntk.sum_blocks("transformer.h.0.*")
    torch.testing.assert_close(k0, layers[0])
    assert ntk.per_output().shape == (3, 2, 3, 2)


def test_metadata_plan_and_timings(gpt2_ntk):
    *_, ntk = gpt2_ntk
    assert ntk.meta["n_samples"] == 3 and ntk.meta["n_outputs"] == 2 and ntk.meta["symmetric"]
    assert ntk.meta["n_params"] == sum(ntk.meta["params"].values())
    assert {b["name"] for b in ntk.plan["blocks"]} == set(ntk.blocks)
    assert all(math.isfinite(v) and v >= 0 for v in ntk.timings.values())


def test_float32_model_accumulates_in_float64():
    model = build("llama").float()
    inputs = batch(3, 5)
    out = linft.outputs.label_word_logits([5, 9])
    ntk = linft.empirical_ntk(model, inputs, output=out, params=["*layers.0.mlp.*"])
    assert ntk.matrix.dtype == torch.float64
    J = reference_jacobian(model.double(), inputs, out, list(ntk.meta["params"]))
    K = J @ J.T
    err = (ntk.matrix - K).abs().max() / K.abs().max()
    assert err < 1e-5  # fp32 layer arithmetic, fp64 accumulation


def test_progress_bar_and_plan_print(capsys):
    model = build("gpt2")
    linft.empirical_ntk(model, batch(3, 5), output=linft.outputs.label_word_logits([5]),
                        params=["*h.0.mlp.*"], progress=True, verbose=True, sample_tile=1)
    captured = capsys.readouterr()
    assert "NTK plan" in captured.out and "c_fc.weight" in captured.out
    assert "NTK" in captured.err  # tqdm writes to stderr


def test_bad_input_errors():
    model = build("gpt2")
    out = linft.outputs.label_word_logits([5])
    with pytest.raises(ValueError, match="inputs is empty"):
        linft.empirical_ntk(model, [], output=out)
    with pytest.raises(ValueError, match="inputs is empty"):
        linft.empirical_ntk(model, {"input_ids": torch.zeros(0, 4, dtype=torch.long)}, output=out)
    with pytest.raises(ValueError, match="disagree on the batch dimension"):
        linft.empirical_ntk(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long),
                                    "attention_mask": torch.ones(3, 4)}, output=out)
    with pytest.raises(ValueError, match=r"no parameter name matches \['\*nope\*'\]"):
        linft.empirical_ntk(model, batch(2, 3), output=out, params=["*nope*"])
    with pytest.raises(ValueError, match="kernel must be one of"):
        linft.empirical_ntk(model, batch(2, 3), output=out, kernel="adam")
    with pytest.raises(ValueError, match="strategy must be one of"):
        linft.empirical_ntk(model, batch(2, 3), output=out, strategy="fast")
    with pytest.raises(TypeError, match="output must be a callable"):
        linft.empirical_ntk(model, batch(2, 3), output="logits")
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, C\)"):
        linft.empirical_ntk(model, batch(2, 3), output=lambda m, b: m(**b).logits)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        linft.empirical_ntk(model, batch(2, 3), output=out)


def test_non_finite_output_names_the_layer():
    model = build("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"transformer\.h\.1\.mlp\.c_fc"):
        linft.empirical_ntk(model, batch(2, 4), output=linft.outputs.label_word_logits([5]),
                            params=["*h.*.mlp.c_fc.weight"])
