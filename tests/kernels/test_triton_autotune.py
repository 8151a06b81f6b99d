"""Autotuned block shapes of the Triton kernels (gram, ghost_gram, psg_gram's features kernel).

In the interpreter, LINFT_TRITON_AUTOTUNE=1 runs the GPU autotune path over small configs with a CPU
timer: every trial adds into `out`, so a result equal to start + oracle (start nonzero) proves `out`
is restored between trials. The GPU config lists are checked here (tl.dot dimensions); that each one
compiles for sm_90 is test_build.py's compile_all test.
"""
import importlib

import pytest
import torch
from factor_cases import make
from linft_testing import HAS_GPU, HAS_TRITON, assert_close_to_oracle, psg_oracle, randn

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEVICE = "cuda" if HAS_GPU else "cpu"
KERNELS = ["sgd", "signgd", "asymmetric-signgd"]


def _mod(name):
    return importlib.import_module(f"linft_kernels.triton.{name}")


def _tunes():
    return {name: _mod(name)._TUNE for name in ("gram", "ghost_gram", "psg_gram")}


@pytest.fixture
def autotune(monkeypatch):
    """Interpreter autotuning on, every kernel's tunings forgotten before and after."""
    monkeypatch.setenv(_mod("_autotune").ENV_INTERP_AUTOTUNE, "1")
    for t in _tunes().values():
        t.clear()
    yield _tunes()
    for t in _tunes().values():
        t.clear()


def _check_tuned(tune, keys=1):
    """The autotuner picked a config per key, timing every config of its list (CPU timer here)."""
    (tuner,) = tune.tuners.values()
    assert len(tuner.cache) == keys and len(tuner.configs) >= 2
    assert set(tuner.configs_timings) == set(tuner.configs)
    for t in tuner.configs_timings.values():  # the (0.5, 0.2, 0.8) quantiles the autotuner asks for
        assert len(t) == 3 and all(0 < v < float("inf") for v in t)
    if tune.interpreted:
        assert tuner.do_bench is _mod("_autotune").cpu_do_bench


def _start(N, M, symmetric):
    start = randn(N, M, dtype=torch.float64, device=DEVICE)
    return start + start.T if symmetric else start


def test_cpu_do_bench_honours_quantiles():
    ab = _mod("_autotune")
    calls = []
    median = ab.cpu_do_bench(lambda: calls.append(1))
    assert isinstance(median, float) and median >= 0
    assert len(calls) == ab.CPU_BENCH_WARMUP + ab.CPU_BENCH_REPS
    qs = ab.cpu_do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8), reps=5)
    assert len(qs) == 3 and qs[1] <= qs[0] <= qs[2]
    assert ab._quantile([1.0, 2.0, 4.0], 0.75) == 3.0


def test_size_key_buckets():
    sk = _mod("_autotune").size_key
    assert sk(37, 21, 45) == sk(64, 32, 64) != sk(65, 32, 64)
    assert sk(1 << 40, 1, 1, 1, 1) < 2 ** 31  # packed in 6 bits per size: an int32


def test_config_lists():
    """Every GPU list offers a choice; tl.dot families ("16bit", "fp32") have every tl.dot dimension
    >= 16 (a GPU rejects less, the interpreter does not); fp64 multiplies without tl.dot (gram._mma) in
    small power-of-two tiles; interpreter lists too are >= 16 so they are shapes a GPU would take."""
    for name, tune in _tunes().items():
        assert set(tune.gpu_configs) == {"16bit", "fp32", "fp64"}
        for fam, cfgs in tune.gpu_configs.items():
            assert len(cfgs) >= 2, (name, fam)
            for cfg in cfgs:
                for d in tune.dot_dims:
                    v = cfg.kwargs[d]
                    assert v & (v - 1) == 0, (name, fam, d, v)
                    assert (v <= 32) if fam == "fp64" else (v >= 16), (name, fam, d, v)
        assert len(tune.interp_configs) >= 2
        for cfg in tune.interp_configs:
            assert all(cfg.kwargs[d] >= 16 for d in tune.dot_dims), name
    fp64_cube = _mod("gram").FP64_PAIR_BLOCK
    for name in ("ghost_gram", "psg_gram"):
        for cfg in _tunes()[name].gpu_configs["fp64"]:
            assert {cfg.kwargs[d] for d in _tunes()[name].dot_dims} == {fp64_cube}


