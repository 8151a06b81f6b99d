"""Per-block stores filled tile by tile, and tokens without gradient dropped from them: the kernel stays
exact against float64 torch.func Jacobians while less is kept and the cheaper contraction is taken."""
import pytest
import torch
from tiny_models import batch, build, column_slices, kernel_from_jacobian, reference_jacobian

import linft
from linft.capture import Store

RTOL = 1e-10


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)


@pytest.mark.parametrize("cross", [False, True])
def test_last_layer_mlp_keeps_only_the_read_position(cross):
    """Outputs read at the last real token: in the last layer, every other position of the MLP gets an
    exactly zero output gradient. Those tokens are not stored, and the block is contracted by ghost
    (one token per sample) instead of materializing per-sample gradients."""
    model = build("gpt2")
    out = linft.outputs.label_word_logits([5, 9])
    params = ["*h.1.mlp.c_fc.weight", "*h.1.mlp.c_proj.weight", "*h.1.attn.c_attn.weight", "*h.0.mlp.c_fc.weight"]
    inputs = batch(5, 7, pad_id=0)
    inputs2 = batch(3, 6, seed=4, pad_id=0) if cross else None
    ntk = linft.empirical_ntk(model, inputs, inputs2, output=out, params=params, per_layer=True, sample_tile=2)
    names = list(ntk.meta["params"])
    J1 = reference_jacobian(model, inputs, out, names)
    J2 = J1 if inputs2 is None else reference_jacobian(model, inputs2, out, names)
    assert _rel(ntk.matrix, J1 @ J2.T) < RTOL
    cols = column_slices(model, names)
    scale = (J1 @ J2.T).abs().max().item()
    for name, blk in ntk.blocks.items():
        ref = kernel_from_jacobian(J1[:, cols[name]], J2[:, cols[name]], "sgd")
        assert (blk - ref).abs().max().item() / scale < RTOL, name
    plan = {b["name"]: b for b in ntk.plan["blocks"]}
    for name in ("transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert plan[name]["method"] == "ghost", plan[name]
        assert "contracted by ghost" in plan[name]["reason"]
    # the attention projection (keys and values feed every position) and layer 0 keep every token
    assert plan["transformer.h.1.attn.c_attn.weight"]["method"] == "psg"
    assert plan["transformer.h.0.mlp.c_fc.weight"]["method"] == "psg"
    assert ntk.meta["peak_kept_bytes"] < 0.8 * sum(b["bytes"] for b in plan.values())


@pytest.mark.parametrize("kernel", ["signgd", "asymmetric-signgd"])
def test_sign_kernels_with_dropped_tokens(kernel):
    model = build("gpt2")
    out = linft.outputs.label_word_logits([5, 9])
    inputs = batch(4, 6)
    params = ["*h.1.mlp.c_fc.weight", "*h.1.mlp.c_proj.weight"]
    ntk = linft.empirical_ntk(model, inputs, output=out, params=params, kernel=kernel, sample_tile=3)
    J = reference_jacobian(model, inputs, out, list(ntk.meta["params"]))
    assert _rel(ntk.matrix, kernel_from_jacobian(J, J, kernel)) < RTOL
    assert {b["method"] for b in ntk.plan["blocks"]} == {"psg"}  # sign kernels never take ghost


def test_store_grows_pads_and_zeroes_tiles_where_the_module_did_not_run():
    s = Store(6)
    x0 = torch.randn(2, 3, 4)
    g0 = [torch.randn(2, 3, 5), torch.randn(2, 3, 5)]
    m0 = torch.tensor([[True, True, False], [True, True, True]])
    s.put("w", 0, 2, {"x": x0, "g": g0, "mask": m0})
    s.put("w", 2, 2, None)  # module not called on this tile
    x4 = torch.randn(2, 5, 4)
    g4 = [torch.randn(2, 5, 5), torch.randn(2, 5, 5)]
    m4 = torch.ones(2, 5, dtype=torch.bool)
    s.put("w", 4, 2, {"x": x4, "g": g4, "mask": m4})  # more tokens: the store grows
    f = s.forms["w"]
    assert f["x"].shape == (6, 5, 4) and f["g"].shape == (6, 2, 5, 5) and f["mask"].shape == (6, 5)
    assert torch.equal(f["x"][:2, :3], x0) and torch.equal(f["g"][:2, 1, :3], g0[1])
    assert not f["mask"][:2, 3:].any() and not f["x"][:2, 3:].any() and not f["g"][:2, :, 3:].any()
    assert not f["mask"][2:4].any() and not f["x"][2:4].any() and not f["g"][2:4].any()
    assert torch.equal(f["x"][4:], x4) and torch.equal(f["g"][4:, 0], g4[0]) and f["mask"][4:].all()
    # a block first seen after empty tiles has zero rows before it; features are kept per output
    s.put("b", 0, 2, None)
    s.put("b", 2, 4, {"features": [torch.ones(4, 3), 2 * torch.ones(4, 3)]})
    fb = s.forms["b"]["features"]
    assert fb.shape == (6, 2, 3) and not fb[:2].any() and (fb[2:, 1] == 2).all()
    assert s.nbytes() == sum(t.numel() * t.element_size() for form in s.forms.values() for t in form.values())


def test_compaction_keeps_every_token_when_the_first_sample_has_gradient_at_each():
    """The token test looks at the first sample alone when every token of it carries gradient (no
    token count can then shrink); otherwise it looks at every sample. Either way the tokens kept per
    sample are the largest count of live tokens, and the tokens moved to the front are the live ones."""
    from linft.capture import _compact
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    m = torch.ones(3, 5, dtype=torch.bool)
    g = [torch.randn(3, 5, 2), torch.randn(3, 5, 2)]
    for c in range(2):
        g[c][1:, :3] = 0  # samples 1 and 2: only the last two tokens carry gradient
    x2, g2, m2 = _compact(x, g, m)
    assert x2 is x and all(a is b for a, b in zip(g2, g)) and m2.all()  # sample 0 is full: kept whole
    g[0][0, 1] = 0
    g[1][0, 1] = 0  # now sample 0 has 4 live tokens, the others 2: T' = 4
    x3, g3, m3 = _compact(x, g, m)
    assert x3.shape == (3, 4, 4) and m3.sum(1).tolist() == [4, 2, 2]
    assert torch.equal(x3[0], x[0, [0, 2, 3, 4]]) and torch.equal(x3[1, :2], x[1, 3:])
    assert torch.equal(g3[1][0], g[1][0, [0, 2, 3, 4]]) and not g3[0][1:, 2:].any()
    m[0, 4] = False  # padding in the first sample: the test looks at every sample
    _, _, m4 = _compact(x, g, m)
    assert m4.sum(1).tolist() == [3, 2, 2]


def test_capture_tiles_cover_every_sample_once_and_halve_in_the_second_half_on_cpu():
    """On CPU the tiles of a store's second half are halved (a lower resident-memory peak at about
    the same cost per sample); on a GPU a smaller tile costs more per sample, so they stay whole."""
    from linft.engine import _capture_tiles
    ids = torch.arange(23).unsqueeze(1)
    batches = [{"input_ids": ids[:13], "attention_mask": torch.ones(13, 1)},
               {"input_ids": ids[13:], "attention_mask": torch.ones(10, 1)}]
    for device, late in (("cpu", 2), ("cuda", 4)):
        got = list(_capture_tiles(batches, 4, 23, torch.device(device)))
        starts = [s for s, _ in got]
        rows = torch.cat([t["input_ids"] for _, t in got])
        assert torch.equal(rows, ids) and starts == sorted(starts)
        sizes = []
        for s, t in got:
            B = t["input_ids"].shape[0]
            sizes.append(B)
            assert torch.equal(t["input_ids"][:, 0], torch.arange(s, s + B))
            assert B <= (4 if 2 * (s + B) <= 23 else late)
        assert (max(sizes[len(sizes) // 2:]) == 4) == (device == "cuda")


def test_progress_counts_samples(capsys):
    model = build("gpt2")
    ntk = linft.empirical_ntk(model, batch(5, 6), output=linft.outputs.label_word_logits([5, 9]),
                              params=["*h.1.mlp.c_fc.weight"], sample_tile=2, progress=True)
    assert ntk.matrix.shape == (10, 10)
    assert "5/5" in capsys.readouterr().err
