"""Block-shape autotuning shared by the Triton kernels (gram, ghost_gram, psg_gram's features kernel).

What is tuned: each kernel's tile sizes (BLOCK_* constexprs), num_warps and num_stages, chosen by
`triton.autotune` among a short list of configs per dtype family:
  "16bit"  fp16/bf16 operands on tensor cores (fp32 accumulation),
  "fp32"   fp32 operands (ieee or tf32 tl.dot),
  "fp64"   fp64 products on CUDA cores (gram._mma: a broadcast multiply and a sum): small tiles.
Every config whose family multiplies with tl.dot has every tl.dot dimension >= 16 (a GPU rejects less;
the interpreter does not, so tests/kernels/test_triton_autotune.py checks the lists).

Key: each launcher passes SIZE_KEY = `size_key(sizes...)`, its problem sizes rounded up to powers of
two, so NTK blocks of similar shapes reuse one tuning; triton.autotune adds the tensor dtypes and the
kernel's own key constexprs (SYM for gram, SYM and SPLIT for ghost_gram). Outputs a kernel adds
into (gram's out or its split-K scratch, ghost_gram's out) are restored between trials
(restore_value), so tuning never changes a result; psg_gram's features kernel overwrites its whole
scratch, so it needs no restore.

Where: on a GPU every launch that is not given fixed `blocks` is autotuned (timed with
triton.testing.do_bench). In the Triton interpreter (TRITON_INTERPRET=1) launches use fixed blocks,
which is cheap, unless the environment variable LINFT_TRITON_AUTOTUNE=1 is set when the launcher
runs: then the same autotune path runs over small interpreter configs (INTERP lists, >= 2 each),
timed by `cpu_do_bench` (time.perf_counter, median of a few runs). That exercises tuning and restore
on CPU; interpreter timings say nothing about a GPU.

`TunedKernel.tuners` holds the autotuners built so far (their `.cache` maps a key to the best config,
`.configs_timings` holds the last tuning's timings); `TunedKernel.clear()` forgets them.

On a GPU the tunings are also kept on disk (triton.autotune's cache_results, in Triton's cache
directory, keyed by the kernel's source, the target, the configs and the key), so a new process skips
the benchmarking a key had before: on an H200 a 1.1B-model LoRA NTK spent ~0.3 s of 6.3 s tuning the
gram for its size buckets (bench/README.md). LINFT_TRITON_AUTOTUNE_CACHE=0 turns that off (unless
Triton's own TRITON_CACHE_AUTOTUNING=1 turns it on for every autotuner).
`tuned_keys()` counts the keys tuned (or read from disk) so far in this process.
"""
from __future__ import annotations

import inspect
import os
import time
import weakref

import triton
import triton.language as tl

__all__ = ["ENV_AUTOTUNE_CACHE", "ENV_INTERP_AUTOTUNE", "TunedKernel", "cpu_do_bench", "disk_cache", "family",
           "interp_autotune", "size_key", "tuned_keys"]

ENV_INTERP_AUTOTUNE = "LINFT_TRITON_AUTOTUNE"
# cpu_do_bench: untimed warm-up calls, then timed calls (the interpreter is slow: keep these small)
CPU_BENCH_WARMUP = 1
CPU_BENCH_REPS = 3


def is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1 (runs on CPU through numpy)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout change in a future Triton
        return type(kernel).__name__ == "InterpretedFunction"
    return isinstance(kernel, InterpretedFunction)


def interp_autotune() -> bool:
    """LINFT_TRITON_AUTOTUNE set to anything but "" or "0": autotune in the interpreter too."""
    return os.environ.get(ENV_INTERP_AUTOTUNE, "0") not in ("", "0")


def family(cdt, acc) -> str:
    """Config family of a (compute dtype, accumulator dtype) pair: "16bit", "fp32" or "fp64"."""
    if acc == tl.float64:
        return "fp64"
    return "16bit" if cdt in (tl.float16, tl.bfloat16) else "fp32"


def size_key(*sizes: int) -> int:
    """Autotune key: each size rounded up to a power of two (its log2 packed in 6 bits; <= 5 sizes
    fit an int32), so every NTK block shape of one bucket shares a tuning."""
    key = 0
    for v in sizes:
        key = key * 64 + min(63, max(0, int(v - 1).bit_length()))
    return key


def _quantile(sorted_ts, q: float) -> float:
    """Linear-interpolated quantile of sorted samples (as torch.quantile)."""
    pos = q * (len(sorted_ts) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ts) - 1)
    return sorted_ts[lo] + (sorted_ts[hi] - sorted_ts[lo]) * (pos - lo)


def cpu_do_bench(fn, quantiles=None, warmup: int = CPU_BENCH_WARMUP, reps: int = CPU_BENCH_REPS):
    """CPU stand-in for triton.testing.do_bench: milliseconds of `fn()` by time.perf_counter.

    Returns the median of `reps` timed calls (after `warmup` untimed ones), or a list of the
    requested `quantiles` (the autotuner asks for (0.5, 0.2, 0.8) and compares the lists).
    """
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    if quantiles is None:
        return _quantile(ts, 0.5)
    return [_quantile(ts, q) for q in quantiles]


