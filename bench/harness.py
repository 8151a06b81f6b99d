#!/usr/bin/env python
"""Standalone benchmark harness of linft: kernel ops and the end-to-end empirical NTK, each against the
baseline a user would otherwise write, with FLOP rates next to the measured machine peak.

    python bench/harness.py --suite ops|ntk|all --device cpu|cuda --out bench/results/NAME.json [--quick]
    python bench/harness.py --suite ops --out new.json --compare bench/results/OLD.json --fail-if-regression 10
    python bench/harness.py --compare OLD.json --new NEW.json [--fail-if-regression PCT]   (no run)
    python bench/harness.py --table RESULTS.json | --targets RESULTS.json...              (no run)

Method
* ops: in one process, the candidate (each available linft backend) and the baselines run in
  alternation: one warm-up call each, then `reps` rounds, each round calling every function once, the
  starting function rotating from round to round, so that load from other processes hits all of them
  alike. Reported: median wall time, ratio = baseline median / candidate median (>1: linft faster),
  achieved GFLOP/s of the op's counted FLOP (bench/flops.py) and the machine's measured GEMM peak of
  the same dtype (bench/machine.py), measured in the same run; process CPU time as a secondary measure;
  peak memory of a call above what was there before it (CUDA: the allocator's high-water mark over the
  timed calls; CPU: the resident set's, in one more untimed call after malloc_trim, see
  _cpu_peak_bytes). Baselines: a @ a.T (a @ b.T) and torch.einsum for gram; the materializing einsum
  (and the T x S ghost einsum) for ghost_gram and psg_gram. Correctness: max |candidate - baseline| /
  max |baseline| of the last call.
* ntk: every measurement runs in its own subprocess (`--worker`), which builds the model, warms up on
  two samples, resets the peak-RSS mark (/proc/self/clear_refs), runs the measured call once and
  reports wall time and peak RSS above the RSS after the model build and warm-up (ru_maxrss).
  Methods: linft.empirical_ntk, torch.func vmap(jacrev) + J J^T (chunks of samples), the torch.func
  NTK-vector-product method (K = J (J^T I): a vmapped VJP and a JVP per block of basis columns), one
  plain forward+backward over the same samples (the unit of the NTK cost ratio). Subprocesses of one
  kernel run in rounds, alternating methods. A baseline whose Jacobian would not fit the memory limit
  is measured at a smaller N and extrapolated (Jacobian time x N/n, Gram time x (N/n)^2, memory: the
  Jacobian's bytes rescaled); the NTK-vector products, whose time grows as N^2, are measured at a few
  samples and their time scaled by (N/n)^2. Such rows say `extrapolated_from_n`.

Rows are long-format dicts (one measurement each) with hardware, versions, git commit and date.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import flops as FL  # noqa: E402
import machine  # noqa: E402

GiB = 1 << 30
RESULT_TAG = "@@RESULT "


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ==================================================================================================
# Timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(fn, device):
    """One timed call: (wall seconds, process CPU seconds, peak extra CUDA bytes or None, result)."""
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    r = fn()
    sync(device)
    t = time.perf_counter() - t0
    c = time.process_time() - c0
    peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else None
    return t, c, peak, r


def _cpu_peak_bytes(fn) -> int | None:
    """Peak memory of one untimed call of `fn` on CPU, above what the process held before it: malloc's
    free pages are first handed back to the OS (malloc_trim), so that everything the call allocates
    and touches shows in the resident set's high-water mark (reset through /proc/self/clear_refs).
    Counts native scratch and library workspaces too. None where glibc or the reset is missing."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    gc.collect()
    trim(0)
    if not _reset_peak_rss():
        return None
    base = _current_rss()
    r = fn()
    peak = max(0, _maxrss() - base)
    del r
    return peak


def alternate(fns: list[tuple[str, object]], device: torch.device, reps: int, warmup: int = 1,
              budget_s: float | None = None) -> dict:
    """Time functions in alternation. Returns {name: {times, cpu_times, peak_mem, result}}."""
    out = {name: {"times": [], "cpu_times": [], "peak_mem": None, "result": None} for name, _ in fns}
    for _ in range(warmup):
        for name, fn in fns:
            out[name]["result"] = None
            _, _, _, out[name]["result"] = _call(fn, device)
    start = time.perf_counter()
    k = len(fns)
    for r in range(reps):
        order = [fns[(r + i) % k] for i in range(k)]
        for name, fn in order:
            out[name]["result"] = None  # free the previous result before the next call
            t, c, peak, res = _call(fn, device)
            rec = out[name]
            rec["times"].append(t)
            rec["cpu_times"].append(c)
            rec["result"] = res
            if peak is not None:
                rec["peak_mem"] = max(peak, rec["peak_mem"] or 0)
        if budget_s is not None and r + 1 < reps and time.perf_counter() - start > budget_s:
            log(f"    time budget {budget_s:.0f}s reached after {r + 1} rounds")
            break
    if device.type == "cpu":  # peak memory: one more, untimed call each (first-touch pages are slow)
        for name, fn in fns:
            out[name]["peak_mem"] = _cpu_peak_bytes(fn)
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = ref.abs().max().item() or 1.0
    return (x.double() - ref).abs().max().item() / scale


# ==================================================================================================
# Ops suite

def _backends(device: torch.device, heavy: bool) -> list[str]:
    from linft_kernels import _dispatch
    names = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    avail = [b for b in names if _dispatch.unavailable_reason(b, device) is None]
    if heavy:  # the reference backend is chunked torch, i.e. the baseline again; skip on big shapes
        avail = [b for b in avail if b != "reference"] or avail
    return avail


