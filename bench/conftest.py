"""pytest-benchmark suites of linft (not part of `pytest tests`; run `python -m pytest bench --benchmark-only`).

The `measure` fixture wraps pytest-benchmark's `benchmark.pedantic`: when the tensors are on CUDA, the
timed function ends with `torch.cuda.synchronize()` (and the device is synchronized before timing
starts), so kernel launches are not mistaken for finished work. Each benchmark gets its FLOP count and
achieved GFLOP/s in `extra_info` (shown with `--benchmark-columns` or saved with `--benchmark-json`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # harness.py, flops.py, machine.py are imported by the suites
    sys.path.insert(0, str(HERE))


def cuda_devices() -> list:
    """Device parameters: cpu always, cuda (skipped without a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA GPU"))]


def _is_cuda(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return True
        if isinstance(a, (torch.device, str)) and torch.device(a).type == "cuda":
            return True
    return False


@pytest.fixture
def measure(benchmark):
    """measure(fn, *tensors_or_devices, rounds=5, flops=None): time fn() with a CUDA-synchronizing
    wrapper when any given tensor/device is CUDA; returns fn's last result."""

    def run(fn, *on, rounds: int = 5, warmup: int = 1, flops: float | None = None):
        if _is_cuda(on):
            torch.cuda.synchronize()

            def timed():
                r = fn()
                torch.cuda.synchronize()
                return r
        else:
            timed = fn
        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
        if flops is not None:
            benchmark.extra_info["flops"] = flops
            st = benchmark.stats.stats if benchmark.stats is not None else None
            if st is not None and st.median > 0:
                benchmark.extra_info["gflops_median"] = flops / st.median / 1e9
        return result

    return run
