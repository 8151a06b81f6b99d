"""Backend choice: argument > LINFT_BACKEND > auto; loud explicit failures, one log line on fall-back."""
import logging

import pytest
import torch
from linft_testing import randn

import linft_kernels as lk
from linft_kernels import _dispatch, _native, ops


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


def _simulated_gpu(monkeypatch, paths):
    """A CUDA device whose native library is usable and reports paths[-1] as its tensor-core path."""
    monkeypatch.setattr(_dispatch, "_path_cache", {})
    monkeypatch.setattr(_dispatch, "_gram_path", lambda index: paths[-1])
    monkeypatch.setattr(_dispatch.torch.cuda, "is_available", lambda: True)
    real = _dispatch.unavailable_reason
    monkeypatch.setattr(_dispatch, "unavailable_reason",
                        lambda b, d: None if (b, d.type) == ("cuda", "cuda") else real(b, d))
    return real


def test_cuda_auto_order_prefers_the_faster_kernel_per_op(monkeypatch):
    """On CUDA tensors auto follows the H200 measurements. Into fp32: gram of tensor-core-shaped
    16-bit inputs on the native CUDA kernel where it runs on wgmma, else Triton; ghost_gram of such
    inputs on native CUDA where it has tensor cores, else Triton then the reference; psg_gram on
    Triton. Into fp64: the reference (cuBLAS fp64) for ghost_gram/psg_gram and native CUDA for gram.
    Every order is complete."""
    cuda = torch.device("cuda:0")
    f32, f64 = torch.float32, torch.float64
    paths = []
    real = _simulated_gpu(monkeypatch, paths)
    for env, path, gram_first, ghost_first in [
            (None, "wgmma", "cuda", "cuda"), ("2", "wgmma overlap", "cuda", "cuda"),
            ("0", "mma.sync", "triton", "cuda"), ("x", "cuda cores", "triton", "triton"),
            ("y", None, "triton", "triton"), ("z", "RuntimeError: no CUDA driver", "triton", "triton")]:
        monkeypatch.setenv("LINFT_CUDA_GRAM_WGMMA", env) if env else monkeypatch.delenv(
            "LINFT_CUDA_GRAM_WGMMA", raising=False)
        paths.append(path)
        for op, first in (("gram", gram_first), ("ghost_gram", ghost_first)):
            order = _dispatch._auto_order(cuda, op, f32, tensor_cores=True)
            assert order[0] == first and sorted(order) == ["cuda", "reference", "triton"], (op, path, order)
        # inputs the native kernels would take on CUDA cores: the order of fp32 inputs
        assert _dispatch._auto_order(cuda, "gram", f32, tensor_cores=False) == ("triton", "cuda", "reference")
        assert _dispatch._auto_order(cuda, "ghost_gram", f32) == ("triton", "reference", "cuda")
        # and where such a ghost_gram takes the T x S route, cuBLAS (the reference) first
        assert _dispatch._auto_order(cuda, "ghost_gram", f32, ghost_route=True) == ("reference", "triton", "cuda")
        assert _dispatch._auto_order(cuda, "gram", f32, ghost_route=True) == ("triton", "cuda", "reference")
    # the answer is kept per device and switch value: the library is asked once for each
    paths.append("mma.sync")
    monkeypatch.delenv("LINFT_CUDA_GRAM_WGMMA", raising=False)
    assert _dispatch._auto_order(cuda, "gram", f32, tensor_cores=True)[0] == "cuda"
    assert _dispatch._auto_order(torch.device("cuda:1"), "gram", f32, tensor_cores=True)[0] == "triton"
    # without a usable native CUDA library, Triton first (and no query)
    monkeypatch.setattr(_dispatch, "unavailable_reason", real)
    monkeypatch.setattr(_dispatch, "_path_cache", {})
    for op in ("gram", "ghost_gram"):
        assert _dispatch._auto_order(cuda, op, f32, tensor_cores=True)[0] == "triton"
    assert _dispatch._path_cache == {}
    assert _dispatch._auto_order(cuda, "gram", f64, tensor_cores=True) == ("cuda", "triton", "reference")
    for tc in (True, False):
        assert _dispatch._auto_order(cuda, "psg_gram", f32, tc) == ("triton", "cuda", "reference")
        for op in ("ghost_gram", "psg_gram"):
            assert _dispatch._auto_order(cuda, op, f64, tc) == ("reference", "triton", "cuda")


