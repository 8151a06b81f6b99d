"""Backend choice: argument > LINFT_BACKEND > auto; loud explicit failures, one log line on fall-back."""
import logging

import pytest
import torch
from linft_testing import randn

import linft_kernels as lk
from linft_kernels import _dispatch, _native


def test_explicit_unavailable_backend_raises_with_reason():
    with pytest.raises(lk.BackendUnavailable, match="backend='cuda'.*needs CUDA tensors"):
        lk.gram(randn(3, 4), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        lk.gram(randn(3, 4), backend="gpu")


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("LINFT_BACKEND", "reference")
    assert _dispatch.resolve("gram", torch.device("cpu"), None) == "reference"
    monkeypatch.setenv("LINFT_BACKEND", "cuda")
    with pytest.raises(lk.BackendUnavailable, match="LINFT_BACKEND='cuda'"):
        lk.gram(randn(3, 4))
    # The argument wins over the environment.
    assert _dispatch.resolve("gram", torch.device("cpu"), "reference") == "reference"


def test_auto_prefers_native_cpu(monkeypatch):
    monkeypatch.delenv("LINFT_BACKEND", raising=False)
    assert _dispatch.resolve("gram", torch.device("cpu"), None) == "cpu"


def test_auto_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.delenv("LINFT_BACKEND", raising=False)
    monkeypatch.setattr(_native, "cpu_lib", lambda: None)
    monkeypatch.setattr(_native, "load_error", lambda name: "simulated: not built")
    monkeypatch.setattr(_dispatch, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="linft_kernels"):
        a = randn(3, 4)
        out1 = lk.gram(a)
        out2 = lk.gram(a)
    msgs = [r.getMessage() for r in caplog.records if "reference" in r.getMessage()]
    assert len(msgs) == 1 and "simulated: not built" in msgs[0]
    torch.testing.assert_close(out1, out2)


def test_backend_table_lists_every_backend():
    table = _dispatch.table()
    assert set(table) == set(lk.BACKENDS)
    assert table["reference"]["cpu"] == "yes"
    assert "needs CUDA tensors" in table["cuda"]["cpu"]


def test_cuda_auto_order_prefers_the_faster_kernel_per_op(monkeypatch):
    """On CUDA tensors auto follows the H200 measurements: into fp32, gram on the native CUDA kernel
    where it runs on wgmma and else Triton, ghost_gram on native CUDA, psg_gram on Triton; into fp64,
    the reference (cuBLAS fp64) for ghost_gram/psg_gram and native CUDA for gram; every order is
    complete."""
    from linft_kernels import _dispatch
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(_dispatch, "_wgmma_cache", {})
    paths = []
    monkeypatch.setattr(_dispatch, "_gram_path", lambda index: paths[-1])
    real = _dispatch.unavailable_reason
    monkeypatch.setattr(_dispatch, "unavailable_reason",
                        lambda b, d: None if (b, d.type) == ("cuda", "cuda") else real(b, d))
    for env, path, first in [(None, "wgmma", "cuda"), ("2", "wgmma overlap", "cuda"), ("0", "mma.sync", "triton"),
                             ("x", "cuda cores", "triton"), ("y", None, "triton"),
                             ("z", "RuntimeError: no CUDA driver", "triton")]:
        monkeypatch.setenv("LINFT_CUDA_GRAM_WGMMA", env) if env else monkeypatch.delenv(
            "LINFT_CUDA_GRAM_WGMMA", raising=False)
        paths.append(path)
        order = _dispatch._auto_order(cuda, "gram", torch.float32)
        assert order[0] == first and sorted(order) == ["cuda", "reference", "triton"], (path, order)
    # the answer is kept per device and switch value: the library is asked once for each
    paths.append("mma.sync")
    monkeypatch.delenv("LINFT_CUDA_GRAM_WGMMA", raising=False)
    assert _dispatch._auto_order(cuda, "gram", torch.float32)[0] == "cuda"
    # without the native CUDA library, Triton first
    monkeypatch.setattr(_dispatch, "unavailable_reason", real)
    assert _dispatch._auto_order(cuda, "gram", torch.float32) == ("triton", "cuda", "reference")
    assert _dispatch._auto_order(cuda, "gram", torch.float64) == ("cuda", "triton", "reference")
    assert _dispatch._auto_order(cuda, "ghost_gram", torch.float32) == ("cuda", "triton", "reference")
    assert _dispatch._auto_order(cuda, "psg_gram", torch.float32) == ("triton", "cuda", "reference")
    for op in ("ghost_gram", "psg_gram"):
        assert _dispatch._auto_order(cuda, op, torch.float64) == ("reference", "triton", "cuda")
    assert _dispatch._auto_order(torch.device("cpu"), "gram", torch.float32) == ("cpu", "reference")