def _ghost_txs(x1, g1, x2, g2, chunk_elems: int = 1 << 26):
    """The T x S ghost einsum a user would write, chunked over rows to bound the temporaries."""
    acc = torch.float32 if x1.dtype != torch.float64 else torch.float64
    x2 = x1 if x2 is None else x2
    g2 = g1 if g2 is None else g2
    N, T = x1.shape[:2]
    M, S = x2.shape[:2]
    rows = max(1, chunk_elems // max(1, M * T * S))
    out = torch.empty(N, M, dtype=acc, device=x1.device)
    for i0 in range(0, N, rows):
        xx = torch.einsum("itd,jsd->ijts", x1[i0:i0 + rows], x2)
        gg = torch.einsum("itd,jsd->ijts", g1[i0:i0 + rows], g2)
        out[i0:i0 + rows] = (xx * gg).sum(dim=(2, 3), dtype=acc)
    return out


def _materialize(x1, g1, x2, g2, kernel="sgd", upcast=False):
    """F = einsum('nto,ntd->nod', g, x), then F.flatten(1) @ F2.flatten(1).T (signs for signgd)."""
    if upcast:
        x1, g1 = x1.float(), g1.float()
        x2 = None if x2 is None else x2.float()
        g2 = None if g2 is None else g2.float()
    f1 = torch.einsum("nto,ntd->nod", g1, x1).flatten(1)
    f2 = f1 if x2 is None else torch.einsum("nto,ntd->nod", g2, x2).flatten(1)
    if kernel == "signgd":
        f1 = torch.sign(f1)
        f2 = f1 if x2 is None else torch.sign(f2)
    return f1 @ f2.T


def op_cases(device: str, quick: bool) -> list[dict]:
    """The ops sweep. Each case: name, op, dims, dtype, kernel, reps, heavy."""
    f32, bf16 = torch.float32, torch.bfloat16
    cases = []

    def add(name, op, dims, dtype, kernel=None, reps=5, heavy=False):
        cases.append(dict(name=name, op=op, dims=dims, dtype=dtype, kernel=kernel, reps=reps, heavy=heavy))

    if device == "cpu":
        if quick:
            for dt in (f32, bf16):
                add("gram_sym", "gram", dict(N=512, P=8192), dt)
            add("gram_cross", "gram", dict(N=512, M=256, P=8192), f32)
            for dt in (f32, bf16):
                add("ghost_gram_sym", "ghost_gram", dict(N=32, T=64, d_in=256, d_out=256), dt)
                add("psg_gram_sym", "psg_gram", dict(N=32, T=64, d_in=256, d_out=256), dt, "sgd")
            add("psg_gram_sym", "psg_gram", dict(N=32, T=64, d_in=256, d_out=256), f32, "signgd")
            add("gram_sym_headline", "gram", dict(N=2048, P=16384), f32, reps=3, heavy=True)
            return cases
        for dt in (f32, bf16):
            add("gram_sym", "gram", dict(N=1024, P=16384), dt)
            add("gram_cross", "gram", dict(N=1024, M=512, P=16384), dt)
        add("gram_sym_ntk_features", "gram", dict(N=128, P=786432), f32, reps=3)
        # one chunk's Gram inside psg_gram at the NTK benchmark's shapes (64 samples x 2 outputs)
        add("gram_sym_few_rows", "gram", dict(N=128, P=32768), f32)
        for dt in (f32, bf16):
            add("ghost_gram_sym", "ghost_gram", dict(N=64, T=128, d_in=512, d_out=512), dt, reps=3)
        add("ghost_gram_cross", "ghost_gram", dict(N=64, M=32, T=128, d_in=512, d_out=512), f32, reps=3)
        add("ghost_gram_sym_short", "ghost_gram", dict(N=256, T=16, d_in=1024, d_out=1024), f32, reps=3)
        for dt in (f32, bf16):
            for k in ("sgd", "signgd"):
                add("psg_gram_sym", "psg_gram", dict(N=64, T=128, d_in=512, d_out=512), dt, k, reps=3)
        add("psg_gram_cross", "psg_gram", dict(N=64, M=32, T=128, d_in=512, d_out=512), f32, "sgd", reps=3)
        # The headline (issue target >= 1.6x over a @ a.T), last: ~3-8 s per call on 2 cores, one
        # warm-up round and 5 rounds of 4 functions (linft, its native kernel, a @ a.T, einsum): ~2 min.
        add("gram_sym_headline", "gram", dict(N=4096, P=65536), f32, reps=5, heavy=True)
        return cases
    # CUDA
    if quick:
        for dt in (f32, bf16):
            add("gram_sym", "gram", dict(N=2048, P=32768), dt)
            add("ghost_gram_sym", "ghost_gram", dict(N=64, T=128, d_in=512, d_out=512), dt)
            add("psg_gram_sym", "psg_gram", dict(N=64, T=128, d_in=512, d_out=512), dt, "sgd")
        add("psg_gram_sym", "psg_gram", dict(N=64, T=128, d_in=512, d_out=512), bf16, "signgd")
        return cases
    for dt in (bf16, f32):  # bf16 first: the GPU targets are stated for it
        add("gram_sym", "gram", dict(N=4096, P=65536), dt, reps=5)
        add("gram_cross", "gram", dict(N=4096, M=2048, P=65536), dt, reps=5)
        add("gram_sym_large", "gram", dict(N=16384, P=32768), dt, reps=5, heavy=True)
        add("gram_sym_ntk_features", "gram", dict(N=256, P=786432), dt, reps=5)
        for shape in (dict(N=64, T=128, d_in=512, d_out=512), dict(N=256, T=256, d_in=1024, d_out=1024)):
            add("ghost_gram_sym", "ghost_gram", shape, dt, reps=5)
            for k in ("sgd", "signgd"):
                add("psg_gram_sym", "psg_gram", shape, dt, k, reps=5)
        add("ghost_gram_sym_short", "ghost_gram", dict(N=1024, T=16, d_in=1024, d_out=1024), dt, reps=5)
        add("ghost_gram_cross", "ghost_gram", dict(N=256, M=128, T=256, d_in=1024, d_out=1024), dt, reps=5)
        add("psg_gram_cross", "psg_gram", dict(N=256, M=128, T=256, d_in=1024, d_out=1024), dt, "sgd", reps=5)
    return cases


def _shape_str(dims: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in dims.items())


def _native_cpu(op: str, out: torch.Tensor, *args) -> torch.Tensor:
    """out after the native CPU library's `op` added into it (linft_kernels._native, bypassing the
    dispatch to torch's GEMM that same-dtype fp32 takes)."""
    from linft_kernels import _native
    if op == "gram":
        _native.gram(_native.cpu_lib(), *args, out)
    else:
        x1, g1, m1, x2, g2, m2, kernel = args
        _native.psg_gram(_native.cpu_lib(), x1, g1, m1, x2, g2, m2, out, kernel)
    return out


def _with_wgmma(value: str, fn):
    """fn() with LINFT_CUDA_GRAM_WGMMA=value, which the native CUDA gram reads at every call: "0" its
    mma.sync kernel, "2" the wgmma kernel's Overlap form (csrc/README.md)."""
    before = os.environ.get("LINFT_CUDA_GRAM_WGMMA")
    os.environ["LINFT_CUDA_GRAM_WGMMA"] = value
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["LINFT_CUDA_GRAM_WGMMA"]
        else:
            os.environ["LINFT_CUDA_GRAM_WGMMA"] = before


def build_op_case(case: dict, device: torch.device):
    """Inputs, candidate functions (per backend), baseline functions and the FLOP count."""
    import linft_kernels as lk
    dims, dt, op, kernel = case["dims"], case["dtype"], case["op"], case["kernel"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    heavy = case["heavy"]
    cands, bases = [], []
    native = dtype_name(dt)
    if op == "gram":
        N, P, M = dims["N"], dims["P"], dims.get("M")
        a = rnd(N, P)
        b = None if M is None else rnd(M, P)
        fl = FL.gram(N, P, M)
        for be in _backends(device, heavy):
            cands.append((be, lambda be=be: lk.gram(a, b, backend=be)))
        if device.type == "cpu" and dt == torch.float32:
            # the hand-written kernel itself: same-dtype fp32 dispatches to torch's GEMM (linft_kernels._blas)
            cands.append(("cpu [native kernel]", lambda: _native_cpu("gram", torch.zeros(N, N if M is None else M),
                                                                     a, b)))
        if device.type == "cuda" and dt in (torch.bfloat16, torch.float16) and "cuda" in _backends(device, heavy):
            from linft_kernels import _native
            if _native.gram_tensor_core_path() == "wgmma":
                # the sm_80 kernel and the wgmma kernel's other form beside the default, same process
                for label, value in (("cuda [mma.sync]", "0"), ("cuda [wgmma overlap]", "2")):
                    cands.append((label, lambda value=value: _with_wgmma(value, lambda: lk.gram(a, b, backend="cuda"))))
        if b is None:
            bases.append((f"torch a@a.T [{native}]", lambda: a @ a.T))
            if dt != torch.float32 and dt != torch.float64:
                bases.append(("torch a@a.T [fp32 upcast]", lambda: (lambda af: af @ af.T)(a.float())))
            bases.append((f"torch einsum [{native}]", lambda: torch.einsum("np,mp->nm", a, a)))
        else:
            bases.append((f"torch a@b.T [{native}]", lambda: a @ b.T))
            if dt != torch.float32 and dt != torch.float64:
                bases.append(("torch a@b.T [fp32 upcast]", lambda: a.float() @ b.float().T))
            bases.append((f"torch einsum [{native}]", lambda: torch.einsum("np,mp->nm", a, b)))
        inputs = (a, b)
    else:
        N, T, d_in, d_out = dims["N"], dims["T"], dims["d_in"], dims["d_out"]
        M, S = dims.get("M"), dims.get("S", dims["T"] if "M" in dims else None)
        x1, g1 = rnd(N, T, d_in), rnd(N, T, d_out)
        x2 = g2 = None
        if M is not None:
            x2, g2 = rnd(M, S, d_in), rnd(M, S, d_out)
        inputs = (x1, g1, x2, g2)
        lowp = dt not in (torch.float32, torch.float64)
        if op == "ghost_gram":
            fl = FL.ghost_gram(N, T, d_in, d_out, M, S)
            for be in _backends(device, heavy):
                cands.append((be, lambda be=be: lk.ghost_gram(x1, g1, x2, g2, backend=be)))
            if lowp and device.type == "cuda":
                # the ghost kernels themselves where auto would materialize (long T): their own
                # rate is the row's flops_ghost over its median
                for be in ("cuda", "triton"):
                    if be in _backends(device, heavy):
                        cands.append((f"{be} [ghost route]", lambda be=be: lk.ghost_gram(
                            x1, g1, x2, g2, backend=be, route="ghost")))
            bases.append((f"einsum materialize [{native}]", lambda: _materialize(x1, g1, x2, g2)))
            if lowp:
                bases.append(("einsum materialize [fp32 upcast]",
                              lambda: _materialize(x1, g1, x2, g2, upcast=True)))
            bases.append((f"einsum ghost TxS [{native}]", lambda: _ghost_txs(x1, g1, x2, g2)))
        else:
            fl = FL.psg_gram(N, T, d_in, d_out, M, S)
            for be in _backends(device, heavy):
                cands.append((be, lambda be=be: lk.psg_gram(x1, g1, x2, g2, kernel=kernel, backend=be)))
            if device.type == "cpu" and dt == torch.float32:  # the hand-written kernel (see gram above)
                cands.append(("cpu [native kernel]", lambda: _native_cpu(
                    "psg_gram", torch.zeros(N, N if M is None else M), x1, g1, None, x2, g2, None, kernel)))
            if lowp:  # F rounded to the factors' dtype, as the bf16 baseline's (its Gram on AMX / tensor cores)
                for tiled in (("triton", "cuda") if device.type == "cuda" else ("cpu",)):
                    if tiled in _backends(device, heavy):
                        cands.append((f"{tiled} [{native} tiles]", lambda tiled=tiled: lk.psg_gram(
                            x1, g1, x2, g2, kernel=kernel, backend=tiled, tile_dtype=dt)))
            if lowp and device.type == "cuda":
                # The same work through cuBLAS: F in chunks of up to 2^26 entries by batched GEMMs
                # (fp32 sums, rounded once), each chunk's Gram by torch.mm with fp32 accumulation
                # and result (linft_kernels._blas). Not wired into dispatch: a candidate to time.
                from linft_kernels import _blas
                M_ = N if M is None else M
                cands.append((f"cublas chunks [{native} tiles]", lambda: _blas.psg_gram(
                    x1, g1, None, x2, g2, None, torch.zeros(N, M_, device=device), kernel,
                    gram=_blas.cuda_gram_fp32, buffer=1 << 26, rows_out=256)))
                # the same with chunks of 2^23 entries (16 MB in 16 bits): F written and read back in
                # the H200's 50 MB L2 instead of HBM, for more GEMM launches of smaller size
                cands.append((f"cublas L2 chunks [{native} tiles]", lambda: _blas.psg_gram(
                    x1, g1, None, x2, g2, None, torch.zeros(N, M_, device=device), kernel,
                    gram=_blas.cuda_gram_fp32, buffer=1 << 23, rows_out=256)))
            bases.append((f"einsum materialize [{native}]", lambda: _materialize(x1, g1, x2, g2, kernel)))
            if lowp:
                bases.append(("einsum materialize [fp32 upcast]",
                              lambda: _materialize(x1, g1, x2, g2, kernel, upcast=True)))
    return inputs, cands, bases, fl


def _pipelined(fns, device: torch.device) -> dict:
    """CUDA only: each function's median time by triton.testing.do_bench (back-to-back calls between
    CUDA events, the L2 flushed before each): the op's time with the host's per-call work overlapped
    (about the larger of the GPU's time and the host's: where the host is slower the GPU waits inside
    the measured span, so this is an upper bound of the GPU's own time), beside `alternate`'s
    synchronous per-call wall time (which adds the host's launch work and one synchronization to every
    call: 0.2-0.9 ms on sub-millisecond ops on an H200; bench/profile_host_gpu.py splits the two)."""
    if device.type != "cuda":
        return {}
    import triton
    out = {}
    for name, fn in fns:
        try:
            out[name] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3
        except Exception as e:  # noqa: BLE001 - the synchronous timing stands; note and go on
            log(f"    pipelined timing of {name} failed: {type(e).__name__}: {e}")
    return out


def _pipelined_fields(piped: dict, cand: str, base: str, flops: float, peak_gflops) -> dict:
    c, b = piped.get(cand), piped.get(base)
    if c is None:
        return {}
    return {"pipelined_median_s": c, "baseline_pipelined_median_s": b,
            "pipelined_ratio": (b / c) if b else None,
            "pipelined_pct_of_peak": (100 * flops / c / 1e9 / peak_gflops) if peak_gflops else None}


def _triton_autotune():
    """linft's Triton autotune module (forget_chosen / chosen_configs), None without Triton."""
    try:
        from linft_kernels.triton import _autotune
    except Exception:  # Triton missing or unusable here: no Triton rows either
        return None
    return _autotune


def run_ops(device: torch.device, quick: bool, peaks: dict, meta: dict, only: str | None = None,
            on_rows=None, dtypes: str | None = None) -> list[dict]:
    """The ops sweep; `on_rows(rows)` is called with the rows so far after each case (partial saves).
    only: comma list of substrings of case names; dtypes: comma list of dtype names (bfloat16, float32)."""
    rows = []
    tune = _triton_autotune()
    names = [s for s in (only or "").split(",") if s]
    kinds = [s for s in (dtypes or "").split(",") if s]
    for case in op_cases(device.type, quick):
        if names and not any(s in case["name"] for s in names):
            continue
        if kinds and dtype_name(case["dtype"]) not in kinds:
            continue
        label = f"{case['name']} {case['op']}{'/' + case['kernel'] if case['kernel'] else ''} " \
                f"{_shape_str(case['dims'])} {dtype_name(case['dtype'])}"
        log(f"[ops] {label}")
        gc.collect()
        load0 = machine.load_average()
        t_case = time.perf_counter()
        inputs, cands, bases, fl = build_op_case(case, device)
        if tune is not None:
            tune.forget_chosen()  # rows record only this case's autotune choices
        fns = [(f"cand:{n}", f) for n, f in cands] + [(f"base:{n}", f) for n, f in bases]
        # Interleave candidates and baselines: c0, b0, c1, b1, ...
        inter = []
        cs, bs = fns[:len(cands)], fns[len(cands):]
        for i in range(max(len(cs), len(bs))):
            inter += cs[i:i + 1] + bs[i:i + 1]
        res = alternate(inter, device, reps=case["reps"], warmup=1, budget_s=300 if case["heavy"] else 120)
        piped = _pipelined(inter, device) if not case["heavy"] else {}
        chosen = (tune.chosen_configs() or None) if tune is not None else None
        load1 = machine.load_average()
        ref_name = f"base:{bases[0][0]}"
        ref = res[ref_name]["result"]
        if case["dtype"] != torch.float32:
            # the fp32-upcast baseline (when present) is the accurate reference for low precision
            up = [n for n, _ in bases if "fp32 upcast" in n]
            if up:
                ref = res[f"base:{up[0]}"]["result"]
        peak = peaks.get(dtype_name(case["dtype"])) or peaks.get("float32")
        pk = peak["peak_gflops"] if peak else None
        for cname, _ in cands:
            c = res[f"cand:{cname}"]
            c_med = statistics.median(c["times"])
            err = rel_err(c["result"], ref) if ref is not None else None
            for bname, _ in bases:
                b = res[f"base:{bname}"]
                b_med = statistics.median(b["times"])
                rows.append({
                    "suite": "ops", "name": case["name"], "op": case["op"], "kernel": case["kernel"],
                    "shape": case["dims"], "shape_str": _shape_str(case["dims"]),
                    "dtype": dtype_name(case["dtype"]), "device": device.type, "backend": cname,
                    "baseline": bname, "median_s": c_med, "baseline_median_s": b_med,
                    "ratio": b_med / c_med, "times_s": c["times"], "baseline_times_s": b["times"],
                    "cpu_s": statistics.median(c["cpu_times"]),
                    "baseline_cpu_s": statistics.median(b["cpu_times"]),
                    "cpu_ratio": statistics.median(b["cpu_times"]) / max(1e-12, statistics.median(c["cpu_times"])),
                    "flops": fl["flops"], "flop_count": fl["flop_count"],
                    "flops_materialize": fl.get("flops_materialize"), "flops_ghost": fl.get("flops_ghost"),
                    "achieved_gflops": fl["flops"] / c_med / 1e9,
                    "baseline_gflops": fl["flops"] / b_med / 1e9,
                    "peak_gflops": pk, "peak_dtype": peak["dtype"] if peak else None,
                    "pct_of_peak": (100 * fl["flops"] / c_med / 1e9 / pk) if pk else None,
                    # a ghost-route candidate's rate on the ghost algorithm's own FLOP count
                    "ghost_pct_of_peak": (100 * fl["flops_ghost"] / c_med / 1e9 / pk)
                    if pk and "[ghost route]" in cname else None,
                    "peak_mem_bytes": c["peak_mem"], "baseline_peak_mem_bytes": b["peak_mem"],
                    "max_rel_err": err,
                    "baseline_max_rel_err": rel_err(b["result"], ref) if ref is not None else None,
                    "reps": len(c["times"]), "load_avg_before": load0, "load_avg_after": load1,
                    # the Triton configs the autotuners chose (last use per kernel and family)
                    "triton_configs": chosen if "triton" in cname else None,
                    **_pipelined_fields(piped, f"cand:{cname}", f"base:{bname}", fl["flops"], pk),
                    **meta,
                })
                rate = fl["flops"] / c_med / 1e9
                pct = f" ({100 * rate / pk:.0f}% of peak)" if pk else ""
                if pk and "[ghost route]" in cname:
                    pct += f" (ghost FLOP: {100 * fl['flops_ghost'] / c_med / 1e9 / pk:.0f}%)"
                p_c = piped.get(f"cand:{cname}")
                pip = ""
                if p_c:
                    pip = f"  | pipelined {p_c * 1e3:.3f} ms"
                    if pk:
                        pip += f" ({100 * fl['flops'] / p_c / 1e9 / pk:.0f}%)"
                log(f"    {cname:<9} {c_med * 1e3:10.1f} ms  vs {bname:<32} {b_med * 1e3:10.1f} ms  "
                    f"ratio {b_med / c_med:6.2f}  {rate:8.1f} GFLOP/s{pct}  err {err:.1e}{pip}")
        del inputs, res, cands, bases
        log(f"    ({time.perf_counter() - t_case:.0f}s, load {load0} -> {load1})")
        if on_rows is not None:
            on_rows(rows)
    return rows


# ==================================================================================================
# NTK suite: worker side (runs in a subprocess per measurement)

LABEL_IDS = (11, 22)
FULL_PATTERNS = ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"]


LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _build_llama(spec: dict):
    """Llama-shaped random model in spec["model_dtype"] (eval) with peft LoRA on every projection."""
    import peft
    import transformers as tf
    cfg = tf.LlamaConfig(hidden_size=spec["n_embd"], intermediate_size=spec["d_ff"],
                         num_hidden_layers=spec["n_layer"], num_attention_heads=spec["n_head"],
                         num_key_value_heads=spec["n_kv_head"], vocab_size=spec["vocab"],
                         max_position_embeddings=max(2048, spec["T"]), tie_word_embeddings=False)
    dtype = getattr(torch, spec.get("model_dtype", "bfloat16"))
    with torch.device(spec.get("device", "cpu")):  # initialise on the target device: 1B params on CPU is slow
        model = tf.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    lcfg = peft.LoraConfig(r=spec.get("lora_r", 8), lora_alpha=2 * spec.get("lora_r", 8), lora_dropout=0.0,
                           target_modules=LLAMA_LORA_TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(model, lcfg).eval()
    model.to(dtype)  # peft creates the adapters in fp32
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return model, names, "trainable"


def build_model(spec: dict):
    """The benchmark model (random weights, eval) and the parameter selection of the kernel.

    arch "gpt2" (default): GPT-2-shaped, fp32, full Conv1D weights or peft LoRA on c_attn/c_proj/c_fc.
    arch "llama": Llama-shaped in bf16 with peft LoRA on all attention and MLP projections.
    """
    import transformers as tf
    torch.manual_seed(spec.get("seed", 0))
    if spec.get("arch") == "llama":
        return _build_llama(spec)
    special = {} if spec["vocab"] > 50256 else {"bos_token_id": 0, "eos_token_id": 0}
    cfg = tf.GPT2Config(n_embd=spec["n_embd"], n_layer=spec["n_layer"], n_head=spec["n_head"],
                        vocab_size=spec["vocab"], n_positions=spec["T"], **special)
    model = tf.GPT2LMHeadModel(cfg).to(spec.get("device", "cpu")).eval()
    if spec["kernel"] == "lora":
        import peft
        lcfg = peft.LoraConfig(r=spec.get("lora_r", 8), lora_alpha=2 * spec.get("lora_r", 8), lora_dropout=0.0,
                               target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False,
                               fan_in_fan_out=True)
        model = peft.get_peft_model(model, lcfg).eval()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = "trainable"
    else:
        import fnmatch
        names = [n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in FULL_PATTERNS)]
        params = list(FULL_PATTERNS)
    return model, names, params


def make_batch(n: int, T: int, vocab: int, seed: int = 1, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _set_grad(model, names):
    chosen = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)


def _fwdbwd(model, batch, output, names, chunk=None):
    """One plain forward+backward over the samples (in micro-batches of `chunk`, gradients accumulated)."""
    _set_grad(model, names)
    model.zero_grad(set_to_none=True)
    n = batch["input_ids"].shape[0]
    chunk = chunk or n
    for s in range(0, n, chunk):
        output(model, {k: v[s:s + chunk] for k, v in batch.items()}).sum().backward()
    model.zero_grad(set_to_none=True)
    return None, {"fwd_chunk": chunk}


def _tuned_keys() -> int | None:
    try:
        from linft_kernels.triton._autotune import tuned_keys
    except Exception:  # noqa: BLE001 - no Triton: nothing is tuned
        return None
    return tuned_keys()


def _linft(model, batch, output, params, spec):
    import linft
    from linft.capture import batched_output_gradients
    keys0 = _tuned_keys()
    ntk = linft.empirical_ntk(model, batch, output=output, params=params,
                              dtype=getattr(torch, spec.get("ntk_dtype", "float32")),
                              memory_budget=spec.get("memory_budget"), sample_tile=spec.get("sample_tile"),
                              fuse_activations=spec.get("fuse_activations"))
    info = {"timings": ntk.timings, "peak_kept_bytes": ntk.meta.get("peak_kept_bytes"),
            "n_params": ntk.meta.get("n_params"), "passes": len(ntk.plan.get("passes", [])),
            "methods": sorted({b["method"] for b in ntk.plan.get("blocks", [])}),
            "sample_tile": ntk.meta.get("sample_tile"),
            "batched_output_grads": batched_output_gradients(),
            # Triton autotune keys first met in this call (each benchmarked once per process unless
            # its tuning is on disk from an earlier process): one-time work inside the timed call
            "new_autotune_keys": None if keys0 is None else _tuned_keys() - keys0}
    return ntk.matrix, info


class _Functional:
    """Looks like the model to an output preset, but runs torch.func.functional_call with `params`."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, **kw):
        return torch.func.functional_call(self.model, self.params, (), kw)


def _vmap_jacrev(model, batch, output, names, spec):
    """Per-sample Jacobians by vmap(jacrev) in chunks of samples, J (N*C, P) in fp32, then J J^T."""
    from torch.func import jacrev, vmap
    _set_grad(model, [])
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}
    order = [n for n in names if n in params]
    P = sum(params[n].numel() for n in order)
    ids = batch["input_ids"]
    N = ids.shape[0]

    def per_sample(p, ids1):
        # no attention_mask: the benchmark batch has none padded (all ones), and the mask's
        # data-dependent checks in transformers do not run under vmap
        return output(_Functional(model, p), {"input_ids": ids1[None]})[0]

    jf = vmap(jacrev(per_sample), in_dims=(None, 0))
    chunk = spec.get("chunk", 8)
    t0 = time.perf_counter()
    J = None
    C = None
    for s in range(0, N, chunk):
        jac = jf(params, ids[s:s + chunk])
        b = ids[s:s + chunk].shape[0]
        if J is None:
            C = jac[order[0]].shape[1]
            J = torch.empty(N * C, P, dtype=torch.float32, device=ids.device)
        J[s * C:(s + b) * C] = torch.cat([jac[n].reshape(b * C, -1) for n in order], dim=1)
        del jac
    t_jac = time.perf_counter() - t0
    t1 = time.perf_counter()
    K = J @ J.T
    sync(ids.device)
    t_gram = time.perf_counter() - t1
    info = {"t_jacobian_s": t_jac, "t_gram_s": t_gram, "jacobian_bytes": J.numel() * J.element_size(),
            "n_params": P, "chunk": chunk}
    del J
    return K, info


def _ntk_vp(model, batch, output, names, spec):
    """The NTK-vector-product method (torch.func): K = J (J^T I) one block of basis columns at a time:
    for each basis vector e_j of the N*C outputs, J^T e_j by one VJP over all samples (the VJP
    function of one forward, vmapped over `chunk` columns) and J of that by one JVP over all samples.
    Never holds J; N*C backward and forward-mode passes over the data, so time grows as N^2. The JVP
    runs attention by SDPA's math backend (the fused kernels have no forward-mode derivative)."""
    from torch.func import jvp, vjp, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _set_grad(model, [])
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}
    ids = batch["input_ids"]

    def f(p):  # no attention_mask: the benchmark batch has none padded (see _vmap_jacrev)
        return output(_Functional(model, p), {"input_ids": ids})

    t0 = time.perf_counter()
    out, vjp_fn = vjp(f, params)
    NC = out.numel()
    basis = torch.eye(NC, dtype=out.dtype, device=ids.device).view(NC, *out.shape)

    def column(v):
        (u,) = vjp_fn(v)
        with sdpa_kernel(SDPBackend.MATH):
            return jvp(f, (params,), (u,))[1].reshape(-1)

    chunk = spec.get("chunk", 8)
    K = torch.cat([vmap(column)(basis[j:j + chunk]) for j in range(0, NC, chunk)]).T
    sync(ids.device)
    return K, {"t_s": time.perf_counter() - t0, "columns": NC, "chunk": chunk}


def run_method(method: str, model, batch, output, names, params, spec):
    if method == "fwdbwd":
        return _fwdbwd(model, batch, output, names, spec.get("fwd_chunk"))
    if method == "fwdbwd_whole":
        return _fwdbwd(model, batch, output, names, None)
    if method == "linft":
        return _linft(model, batch, output, params, spec)
    if method == "vmap_jacrev":
        return _vmap_jacrev(model, batch, output, names, spec)
    if method == "ntk_vp":
        return _ntk_vp(model, batch, output, names, spec)
    raise ValueError(method)


def worker(spec: dict) -> dict:
    import warnings
    warnings.filterwarnings("ignore")  # vmap's sdpa fallback and peft's fan_in_fan_out notes, per call
    import linft
    device = torch.device(spec.get("device", "cpu"))
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    build = machine.kernel_build()  # what this process imports (sources may change while it runs)
    commit = machine.git_info()["git_commit"]
    model, names, params = build_model(spec)
    output = linft.outputs.label_word_logits(list(LABEL_IDS))
    n = spec["n_measure"]
    batch = make_batch(n, spec["T"], spec["vocab"], device=device)
    # Warm-up on two samples: thread pools, allocator, lazy imports; not timed, below the RSS mark.
    # On a GPU the warm-up has 16 samples: Triton compiles a kernel variant per divisibility of its
    # integer arguments by 16 (rows N*C among them), so a warm-up of 2 samples would leave the timed
    # call compiling the variants it uses (seconds per kernel, once per process and machine).
    n_warm = 16 if device.type == "cuda" else 2
    run_method(spec["method"], model, make_batch(n_warm, spec["T"], spec["vocab"], seed=7, device=device),
               output, names, params, {**spec, "chunk": 2})
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = _current_rss()
    reset_ok = _reset_peak_rss()
    max_before = _maxrss()
    load0 = machine.load_average()
    c0 = time.process_time()
    t0 = time.perf_counter()
    K, info = run_method(spec["method"], model, batch, output, names, params, spec)
    sync(device)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    again = None
    if spec.get("again"):  # the same call once more: without the first call's one-time work
        K = None
        gc.collect()
        t1 = time.perf_counter()
        K, info_again = run_method(spec["method"], model, batch, output, names, params, spec)
        sync(device)
        again = {"wall_s": time.perf_counter() - t1, "info": info_again}
    peak = _maxrss()
    out = {"wall_s": wall, "cpu_s": cpu, "base_rss_bytes": base_rss, "peak_rss_bytes": peak,
           "git_commit": commit, "kernel_build": build,
           "peak_mem_bytes": peak - base_rss, "peak_reset": reset_ok,
           "peak_not_above_start": (not reset_ok) and peak <= max_before,
           "load_avg_before": load0, "load_avg_after": machine.load_average(), "info": info, "warmup_n": n_warm,
           "again": again,
           "n_params": sum(p.numel() for n_, p in model.named_parameters() if n_ in set(names))}
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base
        out["peak_mem_kind"] = "cuda max_memory_allocated above the start"
    else:
        out["peak_mem_kind"] = "ru_maxrss above the RSS after model build and warm-up"
    if K is not None and spec.get("save_k"):
        torch.save(K.detach().cpu().float(), spec["save_k"])
    return out


# ==================================================================================================
# NTK suite: parent side

def _run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            r = json.loads(line[len(RESULT_TAG):])
            r["subprocess_s"] = time.perf_counter() - t0
            return r
    tail = (p.stderr or "")[-2000:]
    return {"error": f"worker exited with {p.returncode}: {tail}"}


def _measure(spec: dict, timeout: float) -> dict:
    """One measurement in a worker subprocess, logged (its error, or its time and peak memory)."""
    res = _run_worker(spec, timeout)
    if "error" in res:
        log(f"      ERROR {res['error'][-1500:]}")
    else:
        log(f"      {res['wall_s']:.2f} s, peak {res['peak_mem_bytes'] / GiB:.2f} GiB")
    return res


def ntk_config(device: str, quick: bool) -> dict:
    """vp_N: samples at which the NTK-vector-product baseline is measured (its time grows as N^2 and
    is extrapolated to N: ~12 s at 8 samples of the CPU shape, ~13 min at 64)."""
    if quick:
        return dict(n_embd=256, n_layer=2, n_head=4, vocab=8192, T=64, N=16, large_N=64, rounds=1, vp_N=4)
    if device == "cuda":
        return dict(n_embd=512, n_layer=4, n_head=8, vocab=50257, T=128, N=64, large_N=1024, rounds=3, vp_N=16)
    return dict(n_embd=512, n_layer=4, n_head=8, vocab=50257, T=128, N=64, large_N=256, rounds=3, vp_N=8)


def _jacobian_bytes(N, C, P):
    return N * C * P * 4


def run_ntk(device: torch.device, quick: bool, meta: dict, mem_limit: float, large_n: int | None,
            rounds: int | None, kernels=("full", "lora"), worker_timeout: float = 3600,
            fp64: bool = False, on_rows=None, large_budget: float | None = None,
            fwd_chunk: int = 16, unfused: bool = False) -> list[dict]:
    """NTK suite; `on_rows(rows)` is called with the rows so far after each kernel (partial saves)."""
    cfg = ntk_config(device.type, quick)
    cfg["mem_limit"] = mem_limit
    if large_n is not None:
        cfg["large_N"] = large_n
    if rounds is not None:
        cfg["rounds"] = rounds
    N, C = cfg["N"], len(LABEL_IDS)
    base_spec = {k: cfg[k] for k in ("n_embd", "n_layer", "n_head", "vocab", "T")}
    base_spec["device"] = device.type
    # The fwd+bwd of the cost ratio runs in micro-batches of linft's sample tile (16) by default: on
    # 2 CPU cores one batch of 64 x 128 tokens ran 1.5-2x slower than 4 of 16 (activations out of
    # cache), which would flatter the ratio. --fwd-chunk 0 measures the whole batch at once.
    base_spec["fwd_chunk"] = fwd_chunk or None
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="linft-bench-"))
    # Parameter counts per kernel (cheap: one model build here, in the parent, on the meta device).
    for kernel in kernels:
        spec0 = {**base_spec, "kernel": kernel}
        with torch.device("meta"):
            model, names, _ = build_model({**spec0, "device": "meta"})
        P = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
        del model
        jb = _jacobian_bytes(N, C, P)
        n_base = N
        while _jacobian_bytes(n_base, C, P) * 1.3 > mem_limit and n_base > 1:
            n_base //= 2
        # fwd+bwd (cheap) brackets linft, so the cost ratio sees the same load on both sides
        methods = [("fwdbwd", N), ("linft", N), ("fwdbwd", N), ("vmap_jacrev", n_base),
                   ("ntk_vp", min(N, cfg["vp_N"]))]
        if base_spec["fwd_chunk"] and base_spec["fwd_chunk"] < N:  # the literal "one forward+backward":
            methods.insert(3, ("fwdbwd_whole", N))                  # all N samples in one batch
        if fp64 and kernel == "full" and not quick:
            methods.append(("linft_fp64", N))
        if unfused and kernel == "full" and not quick:
            methods.append(("linft_unfused", N))
        log(f"[ntk] kernel={kernel} P={P:,} N={N} C={C} T={cfg['T']} vocab={cfg['vocab']}; "
            f"baseline Jacobian {jb / GiB:.1f} GiB -> measured at n={n_base}")
        results: dict[str, list] = {m: [] for m, _ in methods}
        n_meas = dict(methods)
        for r in range(cfg["rounds"]):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for method, n_m in order:
                spec = {**spec0, "method": "linft" if method.startswith("linft") else method, "n_measure": n_m,
                        "ntk_dtype": "float64" if method == "linft_fp64" else "float32", "chunk": 8}
                if method == "linft_unfused":
                    spec["fuse_activations"] = False
                if r == 0 and method in ("linft", "vmap_jacrev", "ntk_vp"):
                    spec["save_k"] = str(tmp / f"{kernel}-{method}.pt")
                log(f"    round {r} {method} n={n_m} ...")
                results[method].append(_measure(spec, worker_timeout))
        # Correctness: linft's K against each baseline's (same first samples when measured at fewer).
        errs = {}
        fa = tmp / f"{kernel}-linft.pt"
        for base in ("vmap_jacrev", "ntk_vp"):
            fb = tmp / f"{kernel}-{base}.pt"
            if fa.exists() and fb.exists():
                Ka, Kb = torch.load(fa), torch.load(fb)
                m = Kb.shape[0]
                errs[base] = rel_err(Ka[:m, :m], Kb)
        if cfg["rounds"] > 0:  # --rounds 0: only the large run
            rows += _ntk_rows(kernel, cfg, P, C, results, n_meas, errs, meta, device)
        # The large-N linft run (full-weight kernel only): shows it completes where the baseline cannot.
        if kernel == "full" and cfg.get("large_N"):
            NL = cfg["large_N"]
            factors_bytes = NL * cfg["T"] * 4 * _factor_width(cfg) * cfg["n_layer"]
            budget = None if factors_bytes < mem_limit / 2 else int(mem_limit / 4)
            if large_budget is not None:
                budget = int(large_budget)
            spec = {**spec0, "method": "linft", "n_measure": NL, "ntk_dtype": "float32", "memory_budget": budget}
            log(f"[ntk] large: linft full-weight N={NL} (factors {factors_bytes / GiB:.1f} GiB, "
                f"budget {budget}); baseline Jacobian would be {_jacobian_bytes(NL, C, P) / GiB:.1f} GiB")
            res = _measure(spec, worker_timeout)
            rows.append(_large_row(kernel, cfg, NL, P, C, res, results, mem_limit, meta, device))
        if on_rows is not None:
            on_rows(rows)
    return rows