def test_cuda_tensor_core_query_survives_a_torch_without_cuda(monkeypatch):
    """The native library may see a GPU that torch cannot use (a CPU build of torch, a broken CUDA
    init): the query answers None (Triton first) instead of raising, also for a device without an
    index, and python -m linft_kernels still prints its table."""
    from linft_kernels.__main__ import main
    monkeypatch.setattr(_dispatch, "_path_cache", {})
    monkeypatch.setattr(_native, "cuda_lib", lambda: object())
    monkeypatch.setattr(_native, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(_dispatch.torch.cuda, "is_available", lambda: True)

    def no_cuda(*a):
        raise AssertionError("Torch not compiled with CUDA enabled")
    monkeypatch.setattr(_dispatch.torch.cuda, "current_device", no_cuda)
    assert _dispatch._cuda_tensor_core_path(torch.device("cuda")) is None
    monkeypatch.setattr(_dispatch, "_gram_path", no_cuda)
    assert _dispatch._cuda_tensor_core_path(torch.device("cuda:0")) is None
    assert _dispatch._auto_order(torch.device("cuda"), "gram", torch.float32, tensor_cores=True)[0] == "triton"
    monkeypatch.setattr(_native, "cuda_lib", lambda: None)  # the table's other columns need no library
    assert main([]) == 0
    assert _dispatch._auto_order(torch.device("cpu"), "gram", torch.float32) == ("cpu", "reference")


def test_ops_tell_the_dispatch_whether_inputs_suit_tensor_cores(monkeypatch):
    """Auto's CUDA order depends on whether the native kernels would take the inputs on tensor cores
    (16-bit, row widths multiples of 8, 16-byte aligned) and on ghost_gram's route, so gram and
    ghost_gram hand those to `resolve` with their output's dtype."""
    seen = []
    real = _dispatch.resolve

    def spy(op, device, backend, out_dtype=None, tensor_cores=False, ghost_route=False):
        seen.append((op, out_dtype, tensor_cores) + ((ghost_route,) if op == "ghost_gram" else ()))
        return real(op, device, backend, out_dtype, tensor_cores, ghost_route)

    monkeypatch.setattr(_dispatch, "resolve", spy)
    bf16, f16 = torch.bfloat16, torch.float16
    lk.gram(randn(3, 16).to(bf16))
    lk.gram(randn(3, 12).to(f16))                    # P not a multiple of 8
    lk.gram(randn(3, 17).to(bf16)[:, 1:])            # not contiguous: copied, aligned
    lk.gram(randn(3 * 16 + 4).to(bf16)[4:].view(3, 16))   # contiguous, 8 bytes off: not aligned
    lk.gram(randn(3, 16))                             # fp32
    x, g = randn(2, 3, 8).to(bf16), randn(2, 3, 16).to(bf16)  # 2 samples: the T x S route is cheaper
    lk.ghost_gram(x, g)
    lk.ghost_gram(x, randn(2, 3, 10).to(bf16))        # d_out not a multiple of 8
    lk.ghost_gram(x, g, route="materialize")
    xs, gs = randn(40, 2, 16), randn(40, 20, 16)[:, :2]   # fp32 (g not contiguous), 2 tokens
    assert ops.ghost_route(40, 40, 2, 2, 16, 16, True) == "ghost"
    lk.ghost_gram(xs, gs)
    assert ops.ghost_route(40, 40, 20, 20, 16, 16, True) == "materialize"
    lk.ghost_gram(randn(40, 20, 16), randn(40, 20, 16))
    lk.ghost_gram(xs, gs, xs[:3], gs[:3], route="materialize")
    lk.psg_gram(x, g, out=torch.zeros(2, 2, dtype=torch.float64))
    f32, f64 = torch.float32, torch.float64
    assert seen == [("gram", f32, True), ("gram", f32, False), ("gram", f32, True), ("gram", f32, False),
                    ("gram", f32, False), ("ghost_gram", f32, True, True), ("ghost_gram", f32, False, True),
                    ("ghost_gram", f32, True, False), ("ghost_gram", f32, False, True),
                    ("ghost_gram", f32, False, False), ("ghost_gram", f32, False, False), ("psg_gram", f64, False)]