def test_interpreter_default_is_fixed_blocks(monkeypatch):
    if HAS_GPU:
        pytest.skip("interpreter behaviour")
    monkeypatch.delenv(_mod("_autotune").ENV_INTERP_AUTOTUNE, raising=False)
    tune = _tunes()["gram"]
    tune.clear()
    a = randn(5, 7, device=DEVICE)
    out = torch.zeros(5, 5, dtype=torch.float64)
    _mod("gram").gram(a, None, out)
    assert tune.tuners == {}
    assert_close_to_oracle(out, a.double() @ a.double().T, torch.float64, what="fixed blocks")


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
@pytest.mark.parametrize("split_k", [None, 2], ids=["whole", "split2"])
def test_autotuned_gram(autotune, symmetric, split_k):
    """Odd shapes, several tiles per config, split-K scratch too; a second shape of the same size
    bucket reuses the tuning, one of another bucket tunes again."""
    N, M, P = 37, 21, 45
    a = randn(N, P, device=DEVICE)
    b = None if symmetric else randn(M, P, device=DEVICE)
    M = N if symmetric else M
    start = _start(N, M, symmetric)
    out = start.clone()
    _mod("gram").gram(a, b, out, split_k=split_k)
    b64 = a.double() if symmetric else b.double()
    assert_close_to_oracle(out, start + a.double() @ b64.T, torch.float64, what=f"autotuned gram {symmetric}")
    if symmetric:
        assert torch.equal(out, out.T)
    _check_tuned(autotune["gram"])
    a2 = randn(N - 3, P, device=DEVICE)  # same bucket: no new tuning
    _mod("gram").gram(a2, b, torch.zeros(N - 3, N - 3 if symmetric else M, dtype=torch.float64))
    _check_tuned(autotune["gram"])
    if not symmetric and split_k is None:
        keys = _mod("_autotune").tuned_keys()
        a3 = randn(N + 30, P, device=DEVICE)  # next bucket: tuned again
        _mod("gram").gram(a3, b, torch.zeros(N + 30, M, dtype=torch.float64))
        _check_tuned(autotune["gram"], keys=2)
        assert _mod("_autotune").tuned_keys() == keys + 1


def test_gpu_tunings_are_kept_on_disk_unless_turned_off(monkeypatch):
    """On a GPU each autotuner is built with triton.autotune's cache_results (tunings on disk, so a new
    process skips benchmarking a key it had before); not with LINFT_TRITON_AUTOTUNE_CACHE=0, nor in
    the interpreter (whose timings say nothing about a GPU). triton.autotune is replaced by a recorder."""
    ab = _mod("_autotune")
    seen = []

    def fake_autotune(configs, cache_results=False, **kw):  # a Triton whose autotune has the option
        seen.append({**kw, "cache_results": cache_results})
        return lambda kernel: kernel

    monkeypatch.setattr(ab.triton, "autotune", fake_autotune)
    for gpu, env, want in ((True, None, True), (True, "0", False), (False, None, False)):
        monkeypatch.setattr(ab, "is_interpreted", lambda kernel, gpu=gpu: not gpu)
        if env is None:
            monkeypatch.delenv(ab.ENV_AUTOTUNE_CACHE, raising=False)
        else:
            monkeypatch.setenv(ab.ENV_AUTOTUNE_CACHE, env)
        tune = ab.TunedKernel(object(), {"16bit": [object(), object()]}, [object(), object()], {},
                              dot_dims=(), key=["SIZE_KEY"])
        tune.tuner("16bit")
        assert seen[-1].get("cache_results", False) is want, (gpu, env)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_autotuned_ghost_gram(autotune, symmetric):
    x1, g1, m1, x2, g2, m2 = make((5, 4, 19, 7, 21, 17), torch.float32, DEVICE, symmetric, True)
    N, M = 5, 5 if symmetric else 4
    start = _start(N, M, symmetric)
    out = start.clone()
    _mod("ghost_gram").ghost_gram(x1, g1, m1, x2, g2, m2, out)
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    assert_close_to_oracle(out, start.cpu() + psg_oracle(*cpu), torch.float64, what=f"autotuned ghost {symmetric}")
    _check_tuned(autotune["ghost_gram"])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "cross"])
def test_autotuned_psg_gram(autotune, kernel, symmetric):
    """Both stages autotuned: the features kernel (scratch overwritten whole) and the gram (out restored)."""
    x1, g1, m1, x2, g2, m2 = make((4, 3, 9, 6, 19, 17), torch.float32, DEVICE, symmetric, True)
    N, M = 4, 4 if symmetric else 3
    start = _start(N, M, symmetric and kernel != "asymmetric-signgd")
    out = start.clone()
    psg = _mod("psg_gram")
    psg.psg_gram(x1, g1, m1, x2, g2, m2, out, psg.KERNEL_CODES[kernel])
    cpu = [None if t is None else t.cpu() for t in (x1, g1, m1, x2, g2, m2)]
    assert_close_to_oracle(out, start.cpu() + psg_oracle(*cpu, kernel=kernel), torch.float64,
                           what=f"autotuned psg {kernel} {symmetric}")
    same_size = symmetric or x1.shape[0] == x2.shape[0]
    _check_tuned(autotune["psg_gram"], keys=1 if same_size else 2)
    _check_tuned(autotune["gram"])