LLAMA_1B = dict(arch="llama", n_embd=2048, d_ff=5632, n_layer=22, n_head=32, n_kv_head=4, vocab=32000,
                model_dtype="bfloat16")  # TinyLlama-1.1B's shape: 1.1 B parameters


def run_ntk_llama(device: torch.device, meta: dict, N: int, T: int, rounds: int, quick: bool,
                  worker_timeout: float = 1800, on_rows=None, linft_opts: dict | None = None,
                  unfused: bool = False, only: tuple[str, ...] | None = None) -> list[dict]:
    """End-to-end LoRA NTK (r=8 on every attention and MLP projection) of a ~1B Llama-shaped bf16 model
    against one plain forward+backward over the same samples (micro-batched; the NTK cost ratio).
    unfused: also linft with fuse_activations=False (its RMSNorms as written), after the bracketing pair.
    only: run just these methods (e.g. ("linft",) to time a linft setting against a baseline measured
    by an earlier call on the same machine).

    No vmap(jacrev) baseline here: at N=1024 its Jacobian alone is N*C*P*4 bytes (50 GiB) and it runs
    C backward passes per sample, one sample at a time.
    """
    cfg = dict(LLAMA_1B)
    if quick:
        cfg.update(n_embd=256, d_ff=688, n_layer=2, n_head=4, n_kv_head=2, vocab=4096)
    spec0 = {**cfg, "T": T, "kernel": "lora", "device": device.type, "fwd_chunk": 32, **(linft_opts or {})}
    with torch.device("meta"):
        model, names, _ = build_model({**spec0, "device": "meta"})
    P = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    n_total = sum(p.numel() for p in model.parameters())
    del model
    C = len(LABEL_IDS)
    log(f"[ntk-llama] {n_total / 1e9:.2f} B params, LoRA P={P:,} N={N} T={T} C={C}")
    # fwdbwd_mb64: the baseline in micro-batches of 64 (linft's GPU sample tile) as well as 32, so the
    # cost ratio is also reported against the same batch size (larger micro-batches ran faster on an H200)
    methods = ["fwdbwd", "linft", "fwdbwd", "fwdbwd_mb64"] + (["linft_unfused"] if unfused else [])
    if only:
        unknown = set(only) - set(methods)
        if unknown:
            raise ValueError(f"--llama-methods: unknown method(s) {sorted(unknown)}; "
                             f"choose from {sorted(set(methods))}")
        methods = [m for m in methods if m in only]
    results: dict[str, list] = {m: [] for m in methods}
    for r in range(rounds):
        for method in methods:
            spec = {**spec0, "method": "linft" if method.startswith("linft") else "fwdbwd", "n_measure": N}
            # linft is timed twice in its process: the first call includes one-time work (Triton
            # autotuning of size buckets the warm-up did not meet, unless on disk from an earlier
            # process); the second is what a further call costs
            spec["again"] = method.startswith("linft")
            if method == "linft_unfused":
                spec["fuse_activations"] = False
            if method == "fwdbwd_mb64":
                spec["fwd_chunk"] = 64
            log(f"    round {r} {method} n={N} ...")
            results[method].append(_measure(spec, worker_timeout))
            rows = _llama_rows(results, cfg, N, T, C, P, n_total, meta, device)
            if on_rows is not None:  # saved after every measurement: a killed run keeps what it had
                on_rows(rows)
    return rows


