"""Shared test setup: Triton interpreter on GPU-less machines, seeding, device and backend axes."""
import os
import sys

import pytest
import torch

# Shared helpers live in tests/support. Tests run with --import-mode=importlib (pyproject), so tests/
# itself is not on sys.path and tests/linft cannot shadow the linft package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

# Must happen before any Triton kernel is defined (linft_kernels.triton is imported lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests keep no Triton tunings on disk: on a GPU they run in parallel workers, and tunings timed under
# that contention would be reused by later processes (benchmarks among them); an autotune test must
# also really benchmark, not read a tuning an earlier run left.
os.environ.setdefault("LINFT_TRITON_AUTOTUNE_CACHE", "0")

from linft_testing import HAS_GPU  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
