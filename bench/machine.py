"""Hardware, software and load metadata for benchmark rows, and the machine's measured GEMM peak.

The peak is *measured*, not taken from a datasheet: the best rate of a large square torch GEMM
(fp32 on CPU, bf16 and fp32 on CUDA; the other dtype too when cheap), in the same run as the
benchmarks, so the "percent of peak" columns compare against what this machine delivers right now
(including whatever else is running on it).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_info() -> dict:
    if os.environ.get("LINFT_GIT_COMMIT"):  # an exported copy of the tree (GPU runs): said by the caller
        return {"git_commit": os.environ["LINFT_GIT_COMMIT"], "git_dirty": None}
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:  # not installed or broken: the row says so
        return None


@lru_cache(maxsize=None)
def hardware(device: str = "cpu") -> dict:
    hw = {
        "cpu_model": _cpu_model(),
        "cpu_flags": " ".join(_cpu_flags()),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": _mem_total(),
        "platform": platform.platform(),
        "gpu": None,
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        hw["gpu"] = p.name
        hw["gpu_mem_bytes"] = p.total_memory
        hw["gpu_capability"] = f"{p.major}.{p.minor}"
        hw["gpu_count"] = torch.cuda.device_count()
        try:  # which tensor-core kernel the native CUDA gram runs here (wgmma, mma.sync)
            from linft_kernels import _native
            hw["native_cuda_gram"] = _native.gram_tensor_core_path()
        except ImportError as e:  # the row says why
            hw["native_cuda_gram"] = f"{type(e).__name__}: {e}"
    return hw


@lru_cache(maxsize=None)
def versions() -> dict:
    import sys
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "triton": _version("triton"), "linft": _version("linft"), "linft_kernels": _version("linft_kernels"),
         "transformers": _version("transformers"), "peft": _version("peft"), "numpy": _version("numpy")}
    v["linft_build"] = kernel_build()
    return v


def kernel_build() -> dict:
    """Identity of the native kernels actually on disk: build time and a hash of each library.
    (Kernels may be rebuilt while a long run goes on; rows carry what their process loaded.)"""
    import glob
    import hashlib
    out = {}
    try:
        from linft_kernels import _native
        info = _native.build_info()
        out["built_at"] = info.get("built_at") or info.get("built")
        out["cpu_flags"] = info.get("cpu_flags")
        here = Path(_native.__file__).parent
        for path in sorted(glob.glob(str(here / "_C_*.so"))):
            with open(path, "rb") as f:
                out[Path(path).name.split(".")[0] + "_sha1"] = hashlib.sha1(f.read()).hexdigest()[:12]
    except Exception as e:  # the row says why
        out["error"] = f"{type(e).__name__}: {e}"
    # The Python sources too: the engine can change without the kernels changing.
    h = hashlib.sha1()
    for path in sorted(glob.glob(str(REPO / "python" / "linft" / "*.py")) +
                       glob.glob(str(REPO / "linft_kernels" / "**" / "*.py"), recursive=True)):
        with open(path, "rb") as f:
            h.update(f.read())
    out["py_sources_sha1"] = h.hexdigest()[:12]
    return out


def metadata(device: str = "cpu") -> dict:
    """Everything a row carries besides its measurement."""
    return {"hardware": hardware(device), "versions": versions(), **git_info(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                 reps: int = 3, budget_s: float = 20.0) -> dict:
    """Best achieved GFLOP/s of an n x n x n torch GEMM (``a @ b``) on `device` in `dtype`.

    n defaults to 4096 on CPU and 8192 on CUDA. The best of `reps` timed calls (after one warm-up)
    is the peak: that is the rate this machine can deliver; the median is recorded next to it.
    Stops early after `budget_s` seconds.
    """
    dev = torch.device(device)
    if n is None:
        n = 8192 if dev.type == "cuda" else 4096
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=dev, dtype=dtype)
    _sync(dev)
    a @ b
    _sync(dev)
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    flop = 2.0 * n ** 3
    times.sort()
    return {"peak_gflops": flop / times[0] / 1e9, "median_gflops": flop / times[len(times) // 2] / 1e9,
            "gemm_n": n, "dtype": str(dtype).replace("torch.", ""), "device": dev.type, "reps": len(times)}


def measure_peaks(device: str = "cpu", quick: bool = False) -> dict:
    """{dtype name: peak record} for the dtypes the benchmarks use on `device`."""
    if device == "cuda":
        sizes = {torch.bfloat16: 8192, torch.float32: 8192, torch.float16: 8192}
        if quick:
            sizes = {d: 4096 for d in sizes}
    else:  # large enough to reach the plateau on a few cores, small enough for ~10 s per dtype
        sizes = {torch.float32: 6144, torch.bfloat16: 8192, torch.float64: 4096}
        if quick:
            sizes = {d: 2048 for d in sizes}
    return {str(d).replace("torch.", ""): measure_peak(device, d, n=n, reps=3) for d, n in sizes.items()}


if __name__ == "__main__":
    import json
    import sys
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(json.dumps({**metadata(dev), "peaks": measure_peaks(dev)}, indent=2))