def _llama_rows(results, cfg, N, T, C, P, n_total, meta, device) -> list[dict]:
    fb, lm = _med(results.get("fwdbwd", [])), _med(results.get("linft", []))
    if lm and fb:
        log(f"[ntk-llama] linft {lm:.2f} s / fwd+bwd {fb:.2f} s = NTK cost ratio {lm / fb:.2f}")
    shape = {"N": N, "T": T, "C": C, "P": P, **{k: cfg[k] for k in ("n_embd", "d_ff", "n_layer", "vocab")}}
    rows = []
    for method, rs_all in results.items():
        rs = [r for r in rs_all if "error" not in r]
        row = {"suite": "ntk", "op": "empirical_ntk", "name": "ntk_llama1b_lora_r8", "kernel": "lora", "method": method,
               "backend": f"linft ({device.type}{', unfused' if method == 'linft_unfused' else ''})" if method.startswith("linft") else method, "shape": shape,
               "shape_str": f"N={N},T={T},C={C},P={P}", "dtype": "bfloat16 model, float32 NTK",
               "device": device.type, "n_model_params": n_total, "median_s": _med(rs),
               "times_s": [r["wall_s"] for r in rs], "peak_mem_bytes": _peak(rs),
               "peak_mem_kind": rs[0]["peak_mem_kind"] if rs else None, "reps": len(rs),
               "errors": [r["error"][-800:] for r in rs_all if "error" in r],
               "info": rs[0].get("info") if rs else None, **meta}
        _worker_identity(row, rs, meta)
        if method == "linft_unfused":
            row["note"] = "fuse_activations=False: the RMSNorms run as written (the default fuses them)"
        if method == "fwdbwd_mb64":
            row["note"] = "the same forward+backward in micro-batches of 64 (the fwdbwd rows: 32)"
        med = _med(rs)
        fb64 = _med(results.get("fwdbwd_mb64", []))
        warm = [r["again"]["wall_s"] for r in rs if r.get("again")]
        if warm:  # linft called a second time in its process
            row.update({"again_s": warm, "again_median_s": statistics.median(warm),
                        "again_timings": rs[0]["again"]["info"].get("timings")})
            ratio = f" = {row['again_median_s'] / fb:.2f} x fwd+bwd" if fb else ""
            if fb:
                row["ntk_cost_ratio_again"] = row["again_median_s"] / fb
            log(f"[ntk-llama] {method} called again in the same process: {row['again_median_s']:.2f} s{ratio}")
        if method.startswith("linft") and med and fb:
            row.update({"fwdbwd_s": fb, "ntk_cost_ratio": med / fb, "baseline": "one forward+backward"})
            if fb64:
                row.update({"fwdbwd_mb64_s": fb64, "ntk_cost_ratio_mb64": med / fb64})
            if method == "linft":
                row["targets"] = {"ntk_cost_ratio<=1.5": med / fb <= 1.5}
        rows.append(row)
    return rows


