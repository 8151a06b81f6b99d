"""pytest-benchmark suite of the kernel ops: each linft backend next to the torch baseline a user would
write, grouped per configuration so the table compares them directly. Small, representative shapes
(seconds on 2 CPU cores); the standalone harness (bench/harness.py) does the full sweep.

    .venv/bin/python -m pytest bench --benchmark-only            # all suites
    .venv/bin/python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-columns=min,median,max,rounds
"""
from __future__ import annotations

import pytest
import torch

import flops as FL
import linft_kernels as lk
from harness import _ghost_txs, _materialize
from linft_kernels import _dispatch

GRAM = [dict(N=512, P=8192), dict(N=512, M=256, P=8192)]
FACT = dict(N=32, T=64, d_in=256, d_out=256)
DTYPES = [torch.float32, torch.bfloat16]


def _backends(device):
    names = ("cuda", "triton", "reference") if device == "cuda" else ("cpu", "reference")
    return [b for b in names if _dispatch.unavailable_reason(b, torch.device(device)) is None]


def _rand(device, dtype, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _cases(extra=()):
    """(impl, device) pairs: every available linft backend and the baseline(s) per device; one skipped
    placeholder for CUDA when there is no GPU."""
    out = []
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            out.append(pytest.param("baseline", "cuda", marks=pytest.mark.skip(reason="no CUDA GPU")))
            continue
        out += [(f"linft:{b}", device) for b in _backends(device)]
        out += [("baseline", device)] + [(e, device) for e in extra]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("dims", GRAM, ids=lambda d: "sym" if "M" not in d else "cross")
@pytest.mark.parametrize("impl,device", _cases(extra=("baseline_einsum",)))
def test_gram(measure, benchmark, impl, dims, dtype, device):
    a = _rand(device, dtype, dims["N"], dims["P"])
    b = _rand(device, dtype, dims["M"], dims["P"], seed=1) if "M" in dims else None
    benchmark.group = f"gram {'sym' if b is None else 'cross'} {dims} {dtype} {device}"
    if impl == "baseline":
        fn = (lambda: a @ a.T) if b is None else (lambda: a @ b.T)
    elif impl == "baseline_einsum":
        fn = lambda: torch.einsum("np,mp->nm", a, a if b is None else b)  # noqa: E731
    else:
        be = impl.split(":")[1]
        fn = lambda: lk.gram(a, b, backend=be)  # noqa: E731
    measure(fn, a, flops=FL.gram(dims["N"], dims["P"], dims.get("M"))["flops"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("impl,device", _cases(extra=("baseline_txs",)))
def test_ghost_gram(measure, benchmark, impl, dtype, device):
    x = _rand(device, dtype, FACT["N"], FACT["T"], FACT["d_in"])
    g = _rand(device, dtype, FACT["N"], FACT["T"], FACT["d_out"], seed=1)
    benchmark.group = f"ghost_gram {FACT} {dtype} {device}"
    if impl == "baseline":      # materialize F = einsum, then F F^T
        fn = lambda: _materialize(x, g, None, None)  # noqa: E731
    elif impl == "baseline_txs":  # the T x S ghost einsum
        fn = lambda: _ghost_txs(x, g, None, None)  # noqa: E731
    else:
        be = impl.split(":")[1]
        fn = lambda: lk.ghost_gram(x, g, backend=be)  # noqa: E731
    measure(fn, x, flops=FL.ghost_gram(FACT["N"], FACT["T"], FACT["d_in"], FACT["d_out"])["flops"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kernel", ["sgd", "signgd"])
@pytest.mark.parametrize("impl,device", _cases())
def test_psg_gram(measure, benchmark, impl, kernel, dtype, device):
    x = _rand(device, dtype, FACT["N"], FACT["T"], FACT["d_in"])
    g = _rand(device, dtype, FACT["N"], FACT["T"], FACT["d_out"], seed=1)
    benchmark.group = f"psg_gram/{kernel} {FACT} {dtype} {device}"
    if impl == "baseline":
        fn = lambda: _materialize(x, g, None, None, kernel)  # noqa: E731
    else:
        be = impl.split(":")[1]
        fn = lambda: lk.psg_gram(x, g, kernel=kernel, backend=be)  # noqa: E731
    measure(fn, x, flops=FL.psg_gram(FACT["N"], FACT["T"], FACT["d_in"], FACT["d_out"])["flops"])
