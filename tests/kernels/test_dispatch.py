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
    """On CUDA tensors auto follows the H200 measurements. Into fp32: 16-bit gram on the native CUDA
    kernel where it runs on wgmma and else Triton, fp32 gram on Triton; 16-bit ghost_gram on native
    CUDA, fp32 ghost_gram on Triton then the reference; psg_gram on Triton. Into fp64: the reference
    (cuBLAS fp64) for ghost_gram/psg_gram and native CUDA for gram. Every order is complete."""
    from linft_kernels import _dispatch
    cuda = torch.device("cuda:0")
    bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
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
        for dt in (bf16, f16):
            order = _dispatch._auto_order(cuda, "gram", f32, dt)
            assert order[0] == first and sorted(order) == ["cuda", "reference", "triton"], (path, dt, order)
        # fp32 inputs never run on wgmma: Triton first whatever the library runs
        assert _dispatch._auto_order(cuda, "gram", f32, f32) == ("triton", "cuda", "reference")
    # the answer is kept per device and switch value: the library is asked once for each
    paths.append("mma.sync")
    monkeypatch.delenv("LINFT_CUDA_GRAM_WGMMA", raising=False)
    assert _dispatch._auto_order(cuda, "gram", f32, bf16)[0] == "cuda"
    # without the native CUDA library, Triton first
    monkeypatch.setattr(_dispatch, "unavailable_reason", real)
    assert _dispatch._auto_order(cuda, "gram", f32, bf16) == ("triton", "cuda", "reference")
    assert _dispatch._auto_order(cuda, "gram", f64, f64) == ("cuda", "triton", "reference")
    for dt in (bf16, f16):
        assert _dispatch._auto_order(cuda, "ghost_gram", f32, dt) == ("cuda", "triton", "reference")
    for dt in (f32, None):
        assert _dispatch._auto_order(cuda, "ghost_gram", f32, dt) == ("triton", "reference", "cuda")
    for dt in (bf16, f32):
        assert _dispatch._auto_order(cuda, "psg_gram", f32, dt) == ("triton", "cuda", "reference")
        for op in ("ghost_gram", "psg_gram"):
            assert _dispatch._auto_order(cuda, op, f64, dt) == ("reference", "triton", "cuda")
    assert _dispatch._auto_order(torch.device("cpu"), "gram", torch.float32) == ("cpu", "reference")


def test_ops_pass_their_input_dtype_to_the_dispatch(monkeypatch):
    """The CUDA auto order depends on 16-bit or wider inputs, so every op hands its inputs' dtype
    (and its output's) to `resolve`."""
    seen = []
    real = _dispatch.resolve

    def spy(op, device, backend, out_dtype=None, in_dtype=None):
        seen.append((op, out_dtype, in_dtype))
        return real(op, device, backend, out_dtype, in_dtype)

    monkeypatch.setattr(_dispatch, "resolve", spy)
    x, g = randn(2, 3, 4).bfloat16(), randn(2, 3, 5).bfloat16()
    lk.gram(randn(3, 4).bfloat16())
    lk.ghost_gram(x, g)
    lk.psg_gram(x, g, out=torch.zeros(2, 2, dtype=torch.float64))
    assert seen == [("gram", torch.float32, torch.bfloat16), ("ghost_gram", torch.float32, torch.bfloat16),
                    ("psg_gram", torch.float64, torch.bfloat16)]