def gpu_do_bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


ENV_AUTOTUNE_CACHE = "LINFT_TRITON_AUTOTUNE_CACHE"
_ALL = weakref.WeakSet()  # every TunedKernel alive (tuned_keys)


def disk_cache() -> bool:
    """Whether GPU tunings are kept on disk: triton.autotune takes cache_results (Triton >= 3.2) and
    LINFT_TRITON_AUTOTUNE_CACHE is not "0"."""
    if os.environ.get(ENV_AUTOTUNE_CACHE, "1") in ("", "0"):
        return False
    return "cache_results" in inspect.signature(triton.autotune).parameters


def tuned_keys() -> int:
    """Autotune keys resolved so far in this process, over every Triton kernel of linft_kernels."""
    return sum(len(getattr(t, "cache", {})) for k in _ALL for t in k.tuners.values())


def config_label(cfg) -> str:
    """A config as labels show it: its block sizes, then warps and stages ("BLOCK_M=64,... w4s4")."""
    blocks = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{blocks} w{cfg.num_warps}s{cfg.num_stages}"


def forget_chosen() -> None:
    """Clears what chosen_configs reports (a benchmark calls it before each case; tunings are kept)."""
    for k in _ALL:
        for t in k.tuners.values():
            t.best_config = None


def chosen_configs() -> dict:
    """{kernel name: {family: label}} of the config each autotuner of this process used last, since
    forget_chosen (what a benchmark row records next to its time); empty where nothing was tuned."""
    out = {}
    for k in _ALL:
        for fam, t in k.tuners.items():
            cfg = getattr(t, "best_config", None)
            if cfg is not None:
                out.setdefault(k.kernel.__name__, {})[fam] = config_label(cfg)
    return out


class TunedKernel:
    """One kernel's tuning: GPU config lists per family, interpreter configs and fixed blocks, key.

    `launch` runs the kernel with fixed blocks (given, or the interpreter default) or through the
    autotuner of the family; `grid` is a tuple or a function of the blocks dict (meta).
    """

    def __init__(self, kernel, gpu_configs: dict, interp_configs: list, interp_blocks: dict, *,
                 dot_dims: tuple, key: list, restore_value=(), reset_to_zero=()):
        self.kernel = kernel
        self.gpu_configs = gpu_configs
        self.interp_configs = interp_configs
        self.interp_blocks = interp_blocks
        self.dot_dims = dot_dims
        self.key = list(key)
        self.restore_value = list(restore_value)
        self.reset_to_zero = list(reset_to_zero)
        self.tuners = {}
        _ALL.add(self)

    @property
    def interpreted(self) -> bool:
        return is_interpreted(self.kernel)

    def configs(self, fam: str) -> list:
        """The configs autotuning chooses among for family `fam` here (interpreter: one small list)."""
        return self.interp_configs if self.interpreted else self.gpu_configs[fam]

    def tuned(self) -> bool:
        """Whether a launch without fixed blocks is autotuned (always on a GPU; switch in the interpreter)."""
        return not self.interpreted or interp_autotune()

    def blocks(self, blocks: dict | None) -> dict | None:
        """Fixed blocks for a launch (checked), or None when the launch is autotuned."""
        if blocks is not None:
            for k in self.dot_dims:
                bs = blocks[k]
                if bs < 16 or bs & (bs - 1):
                    raise ValueError(f"block sizes must be powers of two >= 16, got {k}={bs}")
            return blocks
        return None if self.tuned() else dict(self.interp_blocks)

    def tuner(self, fam: str):
        """The autotuned kernel of one family (built on first use)."""
        name = "interp" if self.interpreted else fam
        if name not in self.tuners:
            extra = {"cache_results": True} if not self.interpreted and disk_cache() else {}
            self.tuners[name] = triton.autotune(
                self.configs(fam), key=self.key, restore_value=self.restore_value or None,
                reset_to_zero=self.reset_to_zero or None,
                do_bench=cpu_do_bench if self.interpreted else gpu_do_bench, **extra)(self.kernel)
        return self.tuners[name]

    def launch(self, grid, args, const: dict, fam: str, blocks: dict | None, num_warps: int, num_stages: int):
        """Run the kernel: fixed `blocks` (from self.blocks) or autotuned for family `fam` when None."""
        if blocks is None:
            self.tuner(fam)[grid](*args, **const)
            return
        g = grid(blocks) if callable(grid) else grid
        kw = {} if self.interpreted else dict(num_warps=num_warps, num_stages=num_stages)
        self.kernel[g](*args, **const, **blocks, **kw)

    def clear(self):
        """Forget every tuning of this process (the next autotuned launch of each key benchmarks again,
        or on a GPU reads the key's tuning from disk when an earlier process kept it)."""
        self.tuners.clear()
