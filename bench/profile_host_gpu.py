"""Where a sub-millisecond op's per-call time goes on a GPU: the host's work or the GPU's.

The ops sweep times every candidate twice: synchronously per call (host work + GPU work + one
synchronization, as a caller who waits for each result sees it) and by triton.testing.do_bench
(back-to-back calls, which hide the host's work up to the GPU's time). On the H200 the two differed by
0.3-0.9 ms on sub-millisecond ops, by more for linft's ops than for torch's. This script splits a call
into:
  * issue:      wall time until fn() returns, the GPU idle at entry (the host's work, plus any wait
                the host makes inside the call),
  * issue busy: the same with the GPU kept busy by a long matmul queued first, so that no launch can
                wait for the GPU: the host's own work per call,
  * sync:       wall time until the GPU has finished (the sweep's synchronous timer),
  * gpu:        CUDA events around the call, recorded behind the queued matmul of "issue busy": every
                kernel of the call is queued before the GPU reaches it, so this is the GPU's own time
                (warm L2),
  * do_bench:   triton.testing.do_bench's median (back-to-back calls, L2 flushed): about the larger of
                the GPU's time and the host's, as a loop that never waits sees it,
  * allocs:     device allocations (cudaMalloc: segments the caching allocator had to add) and
                allocator retries per call, over the timed calls;
and, for each linft op, the host functions with the most own time (cProfile over 50 calls).
Medians over 50 calls; inputs drawn once.

    python bench/profile_host_gpu.py --out $OUT/host-profile.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cases(dev: str, quick: bool):
    """(name, fn, profile it) for the candidates: the shapes of the sweep's sub-millisecond rows."""
    import linft_kernels as lk
    from harness import _materialize

    bf16 = torch.bfloat16
    n, p = (16, 4096) if quick else (256, 786432)
    N, T, d = (8, 16, 32) if quick else (256, 256, 1024)
    torch.manual_seed(0)
    a = torch.randn(n, p, device=dev, dtype=bf16)
    x = torch.randn(N, T, d, device=dev, dtype=bf16)
    g = torch.randn(N, T, d, device=dev, dtype=bf16) / 16
    backends = ("cuda", "triton") if dev == "cuda" else ("reference",)
    mm = ((lambda: torch.mm(a, a.t(), out_dtype=torch.float32)) if dev == "cuda"  # fp32 out, as the op's
          else (lambda: torch.mm(a, a.t())))  # the CPU's mm takes no out_dtype for bf16
    cases = [(f"gram N={n} P={p}: torch a@a.T", mm, False)]
    for be in backends:
        cases.append((f"gram N={n} P={p}: linft {be}", lambda be=be: lk.gram(a, backend=be), True))
    cases.append((f"psg sgd N={N} T={T} d={d}: einsum materialize (bf16 out)",
                  lambda: _materialize(x, g, None, None), False))
    for be in backends:
        cases.append((f"psg sgd N={N} T={T} d={d}: linft {be} bf16 tiles",
                      lambda be=be: lk.psg_gram(x, g, backend=be, tile_dtype=bf16), True))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=None, help="also write the report (and a .json beside it) here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: checks the script, "
                                                         "times nothing worth reading")
    args = ap.parse_args()
    if not args.quick and not torch.cuda.is_available():
        print("profile_host_gpu.py needs a CUDA GPU (or --quick)", file=sys.stderr)
        return 2
    dev = "cpu" if args.quick else "cuda"
    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    lines, rows = [], []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    if cuda:
        import triton
        say(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
        big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    say(f"{'candidate':56s} {'issue':>9s} {'busy':>9s} {'sync':>9s} {'gpu':>9s} {'do_bench':>9s} {'mallocs':>8s} "
        f"{'retries':>8s}")
    profiles = []
    for name, fn, profile in _cases(dev, args.quick):
        try:
            for _ in range(3):
                fn()
                if cuda:
                    torch.mm(big, big)
            sync()
            stats0 = torch.cuda.memory_stats() if cuda else {}
            issue, busy, total, gpu_alone = [], [], [], []
            for _ in range(args.calls):
                sync()
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                sync()
                t2 = time.perf_counter()
                issue.append(t1 - t0)
                total.append(t2 - t0)
                if cuda:  # the same call behind ~1.5 ms of queued GPU work: no launch waits for the GPU
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.mm(big, big)
                    start.record()
                    t0 = time.perf_counter()
                    fn()
                    busy.append(time.perf_counter() - t0)
                    end.record()
                    sync()
                    gpu_alone.append(start.elapsed_time(end) / 1e3)
            stats1 = torch.cuda.memory_stats() if cuda else {}
            calls = 2 * args.calls if cuda else args.calls
            mallocs = (stats1["segment.all.allocated"] - stats0["segment.all.allocated"]) / calls if cuda else 0
            retries = (stats1["num_alloc_retries"] - stats0["num_alloc_retries"]) / calls if cuda else 0
            bench = (triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3) if cuda else None
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
            say(f"{name:56s} ERROR {type(e).__name__}: {str(e)[:120]}")
            rows.append({"name": name, "error": str(e)[:400]})
            continue
        med = lambda v: statistics.median(v) * 1e3 if v else float("nan")  # noqa: E731
        row = {"name": name, "issue_ms": med(issue), "issue_busy_ms": med(busy), "sync_ms": med(total),
               "gpu_ms": med(gpu_alone), "do_bench_ms": None if bench is None else bench * 1e3,
               "mallocs_per_call": mallocs, "alloc_retries_per_call": retries}
        rows.append(row)
        say(f"{name:56s} {row['issue_ms']:7.3f}ms {row['issue_busy_ms']:7.3f}ms {row['sync_ms']:7.3f}ms "
            f"{row['gpu_ms']:7.3f}ms {(row['do_bench_ms'] or float('nan')):7.3f}ms {mallocs:8.2f} {retries:8.2f}")
        if profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.calls):
                fn()
            pr.disable()
            sync()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
            profiles.append(f"--- {name}: cProfile over {args.calls} calls, by own time\n{s.getvalue()}")
    for p in profiles:
        say(p)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        import machine  # bench/machine.py: hardware, versions, git commit and date, as harness rows carry
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"calls": args.calls, **machine.metadata(dev), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
