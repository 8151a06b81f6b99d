"""capture on a small custom model: an in-place op on a module's output after it returned, a module
whose output nothing reads (with LoRA and padding), and a non-finite output, which names the first
module that produced one."""
import pytest
import torch
from tiny_models import VOCAB, batch, kernel_from_jacobian, reference_jacobian

import linft
from linft.capture import NonFiniteError


class _InPlaceNet(torch.nn.Module):
    """fc1's output (a view of a 2-d product, as F.linear returns for 3-d inputs) is changed in place
    after fc1 returns (`op`); `unused` runs but nothing reads its output."""

    def __init__(self, op: str = "add_"):
        super().__init__()
        self.op = op
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.fc1 = torch.nn.Linear(8, 12)
        self.fc2 = torch.nn.Linear(12, 3)
        self.unused = torch.nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        self.unused(h)
        y = self.fc1(h)
        if self.op == "read_both":  # read before and after an in-place op
            z = 2.0 * y  # (saves nothing that the add changes)
            y.add_(3.0)
            y = torch.tanh(y) + z
        elif self.op == "slice_mul_":  # an in-place op on part of it (a view that is not a reshape)
            y[..., :5].mul_(3.0)
            y = torch.tanh(y)
        else:
            getattr(y, self.op)(3.0)
            y = torch.tanh(y)
        if attention_mask is not None:
            y = y * attention_mask[..., None]
        return self.fc2(y).sum(1)  # (B, 3)


def _net(op: str = "add_"):
    torch.manual_seed(0)
    return _InPlaceNet(op).double().eval()


def _out(model, b):
    return model(**linft.outputs.model_inputs(b))


def _check(model, inputs, params="trainable"):
    ntk = linft.empirical_ntk(model, inputs, output=_out, params=params, per_layer=True)
    J = reference_jacobian(model, inputs, _out, list(ntk.meta["params"]))
    K = kernel_from_jacobian(J, J, "sgd")
    assert (ntk.matrix - K).abs().max().item() < 1e-10 * K.abs().max().item()
    return ntk


@pytest.mark.parametrize("op", ["add_", "mul_", "read_both", "slice_mul_"])
def test_in_place_op_after_a_module_and_an_unread_module(op):
    """The gradient at fc1 is the one at the value fc1 returned, whatever in-place op changed it after
    (for mul_ the gradient at the changed value would be 3x off); `unused` gets zero blocks."""
    model = _net(op)
    ntk = _check(model, batch(4, 6), params=["fc1.weight", "fc1.bias", "fc2.weight", "unused.weight"])
    assert ntk.blocks["unused.weight"].abs().max().item() == 0.0
    assert ntk.blocks["fc1.weight"].abs().max().item() > 0.0


def test_lora_with_padding_and_an_unread_module():
    """LoRA on every Linear (each B module's input is its A module's output); the adapters of the
    module whose output nothing reads get zero blocks; padded tokens add nothing; exact."""
    import peft
    model = peft.get_peft_model(_net(), peft.LoraConfig(r=2, target_modules=["fc1", "fc2", "unused"],
                                                         init_lora_weights=False)).eval()
    ntk = _check(model, batch(5, 7, seed=2))
    unused = [k for k in ntk.blocks if "unused" in k]
    assert unused and all(ntk.blocks[k].abs().max().item() == 0.0 for k in unused)
    assert all(ntk.blocks[k].abs().max().item() > 0.0 for k in ntk.blocks if "unused" not in k)


def test_non_finite_output_names_the_first_module_that_produced_one():
    model = _net()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'fc2'"):
        linft.empirical_ntk(model, batch(3, 5), output=_out, params=["fc1.weight", "fc2.weight"])


class _Chain(torch.nn.Module):
    """b's input is a's output (as a LoRA B module's is its A module's); b's output (a view: a Linear
    with bias on 3-d input) is read, then gets an in-place add after b returned, when `in_place`."""

    def __init__(self, in_place: bool, twice: bool = False):
        super().__init__()
        self.in_place, self.twice = in_place, twice
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.a = torch.nn.Linear(8, 4, bias=False)
        self.b = torch.nn.Linear(4, 6)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        y = self.b(self.a(h))
        if self.twice:  # a and b called again: b's features add up over its two calls
            y = y + self.b(self.a(h.flip(1)))
        z = 0
        if self.in_place:
            z = 2.0 * y
            y.add_(0.5)
        return (torch.tanh(y) + z).sum(1)[:, :3]


@pytest.mark.parametrize("in_place,twice", [(False, False), (True, False), (False, True)])
def test_fed_module_forms_in_the_backward_passes(in_place, twice, monkeypatch):
    """b (fed by a) is captured during the backward passes (its output gradient consumed by a hook on
    its output's base, a 2-d product of which the 3-d output is a view, so an in-place op on the view
    after b returned does not route the later uses around it). Exact, tile after tile."""
    import linft.capture as capture
    monkeypatch.delenv("LINFT_BATCHED_OUTPUT_GRADS", raising=False)  # batched passes capture b after them
    torch.manual_seed(1)
    model = _Chain(in_place, twice).double().eval()
    stored, off = [], []
    real_store, real_off = capture._InPassForms._store, capture._off_graph
    monkeypatch.setattr(capture._InPassForms, "_store",
                        lambda self, name, call, c, g: stored.append(name) or real_store(self, name, call, c, g))
    monkeypatch.setattr(capture, "_off_graph", lambda f, wanted: off.append(r := real_off(f, wanted)) or r)
    ntk = linft.empirical_ntk(model, batch(5, 6, seed=4, padded=False), output=_out, params=["a.weight", "b.weight", "b.bias"],
                              sample_tile=2, strategy="materialize", per_layer=True)
    J = reference_jacobian(model, batch(5, 6, seed=4, padded=False), _out, list(ntk.meta["params"]))
    K = kernel_from_jacobian(J, J, "sgd")
    assert (ntk.matrix - K).abs().max().item() < 1e-10 * K.abs().max().item()
    assert off and all(o == set() for o in off)
    captures = 1 + 3  # the probe's capture of its samples, then three tiles
    assert len(stored) == captures * 3 * (2 if twice else 1) and set(stored) == {"b"}


