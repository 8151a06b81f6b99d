"""Output presets give the same numbers whichever way the model computes them."""
import pytest
import torch
from tiny_models import batch, build, with_lora

import linft


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("lora", [False, True])
def test_label_word_logits_match_full_logits(arch, lora):
    model = build(arch)
    model = with_lora(model, arch) if lora else model
    inputs = batch(4, 6, pad_id=0)
    got = linft.outputs.label_word_logits([5, 9, 11])(model, inputs)
    full = model(**inputs).logits
    last = inputs["attention_mask"].sum(1) - 1
    want = full[torch.arange(4), last][:, [5, 9, 11]]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mask_position_and_errors():
    model = build("bert")
    inputs = batch(3, 6, padded=False)
    inputs["input_ids"][:, 2] = 4  # the "mask" token
    got = linft.outputs.label_word_logits([5, 9], position="mask", mask_token_id=4)(model, inputs)
    torch.testing.assert_close(got, model(**inputs).logits[:, 2][:, [5, 9]])
    inputs["input_ids"][1, 2] = 7
    with pytest.raises(ValueError, match="a sample has no mask token"):
        linft.outputs.label_word_logits([5], position="mask", mask_token_id=4)(model, inputs)
    with pytest.raises(ValueError, match="needs mask_token_id"):
        linft.outputs.label_word_logits([5], position="mask")


def test_label_ids_must_be_integers():
    """Label ids and class indices are integers (numpy integers and 0-d integer tensors too); floats,
    booleans (a mask is not a list of ids) and nested lists are refused by name, not misread."""
    import numpy as np
    model = build("gpt2")
    inputs = batch(2, 5)
    ids = [5, np.int64(9), torch.tensor(11)]
    torch.testing.assert_close(linft.outputs.label_word_logits(ids)(model, inputs),
                               linft.outputs.label_word_logits([5, 9, 11])(model, inputs), rtol=0, atol=0)
    for bad in ([1.0, 2.0], [True, False], [[5, 6]], np.array([True, False]), 5):
        with pytest.raises(TypeError, match="label_word_logits: expected a sequence of integer indices"):
            linft.outputs.label_word_logits(bad)
        with pytest.raises(TypeError, match=r"logits\(classes\): expected a sequence of integer indices"):
            linft.outputs.logits(bad)
    with pytest.raises(ValueError, match="label_token_ids is empty"):
        linft.outputs.label_word_logits([])


def test_sequence_log_likelihood_matches_manual():
    model = build("gpt2")
    inputs = batch(3, 6)
    got = linft.outputs.sequence_log_likelihood()(model, inputs)
    logp = torch.log_softmax(model(**inputs).logits[:, :-1], -1)
    tok = logp.gather(-1, inputs["input_ids"][:, 1:, None])[..., 0] * inputs["attention_mask"][:, 1:]
    torch.testing.assert_close(got, tok.sum(1))
