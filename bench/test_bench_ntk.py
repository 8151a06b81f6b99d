"""pytest-benchmark suite of the end-to-end NTK on one small GPT-2-shaped random model (full-weight
kernel of all linear layers): linft.empirical_ntk, the torch.func baselines vmap(jacrev) + J J^T and
NTK-vector products (a VJP and a JVP per output column), and one plain forward+backward over the same
samples (the unit of the NTK cost ratio). The standalone
harness measures the full-size configuration with peak memory (bench/harness.py --suite ntk).

    .venv/bin/python -m pytest bench/test_bench_ntk.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import flops as FL
import harness as H
from conftest import cuda_devices

SPEC = dict(n_embd=256, n_layer=2, n_head=4, vocab=8192, T=64, kernel="full")
N = 16


@pytest.fixture(scope="module", params=cuda_devices())
def setup(request):
    import linft
    device = request.param
    model, names, params = H.build_model({**SPEC, "device": device})
    batch = H.make_batch(N, SPEC["T"], SPEC["vocab"], device=device)
    output = linft.outputs.label_word_logits(list(H.LABEL_IDS))
    return device, model, names, params, batch, output


@pytest.mark.parametrize("method", ["linft", "vmap_jacrev", "ntk_vp", "fwdbwd"])
def test_ntk(measure, benchmark, setup, method):
    device, model, names, params, batch, output = setup
    benchmark.group = f"ntk full-weight GPT-2 {SPEC} N={N} {device}"
    spec = {"ntk_dtype": "float32", "chunk": 8}
    P = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    res = measure(lambda: H.run_method(method, model, batch, output, names, params, spec)[0], device,
                  rounds=3, flops=FL.ntk_contraction(N, len(H.LABEL_IDS), P))
    if method != "fwdbwd":
        assert res.shape == (N * len(H.LABEL_IDS),) * 2