def test_non_finite_output_found_after_the_tiles(monkeypatch):
    """With the check deferred to the end of the pass (as on a GPU), the error still names the module,
    and the samples of the first tile whose output was non-finite."""
    from linft import engine
    monkeypatch.setattr(engine, "_defer_checks", lambda device: True)
    model = _net()
    inputs = batch(6, 5, padded=False)
    inputs["input_ids"][2:4, 1] = 7
    with torch.no_grad():  # only token 7 makes fc2's output non-finite
        model.emb.weight[7] = float("inf")
    tiles = []
    real = engine.capture_tile
    monkeypatch.setattr(engine, "capture_tile", lambda m, t, *a, **k: tiles.append(t) or real(m, t, *a, **k))
    with pytest.raises(NonFiniteError, match=r"module 'fc1' \(samples 2\.\."):
        linft.empirical_ntk(model, inputs, output=_out, params=["fc1.weight", "fc2.weight"], sample_tile=2)
    # flags already on the host are checked after each tile: the pass stops at the bad one
    assert len(tiles) == 2  # of the 5 (the second half's tiles are halved on CPU)


def test_unpadded_samples():
    from linft.data import unpadded_samples
    b = batch(5, 6)
    want = b["attention_mask"].bool().all(dim=1)
    assert torch.equal(unpadded_samples([b, {"input_ids": b["input_ids"][:2]}]),
                       torch.cat([want, torch.ones(2, dtype=torch.bool)]))


def test_deferred_check_names_the_right_samples_after_a_first_tile_run_twice(monkeypatch):
    """A first tile captured again (an in-place op moved an early output edge off the graph) adds one
    finiteness flag, not two: the samples reported are still those of the non-finite output."""
    from linft import engine
    monkeypatch.setattr(engine, "_defer_checks", lambda device: True)
    monkeypatch.delenv("LINFT_BATCHED_OUTPUT_GRADS", raising=False)
    torch.manual_seed(1)
    model = _Chain(in_place=True).double().eval()
    inputs = batch(6, 5, padded=False)
    inputs["input_ids"][:, 1] = 3
    inputs["input_ids"][4, 1] = 7
    with torch.no_grad():
        model.emb.weight[7] = float("inf")
    with pytest.raises(NonFiniteError, match=r"module 'a' \(samples 4\.\.4\)"):
        linft.empirical_ntk(model, inputs, output=_out, params=["a.weight", "b.weight", "b.bias"],
                            sample_tile=2, strategy="materialize")


class _Branches(torch.nn.Module):
    """Where an in-place op lands relative to the fed module b (input: a's output):
    "feeder": a's output is changed after b read it (b's output is then not on the way to a's);
    "chain": b and c each fed by the previous output, each output changed in place after it fed on;
    "later": d (fed by a) runs, with an in-place op on its view output, only for samples whose first
    token is 7, so only in later tiles."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.emb = torch.nn.Embedding(VOCAB, 4)
        self.a, self.b, self.c, self.d = (torch.nn.Linear(4, 4) for _ in range(4))

    def forward(self, input_ids, attention_mask=None):
        x1 = self.a(self.emb(input_ids))
        if self.case == "feeder":
            y = self.b(x1)
            x1.add_(1.0)
            y = y + x1
        elif self.case == "chain":
            x2 = self.b(x1)
            x2.add_(x1)
            y = self.c(x2)
            y.mul_(1.5)
        else:
            y = self.b(x1)
            if bool((input_ids[:, 0] == 7).any()):
                u = self.d(x1)
                u.mul_(2.0)
                y = y + u
        return torch.tanh(y).sum(1)[:, :2]


@pytest.mark.parametrize("case", ["feeder", "chain", "later"])
def test_in_place_ops_around_fed_modules(case, monkeypatch):
    """Every such case falls back (or stays) exact, tile after tile, whichever blocks are tracked."""
    monkeypatch.delenv("LINFT_BATCHED_OUTPUT_GRADS", raising=False)
    torch.manual_seed(0)
    model = _Branches(case).double().eval()
    inputs = batch(4, 5, padded=False)
    inputs["input_ids"][:, 0] = 3
    inputs["input_ids"][[1, 3], 0] = 7
    params = {"feeder": ["a.weight", "b.bias"], "chain": ["a.weight", "b.weight", "c.weight"],
              "later": ["a.weight", "b.weight", "d.weight", "d.bias"]}[case]
    ntk = linft.empirical_ntk(model, inputs, output=_out, params=params, sample_tile=1, per_layer=True,
                              strategy="materialize")
    J = reference_jacobian(model, inputs, _out, list(ntk.meta["params"]))
    K = kernel_from_jacobian(J, J, "sgd")
    assert (ntk.matrix - K).abs().max().item() < 1e-10 * K.abs().max().item()
    assert all(ntk.blocks[p].abs().max().item() > 0 for p in params)