def _factor_width(cfg) -> int:
    """sum over the 4 linear layers of one GPT-2 block of d_in + C*d_out (what the psg/ghost path keeps)."""
    d, C = cfg["n_embd"], len(LABEL_IDS)
    layers = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    return sum(di + C * do for di, do in layers)


def _med(results, key="wall_s"):
    vals = [r[key] for r in results if "error" not in r]
    return statistics.median(vals) if vals else None


def _peak(results):
    vals = [r["peak_mem_bytes"] for r in results if "error" not in r]
    return max(vals) if vals else None


def _ntk_shape(cfg, N, P, C):
    return {"N": N, "T": cfg["T"], "C": C, "P": P, "n_embd": cfg["n_embd"], "n_layer": cfg["n_layer"],
            "vocab": cfg["vocab"]}


def _ntk_rows(kernel, cfg, P, C, results, n_meas, errs, meta, device) -> list[dict]:
    """errs: linft's relative error against each baseline's K ({"vmap_jacrev": .., "ntk_vp": ..})."""
    N = cfg["N"]
    err = errs.get("vmap_jacrev")
    name = "ntk_full_weight" if kernel == "full" else "ntk_lora_r8"
    fb = _med(results["fwdbwd"])
    fbw = _med(results.get("fwdbwd_whole", []))
    # Baseline, extrapolated if measured at a smaller n.
    vr = [r for r in results["vmap_jacrev"] if "error" not in r]
    n_b = n_meas["vmap_jacrev"]
    base_s = base_mem = None
    extrap = None
    if vr:
        if n_b == N:
            base_s, base_mem = _med(vr), _peak(vr)
        else:
            s = N / n_b
            tj = statistics.median([r["info"]["t_jacobian_s"] for r in vr])
            tg = statistics.median([r["info"]["t_gram_s"] for r in vr])
            base_s = tj * s + tg * s * s
            jb = vr[0]["info"]["jacobian_bytes"]
            base_mem = _peak(vr) - jb + jb * s
            extrap = n_b
    # NTK-vector products: time grows as N^2 (N*C columns, each a pass over N samples), extrapolated.
    vp = [r for r in results.get("ntk_vp", []) if "error" not in r]
    n_vp = n_meas.get("ntk_vp")
    vp_s = _med(vp) * (N / n_vp) ** 2 if vp else None
    rows = []
    common = {"suite": "ntk", "op": "empirical_ntk", "name": name, "kernel": kernel, "shape": _ntk_shape(cfg, N, P, C),
              "shape_str": f"N={N},T={cfg['T']},C={C},P={P}", "dtype": "float32", "device": device.type,
              "flops_contraction": FL.ntk_contraction(N, C, P), **meta}
    for method in results:
        rs = [r for r in results[method] if "error" not in r]
        med = _med(rs)
        row = {**common, "method": method, "backend": f"linft ({device.type})" if method.startswith("linft")
               else method, "median_s": med, "times_s": [r["wall_s"] for r in rs],
               "cpu_s": _med(rs, "cpu_s"), "peak_mem_bytes": _peak(rs),
               "peak_mem_kind": rs[0]["peak_mem_kind"] if rs else None,
               "reps": len(rs), "errors": [r["error"][-500:] for r in results[method] if "error" in r],
               "load_avg": [r.get("load_avg_before") for r in rs], "n_measured": n_meas[method]}
        if method == "linft_fp64":
            row["dtype"] = "float64 accumulation (empirical_ntk default)"
        if method == "linft_unfused":
            row["note"] = "fuse_activations=False: GPT-2's gelu_new run as written (the default fuses it)"
        if rs and "info" in rs[0]:
            row["info"] = rs[0]["info"]
        _worker_identity(row, rs, meta)
        if method.startswith("linft") and med:
            row.update({
                "baseline": "vmap(jacrev)+J@J.T", "baseline_median_s": base_s, "baseline_peak_mem_bytes": base_mem,
                "ratio": (base_s / med) if base_s else None, "extrapolated_from_n": extrap,
                "fwdbwd_s": fb, "ntk_cost_ratio": (med / fb) if fb else None,
                "fwdbwd_whole_batch_s": fbw, "ntk_cost_ratio_whole_batch": (med / fbw) if fbw else None,
                "baseline_cost_ratio": (base_s / fb) if base_s and fb else None,
                "baseline_cost_ratio_whole_batch": (base_s / fbw) if base_s and fbw else None,
                "mem_ratio": (row["peak_mem_bytes"] / base_mem) if base_mem and row["peak_mem_bytes"] else None,
                "max_rel_err": err if method == "linft" else None,
                "ntk_vp_s": vp_s, "ratio_vs_ntk_vp": (vp_s / med) if vp_s else None,
                "max_rel_err_vs_ntk_vp": errs.get("ntk_vp") if method == "linft" else None,
            })
            if kernel == "full":
                row["targets"] = {
                    "ntk_cost_ratio<=2": None if row["ntk_cost_ratio"] is None else row["ntk_cost_ratio"] <= 2,
                    "peak_mem<=baseline/4": None if row["mem_ratio"] is None else row["mem_ratio"] <= 0.25,
                }
        if method == "ntk_vp" and vp and n_vp != N:
            row.update({"extrapolated_from_n": n_vp, "measured_median_s": med, "median_s": vp_s,
                        "measured_peak_mem_bytes": row["peak_mem_bytes"], "peak_mem_bytes": None,
                        "note": f"measured at n={n_vp}; time = t_n * (N/n)^2 (N*C columns, each one VJP "
                                "and one JVP over all N samples); peak memory only as measured at n"})
        if method == "vmap_jacrev" and extrap:
            row.update({"extrapolated_from_n": extrap, "measured_median_s": med, "median_s": base_s,
                        "measured_peak_mem_bytes": row["peak_mem_bytes"], "peak_mem_bytes": base_mem,
                        "note": f"measured at n={extrap} (its Jacobian would not fit the {cfg['mem_limit'] / GiB:.0f} GiB limit); "
                                "time = t_jac*N/n + t_gram*(N/n)^2, memory = peak - J_n + J_N"})
        rows.append(row)
    return rows


