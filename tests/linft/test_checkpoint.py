"""A long NTK run never loses finished work: with `checkpoint=DIR` every finished block is saved, and a
run that stopped (an exception, or the process killed) resumes at the first unfinished block and
returns exactly the matrix of an uninterrupted run."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import batch, build

import linft
import linft.engine as engine

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")
PARAMS = ["*h.0.*", "*h.1.mlp.*", "*ln_f*"]
_CONTRACT = engine.contract_block
_CAPTURE = engine.capture_tile


class _Stop(RuntimeError):
    pass


def _counting_contract(monkeypatch, stop_at=None):
    """Replace contract_block by one that counts calls and raises on call number `stop_at`."""
    calls = []
    real = _CONTRACT

    def contract(block, *a, **k):
        if stop_at is not None and len(calls) + 1 == stop_at:
            raise _Stop(block.name)
        calls.append(block.name)
        return real(block, *a, **k)

    monkeypatch.setattr(engine, "contract_block", contract)
    return calls


@pytest.mark.parametrize("per_layer", [False, True])
def test_resume_after_an_exception_gives_the_identical_matrix(tmp_path, monkeypatch, per_layer):
    model = build("gpt2")
    inputs = batch(5, 6)
    out = linft.outputs.label_word_logits([5, 9])
    kw = dict(output=out, params=PARAMS, per_layer=per_layer, sample_tile=2)
    ref = linft.empirical_ntk(model, inputs, **kw)
    n_blocks = len(ref.plan["blocks"])

    _counting_contract(monkeypatch, stop_at=4)
    with pytest.raises(_Stop):
        linft.empirical_ntk(model, inputs, checkpoint=tmp_path, **kw)
    side = json.loads((tmp_path / "checkpoint.json").read_text())
    assert len(side["done"]) == 3

    calls = _counting_contract(monkeypatch)
    resumed = linft.empirical_ntk(model, inputs, checkpoint=tmp_path, **kw)
    assert len(calls) == n_blocks - 3  # finished blocks are not computed again
    assert torch.equal(resumed.matrix, ref.matrix)
    assert set(resumed.blocks) == set(ref.blocks)
    for name, k in ref.blocks.items():
        assert torch.equal(resumed.blocks[name], k), name
    assert [b["method"] for b in resumed.plan["blocks"]] == [b["method"] for b in ref.plan["blocks"]]
    assert any("resumed from checkpoint" in n for n in resumed.plan["notes"])

    # a finished checkpoint returns the result without computing anything
    calls = _counting_contract(monkeypatch)
    again = linft.empirical_ntk(model, inputs, checkpoint=tmp_path, **kw)
    assert calls == [] and torch.equal(again.matrix, ref.matrix)


def test_resume_skips_finished_passes(tmp_path, monkeypatch):
    model = build("gpt2")
    inputs = batch(4, 6)
    out = linft.outputs.label_word_logits([5, 9])
    free = linft.empirical_ntk(model, inputs, output=out, params=PARAMS)
    budget = int(max(b["bytes"] for b in free.plan["blocks"]) * 1.2)
    kw = dict(output=out, params=PARAMS, memory_budget=budget)
    ref = linft.empirical_ntk(model, inputs, **kw)
    passes = ref.plan["passes"]
    assert len(passes) > 2
    _counting_contract(monkeypatch, stop_at=len(passes[0]) + len(passes[1]) + 1)  # fails in the third pass
    with pytest.raises(_Stop):
        linft.empirical_ntk(model, inputs, checkpoint=tmp_path, **kw)
    captured = []
    real_capture = _CAPTURE
    monkeypatch.setattr(engine, "capture_tile", lambda m, t, o, blocks, *a, **k: captured.append(
        [b.name for b in blocks]) or real_capture(m, t, o, blocks, *a, **k))
    _counting_contract(monkeypatch)
    resumed = linft.empirical_ntk(model, inputs, checkpoint=tmp_path, **kw)
    assert torch.equal(resumed.matrix, ref.matrix)
    done_early = set(passes[0]) | set(passes[1])
    assert captured and not any(set(c) & done_early for c in captured)


def test_another_computation_is_refused(tmp_path):
    model = build("gpt2")
    out = linft.outputs.label_word_logits([5, 9])
    linft.empirical_ntk(model, batch(3, 5), output=out, params=PARAMS, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="holds another computation.*inputs"):
        linft.empirical_ntk(model, batch(3, 5, seed=1), output=out, params=PARAMS, checkpoint=tmp_path)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias.add_(1e-3)  # a frozen parameter changes the kernel too
    with pytest.raises(ValueError, match="holds another computation.*model"):
        linft.empirical_ntk(model, batch(3, 5), output=out, params=PARAMS, checkpoint=tmp_path)


def test_resume_after_the_process_is_killed(tmp_path):
    """The process dies (SIGKILL) in the middle of the run; a new process resumes from the directory."""
    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {SUPPORT!r})
        from tiny_models import batch, build
        import linft, linft.engine as engine
        model, inputs = build("gpt2"), batch(5, 6)
        out = linft.outputs.label_word_logits([5, 9])
        if sys.argv[1] == "kill":
            real, n = engine.contract_block, []
            def contract(*a, **k):
                n.append(1)
                if len(n) == 5:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*a, **k)
            engine.contract_block = contract
        ntk = linft.empirical_ntk(model, inputs, output=out, params={PARAMS!r}, sample_tile=2,
                                  checkpoint=sys.argv[2] if len(sys.argv) > 2 else None)
        torch.save(ntk.matrix, sys.argv[3] if len(sys.argv) > 3 else {str(tmp_path / "ref.pt")!r})
    """)
    ckpt = str(tmp_path / "ckpt")
    run = lambda *args: subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                                       timeout=300)
    ref = run("plain")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = run("kill", ckpt, str(tmp_path / "never.pt"))
    assert killed.returncode == -9 and not (tmp_path / "never.pt").exists()
    assert len(json.loads(open(os.path.join(ckpt, "checkpoint.json")).read())["done"]) == 4
    resumed = run("resume", ckpt, str(tmp_path / "resumed.pt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "ref.pt"))