def _worker_identity(row: dict, rs: list[dict], meta: dict) -> None:
    """The commit and kernel build the workers saw; flagged when they differ from the run's start."""
    builds = {json.dumps(r.get("kernel_build"), sort_keys=True) for r in rs if r.get("kernel_build")}
    commits = {r.get("git_commit") for r in rs if r.get("git_commit")}
    if len(commits) == 1:
        row["git_commit"] = commits.pop()
    elif commits:
        row["git_commit"] = sorted(commits)
    if len(builds) == 1:
        row["versions"] = {**meta["versions"], "linft_build": json.loads(builds.pop())}
    elif builds:
        row["versions"] = {**meta["versions"], "linft_build": [json.loads(b) for b in sorted(builds)]}
    start = json.dumps(meta["versions"].get("linft_build"), sort_keys=True)
    row["kernels_changed_during_run"] = any(json.dumps(r.get("kernel_build"), sort_keys=True) != start
                                           for r in rs if r.get("kernel_build"))


def _large_row(kernel, cfg, NL, P, C, res, results, mem_limit, meta, device) -> dict:
    ok = "error" not in res
    fb = _med(results["fwdbwd"])
    row = {"suite": "ntk", "op": "empirical_ntk", "name": "ntk_full_weight_large", "kernel": kernel, "method": "linft",
           "backend": f"linft ({device.type})", "shape": _ntk_shape(cfg, NL, P, C),
           "shape_str": f"N={NL},T={cfg['T']},C={C},P={P}", "dtype": "float32", "device": device.type,
           "median_s": res.get("wall_s"), "times_s": [res["wall_s"]] if ok else [], "cpu_s": res.get("cpu_s"),
           "peak_mem_bytes": res.get("peak_mem_bytes"), "peak_mem_kind": res.get("peak_mem_kind"),
           "info": res.get("info"), "errors": [] if ok else [res["error"][-500:]], "reps": 1 if ok else 0,
           "completed": ok, "baseline": "vmap(jacrev)+J@J.T",
           "baseline_jacobian_bytes": _jacobian_bytes(NL, C, P),
           "baseline_feasible": _jacobian_bytes(NL, C, P) <= mem_limit,
           "note": f"the baseline's Jacobian alone is {_jacobian_bytes(NL, C, P) / GiB:.1f} GiB "
                   f"(limit {mem_limit / GiB:.0f} GiB): not run",
           "fwdbwd_s_at_N": fb, "fwdbwd_N": cfg["N"],
           "flops_contraction": FL.ntk_contraction(NL, C, P), **meta}
    _worker_identity(row, [res] if ok else [], meta)
    return row


# ==================================================================================================
# Output, comparison

KEY_FIELDS = ("suite", "name", "op", "kernel", "shape_str", "dtype", "device", "backend", "baseline", "method")


def row_key(r: dict) -> tuple:
    return tuple(str(r.get(k)) for k in KEY_FIELDS)


def load_rows(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


def compare(old_rows: list[dict], new_rows: list[dict], pct: float | None) -> int:
    """Print new vs old per matching row. Regression: ops/ntk rows with a ratio (same-run baseline)
    whose ratio fell by more than pct%; rows without one (timings only) when the time rose by more."""
    old = {row_key(r): r for r in old_rows}
    n_reg = 0
    print(f"{'row':<88} {'old':>9} {'new':>9} {'change':>8}")
    for r in new_rows:
        o = old.get(row_key(r))
        if o is None or r.get("suite") == "peak":
            continue
        label = " ".join(str(r.get(k)) for k in ("name", "kernel", "shape_str", "dtype", "backend", "baseline",
                                                  "method") if r.get(k) is not None)[:88]
        if r.get("ratio") and o.get("ratio"):
            old_v, new_v, what = o["ratio"], r["ratio"], "ratio"
            change = 100 * (new_v / old_v - 1)  # + better
        elif r.get("median_s") and o.get("median_s"):
            old_v, new_v, what = o["median_s"], r["median_s"], "s"
            change = 100 * (old_v / new_v - 1)  # + faster
        else:
            continue
        bad = pct is not None and change < -pct
        n_reg += bad
        print(f"{label:<88} {old_v:9.3g} {new_v:9.3g} {change:+7.1f}% {what}{'  REGRESSION' if bad else ''}")
    if pct is not None:
        print(f"{n_reg} regression(s) beyond {pct}%")
    return n_reg


def summarize(rows: list[dict]) -> None:
    for r in rows:
        if r["suite"] == "ops":
            print(f"ops  {r['name']:<24} {r['op'] + ('/' + r['kernel'] if r['kernel'] else ''):<18} "
                  f"{r['shape_str']:<34} {r['dtype']:<9} {r['backend']:<9} vs {r['baseline']:<32} "
                  f"{r['median_s'] * 1e3:9.1f} ms {r['baseline_median_s'] * 1e3:9.1f} ms  x{r['ratio']:.2f}  "
                  f"{r['achieved_gflops']:7.1f}/{(r['peak_gflops'] or 0):.0f} GFLOP/s")
        elif r["suite"] == "ntk":
            extra = ""
            if r.get("ntk_cost_ratio") is not None:
                extra = f" cost ratio {r['ntk_cost_ratio']:.2f}"
            if r.get("ntk_cost_ratio_whole_batch") is not None:
                extra += f" ({r['ntk_cost_ratio_whole_batch']:.2f} vs one whole-batch fwd+bwd)"
            if r.get("ratio") is not None:
                extra += f" vs baseline x{r['ratio']:.2f}"
            if r.get("mem_ratio") is not None:
                extra += f" mem {r['mem_ratio']:.2f} of baseline"
            if r.get("ratio_vs_ntk_vp") is not None:
                extra += f" vs NTK-vector products x{r['ratio_vs_ntk_vp']:.1f}"
            if r.get("extrapolated_from_n"):
                extra += f" (extrapolated from n={r['extrapolated_from_n']})"
            ms = r.get("median_s")
            pm = r.get("peak_mem_bytes")
            print(f"ntk  {r['name']:<24} {r['method']:<12} {r['shape_str']:<34} "
                  f"{(ms if ms is not None else float('nan')):9.1f} s  peak "
                  f"{f'{pm / GiB:6.2f} GiB' if pm is not None else '   n/a    '}{extra}")


def markdown_table(rows: list[dict]) -> str:
    """The README's summary tables (ops: linft native backend vs each baseline; NTK rows)."""
    out = ["| op | shape | dtype | backend | baseline | linft | baseline | ratio | GFLOP/s (peak) | rel. err |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["suite"] != "ops" or r["backend"] == "reference":
            continue
        op = r["op"] + (f"/{r['kernel']}" if r["kernel"] else "") + (" sym" if "sym" in r["name"] else " cross")
        out.append(f"| {op} | {r['shape_str']} | {r['dtype']} | {r['backend']} | {r['baseline']} | "
                   f"{_fmt_s(r['median_s'])} | {_fmt_s(r['baseline_median_s'])} | **{r['ratio']:.2f}** | "
                   f"{r['achieved_gflops']:.0f} ({r['peak_gflops']:.0f}) | {r['max_rel_err']:.1e} |")
    out += ["", "| NTK | method | N | time | peak mem | NTK cost ratio | vs vmap(jacrev) | mem / vmap(jacrev) "
                "| vs NTK-vector products |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["suite"] != "ntk":
            continue
        ms, pm = r.get("median_s"), r.get("peak_mem_bytes")
        ex = f" (extrapolated from n={r['extrapolated_from_n']})" if r.get("extrapolated_from_n") else ""
        cr = f"{r['ntk_cost_ratio']:.2f}" if r.get("ntk_cost_ratio") else ""
        if r.get("ntk_cost_ratio_whole_batch"):
            cr += f" ({r['ntk_cost_ratio_whole_batch']:.2f} whole batch)"
        vb = f"{r['ratio']:.2f}x" if r.get("ratio") else ""
        mr = f"{r['mem_ratio']:.2f}" if r.get("mem_ratio") else ""
        vp = f"{r['ratio_vs_ntk_vp']:.1f}x" if r.get("ratio_vs_ntk_vp") else ""
        out.append(f"| {r['name']} | {r['method']}{ex} | {r['shape']['N']} | "
                   f"{_fmt_s(ms) if ms is not None else 'failed'} | "
                   f"{f'{pm / GiB:.2f} GiB' if pm is not None else 'n/a'} | {cr} | {vb} | {mr} | {vp} |")
    return "\n".join(out)


# Issue 5's targets as the rows measure them: (target, rows it reads, threshold on a row's value).
# Ops rows: the best call of the op itself (a backend, possibly with tile_dtype, route or a
# documented kernel switch: not `reference`, and not the candidates that bypass the op, which are
# `_OFF_OP`) of the named case and dtype.
_OFF_OP = ("cublas", "cpu [native kernel]")
_OPS_TARGETS = [
    ("CPU gram sym fp32 N=4096, P=65536 >= 1.6x a @ a.T", "cpu", "gram_sym_headline", "float32",
     "N=4096,P=65536", "torch a@a.T [float32]", "ratio", 1.6),
    ("H200 gram bf16 >= 70% of the bf16 GEMM rate", "cuda", "gram_sym", "bfloat16", "N=4096,P=65536",
     None, "pct", 70.0),
    ("H200 psg_gram bf16 >= 50% of the bf16 GEMM rate", "cuda", "psg_gram_sym", "bfloat16",
     "N=256,T=256,d_in=1024,d_out=1024", None, "pct", 50.0),
]


def targets_table(rows: list[dict]) -> str:
    """Markdown: each issue-5 target the rows measure, the best candidate's value, met or not. GPU
    rates are given under both timers (`pct`: synchronous per-call median; `pipelined`: do_bench
    median, host launch work overlapped) and the target counts as met when either reaches it."""
    out = ["| target | best row | value | met |", "|---|---|---|---|"]
    for what, device, name, dtype, shape, baseline, metric, need in _OPS_TARGETS:
        cands = [r for r in rows if r.get("suite") == "ops" and r.get("device") == device
                 and r.get("name") == name and r.get("dtype") == dtype and r.get("backend") != "reference"
                 and not str(r.get("backend")).startswith(_OFF_OP)
                 and (shape is None or r.get("shape_str") == shape)
                 and (baseline is None or r.get("baseline") == baseline)
                 and (r.get("kernel") in (None, "sgd"))]
        if not cands:
            continue
        if metric == "ratio":
            best = max(cands, key=lambda r: r.get("ratio") or 0)
            val, ok = f"{best['ratio']:.2f}x", (best.get("ratio") or 0) >= need
        else:
            def score(r):
                return max(r.get("pct_of_peak") or 0, r.get("pipelined_pct_of_peak") or 0)
            best = max(cands, key=score)
            pip = best.get("pipelined_pct_of_peak")
            val = f"{best.get('pct_of_peak') or 0:.0f}%" + (f" ({pip:.0f}% pipelined)" if pip else "")
            ok = score(best) >= need
        out.append(f"| {what} | {best['backend']} ({str(best.get('git_commit', '?'))[:7]}) | {val} | "
                   f"{'yes' if ok else 'no'} |")
    for r in rows:
        t = r.get("targets") or {}
        if r.get("suite") == "ntk" and "ntk_cost_ratio<=1.5" in t:
            out.append(f"| {r.get('device')} {r['name']}: NTK <= 1.5x one forward+backward | {r['method']} "
                       f"({str(r.get('git_commit', '?'))[:7]}) | {r['ntk_cost_ratio']:.2f}x | "
                       f"{'yes' if t['ntk_cost_ratio<=1.5'] else 'no'} |")
    return "\n".join(out)


def _peak_rows(name: str, peaks: dict, device: torch.device, meta: dict) -> list[dict]:
    """Rows of measured GEMM peaks ({dtype: machine.measure_peak record}), each also logged."""
    rows = []
    for k, v in peaks.items():
        log(f"    {k:<9} n={v['gemm_n']}: best {v['peak_gflops']:.1f} GFLOP/s, median {v['median_gflops']:.1f}")
        rows.append({"suite": "peak", "name": name, "op": "gemm", "dtype": k, "device": device.type,
                     "backend": "torch", "shape": {"M": v["gemm_n"], "N": v["gemm_n"], "K": v["gemm_n"]},
                     "shape_str": f"n={v['gemm_n']}", "peak_gflops": v["peak_gflops"],
                     "median_gflops": v["median_gflops"], **meta})
    return rows


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.1f} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("ops", "ntk", "all", "none"), default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", help="result JSON (rows); default bench/results/<device>-<date>.json")
    ap.add_argument("--quick", action="store_true", help="small shapes, ~2 minutes on 2 CPU cores")
    ap.add_argument("--only", help="ops: run only cases whose name contains one of these (comma list)")
    ap.add_argument("--dtypes", help="ops: run only cases of these dtypes (comma list: bfloat16,float32)")
    ap.add_argument("--ntk-kernels", default="full,lora", help="comma list of full,lora")
    ap.add_argument("--large-n", type=int, default=None,
                    help="N of the large linft-only NTK run (default 256 on CPU, 1024 on CUDA; 0 skips)")
    ap.add_argument("--large-budget-gib", type=float, default=None,
                    help="memory_budget of the large-N run (default: none if its factors fit half the "
                         "memory limit, else a quarter of it: linft peaks near 2x the budget, see README)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="NTK measurement rounds per method (0: only the large-N linft run)")
    ap.add_argument("--mem-limit-gib", type=float, default=None,
                    help="memory a baseline may use (default 16 GiB on CPU, 90%% of GPU memory on CUDA)")
    ap.add_argument("--fp64", action="store_true",
                    help="also time linft with its default fp64 accumulation (full-weight kernel)")
    ap.add_argument("--unfused", action="store_true",
                    help="ntk: also time linft with fuse_activations=False (gpt2 preset: the full-weight "
                         "kernel; llama-1b: after the bracketing fwd+bwd pair)")
    ap.add_argument("--fwd-chunk", type=int, default=16,
                    help="gpt2 preset: micro-batch of the fwd+bwd baseline (default 16 = linft's sample "
                         "tile; 0: the whole batch at once)")
    ap.add_argument("--ntk-preset", choices=("gpt2", "llama-1b"), default="gpt2",
                    help="gpt2: the GPT-2 512/4-layer suite (full + LoRA, vs vmap(jacrev)); llama-1b: LoRA r=8 "
                         "NTK of a 1.1B Llama-shaped bf16 model vs one forward+backward (GPU; --quick: tiny)")
    ap.add_argument("--ntk-n", type=int, default=1024, help="llama-1b preset: samples N")
    ap.add_argument("--ntk-t", type=int, default=256, help="llama-1b preset: tokens per sample T")
    ap.add_argument("--worker-timeout", type=float, default=1800, help="llama-1b preset: seconds per measurement")
    ap.add_argument("--sample-tile", type=int, default=None, help="llama-1b preset: empirical_ntk sample_tile")
    ap.add_argument("--llama-methods", type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                    default=None, help="llama-1b preset: only these methods (comma list of fwdbwd, linft, "
                                       "fwdbwd_mb64, linft_unfused)")
    ap.add_argument("--compare", metavar="OLD.json", help="print ratios against an earlier result file")
    ap.add_argument("--new", metavar="NEW.json", help="with --compare and no --suite: compare two files")
    ap.add_argument("--fail-if-regression", type=float, metavar="PCT", default=None)
    ap.add_argument("--table", metavar="RESULTS.json", help="print the markdown summary tables of a result file")
    ap.add_argument("--targets", metavar="RESULTS.json", nargs="+",
                    help="print issue 5's targets as these result files measure them")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    if args.targets:
        print(targets_table([r for path in args.targets for r in load_rows(path)]))
        return 0
    if args.table:
        print(markdown_table(load_rows(args.table)))
        return 0
    if args.suite in (None, "none"):
        if not (args.compare and args.new):
            ap.error("give --suite, or --compare OLD.json --new NEW.json")
        n = compare(load_rows(args.compare), load_rows(args.new), args.fail_if_regression)
        return 1 if (args.fail_if_regression is not None and n) else 0

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})", file=sys.stderr)
        return 2
    date = time.strftime("%Y-%m-%d")
    out = Path(args.out or HERE / "results" / f"{device.type}-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = machine.metadata(device.type)
    meta["quick"] = args.quick
    t_all = time.perf_counter()
    log(f"linft bench: suite={args.suite} device={device.type} quick={args.quick} "
        f"cores={meta['hardware']['cores']} load={machine.load_average()} commit={meta['git_commit']}"
        f"{' (dirty)' if meta['git_dirty'] else ''}")
    log("[peak] measuring GEMM peaks ...")
    peaks = machine.measure_peaks(device.type, quick=args.quick)
    rows = _peak_rows("gemm_peak_start", peaks, device, meta)

    def save():
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows, indent=1, default=str))
        os.replace(tmp, out)

    if args.suite in ("ops", "all"):
        n_ops = len(rows)

        def partial_ops(op_rows):
            rows[n_ops:] = op_rows
            save()

        run_ops(device, args.quick, peaks, meta, args.only, on_rows=partial_ops, dtypes=args.dtypes)
    if args.suite in ("ntk", "all"):
        if args.mem_limit_gib is not None:
            mem_limit = args.mem_limit_gib * GiB
        elif device.type == "cuda":
            mem_limit = 0.9 * torch.cuda.get_device_properties(0).total_memory
        else:
            mem_limit = 16 * GiB
        kernels = tuple(k.strip() for k in args.ntk_kernels.split(",") if k.strip())
        n0 = len(rows)

        def partial(ntk_rows):
            rows[n0:] = ntk_rows
            save()

        if args.ntk_preset == "llama-1b":
            opts = {} if args.sample_tile is None else {"sample_tile": args.sample_tile}
            run_ntk_llama(device, meta, args.ntk_n, args.ntk_t, args.rounds or 1, args.quick,
                          worker_timeout=args.worker_timeout, on_rows=partial, linft_opts=opts,
                          unfused=args.unfused, only=args.llama_methods)
        else:
            run_ntk(device, args.quick, meta, mem_limit, args.large_n, args.rounds, kernels,
                    fp64=args.fp64, on_rows=partial,
                    large_budget=None if args.large_budget_gib is None else args.large_budget_gib * GiB,
                    fwd_chunk=args.fwd_chunk, unfused=args.unfused)
    # The peak again at the end (load from other processes changes during a run): rows use the best.
    log("[peak] measuring GEMM peaks again ...")
    peaks_end = machine.measure_peaks(device.type, quick=args.quick)
    rows += _peak_rows("gemm_peak_end", peaks_end, device, meta)
    best = {k: max(peaks[k]["peak_gflops"], peaks_end[k]["peak_gflops"]) for k in peaks}
    end_build = machine.kernel_build()
    if end_build != meta["versions"]["linft_build"]:
        log("WARNING: the linft sources or native kernels on disk changed during this run; "
            "ops rows used the build loaded at the start, NTK rows record what each worker loaded")
    for r in rows:
        r["total_run_s"] = time.perf_counter() - t_all
        if r["suite"] == "ops" and r.get("peak_dtype") in best:
            r["peak_gflops"] = best[r["peak_dtype"]]
            r["pct_of_peak"] = 100 * r["achieved_gflops"] / r["peak_gflops"]
            r["peak_note"] = "best of the GEMM peaks measured at the start and at the end of the run"
    save()
    log(f"wrote {len(rows)} rows to {out} ({time.perf_counter() - t_all:.0f}s)")
    summarize(rows)
    if args.compare:
        n = compare(load_rows(args.compare), rows, args.fail_if_regression)
        if args.fail_if_regression is not None and n:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
