"""Where the time of a LoRA NTK on a GPU goes: a diagnostic, not a benchmark row.

Builds the 1.1B Llama-shaped bf16 model of `harness.py --ntk-preset llama-1b`, then, with the GPU
synchronized around every measurement (warm after one untimed call each):
  * one plain forward+backward over N samples (micro-batches of 32),
  * empirical_ntk at several sample_tile values (the engine's own phase timings alongside),
  * one torch.profiler trace of empirical_ntk on a few samples: the top CUDA kernels and CPU ops,
  * (--phases-n) per-tile phases of one empirical_ntk call, unsynchronized: the host time each phase
    of `capture_tile` takes to issue its work (forward, each output's backward, the stored forms, the
    store writes), the tile's wall time, the GPU time between CUDA events at tile boundaries, and the
    allocator's and the synchronizing calls' counts. A tile whose host time is about its wall time is
    host-bound (the GPU waited); cudaMalloc retries or synchronizations per tile show stalls.

    python bench/profile_ntk_gpu.py --n 256 --t 256 --tiles 16,64 --out $OUT/profile.txt
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    r = fn()
    _sync()
    return time.perf_counter() - t0, r


@contextlib.contextmanager
def _phase_probes(cuda: bool):
    """Wraps the phases of linft.capture.capture_tile (as the engine calls them) with host timers;
    yields the list of per-tile records that each finished tile appends."""
    import linft.capture as cap
    import linft.engine as eng
    tiles, cur = [], {}
    real = {"run_output": cap.run_output, "_output_gradients": cap._output_gradients,
            "_block_form": cap._block_form, "put": cap.Store.put, "capture_tile": eng.capture_tile}

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                cur[key] = cur.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    def output_gradients(*a, **k):  # each output's backward pass (in-pass forms are computed inside it)
        it, c = real["_output_gradients"](*a, **k), 0
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            cur[f"backward[{c}]"] = time.perf_counter() - t0
            c += 1
            yield item

    def capture_tile(*a, **k):
        cur.clear()
        stats0 = torch.cuda.memory_stats() if cuda else {}
        ev0 = torch.cuda.Event(enable_timing=True) if cuda else None
        if cuda:
            ev0.record()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = real["capture_tile"](*a, **k)
        rec = {"host_s": time.perf_counter() - t0, **cur,
               "syncs": sum("synchroniz" in str(w.message) for w in caught)}
        if cuda:
            ev1 = torch.cuda.Event(enable_timing=True)
            ev1.record()
            rec["_events"] = (ev0, ev1)
            stats1 = torch.cuda.memory_stats()
            for key in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams"):
                rec[key] = stats1.get(key, 0) - stats0.get(key, 0)
        rec["t_end"] = time.perf_counter()
        tiles.append(rec)
        return r

    cap.run_output = timed("forward", real["run_output"])
    cap._output_gradients = output_gradients
    cap._block_form = timed("forms", real["_block_form"])
    cap.Store.put = timed("store", real["put"])
    eng.capture_tile = capture_tile
    try:
        yield tiles
    finally:
        cap.run_output, cap._output_gradients = real["run_output"], real["_output_gradients"]
        cap._block_form, cap.Store.put, eng.capture_tile = real["_block_form"], real["put"], real["capture_tile"]


def phase_breakdown(model, batch, output, params, tile: int, say) -> None:
    """One empirical_ntk call with `_phase_probes`: a line per tile (host seconds per phase, wall
    seconds since the previous tile ended, GPU seconds between the tile's events)."""
    import linft
    cuda = batch["input_ids"].is_cuda
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")  # each synchronizing call warns once per call site
    try:
        with _phase_probes(cuda) as tiles:
            _sync()
            t_start = time.perf_counter()
            ntk = linft.empirical_ntk(model, batch, output=output, params=params, dtype=torch.float32,
                                      sample_tile=tile)
            _sync()
            wall = time.perf_counter() - t_start
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    say(f"\n== phases of empirical_ntk, N={batch['input_ids'].shape[0]}, sample_tile={tile}: {wall:.3f} s wall, "
        f"timings {ntk.timings}")
    say("host s per phase (time to issue the work; unsynchronized), wall s per tile, GPU s between tile events")
    prev = None
    for i, rec in enumerate(tiles):
        ev = rec.pop("_events", None)
        gpu = ev[0].elapsed_time(ev[1]) / 1e3 if ev is not None else float("nan")
        t_end = rec.pop("t_end")
        gap = "" if prev is None else f" wall-since-last {t_end - prev:.3f}"
        prev = t_end
        say(f"  tile {i}: " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in rec.items()) + f" gpu {gpu:.3f}" + gap)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--t", type=int, default=256)
    ap.add_argument("--tiles", default="16,64", help="comma list of empirical_ntk sample_tile values")
    ap.add_argument("--profile-n", type=int, default=32, help="samples in the profiled call (0: no trace)")
    ap.add_argument("--profile-tile", type=int, default=16, help="sample_tile of the profiled call")
    ap.add_argument("--phases-n", type=int, default=256, help="samples of the per-tile phase breakdown (0: none)")
    ap.add_argument("--phases-tile", type=int, default=64, help="sample_tile of the phase breakdown")
    ap.add_argument("--out", default=None, help="also write the report here")
    ap.add_argument("--quick", action="store_true", help="a tiny model on the CPU (checks the script)")
    args = ap.parse_args(argv)
    import linft

    buf = io.StringIO()

    def say(*a):
        line = " ".join(str(x) for x in a)
        print(line, flush=True)
        buf.write(line + "\n")

    dev = "cpu" if args.quick else "cuda"
    spec = {**harness.LLAMA_1B, "T": args.t, "kernel": "lora", "device": dev}
    if args.quick:
        spec.update(n_embd=128, d_ff=256, n_layer=2, n_head=4, n_kv_head=2, vocab=1000, model_dtype="float32")
    model, names, params = harness.build_model(spec)
    out = linft.outputs.label_word_logits(list(harness.LABEL_IDS))
    batch = harness.make_batch(args.n, args.t, spec["vocab"], device=dev)
    small = harness.make_batch(4, args.t, spec["vocab"], seed=7, device=dev)
    say(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}  torch {torch.__version__}  N={args.n} T={args.t} "
        f"LoRA params {sum(p.numel() for n, p in model.named_parameters() if n in set(names)):,}")

    harness._fwdbwd(model, small, out, names, 32)
    t_fb, _ = _timed(lambda: harness._fwdbwd(model, batch, out, names, 32))
    say(f"fwd+bwd (micro-batch 32): {t_fb:.3f} s")
    harness._fwdbwd(model, batch, out, names, 64)
    t_fb64, _ = _timed(lambda: harness._fwdbwd(model, batch, out, names, 64))
    say(f"fwd+bwd (micro-batch 64): {t_fb64:.3f} s")

    for tile in [int(x) for x in args.tiles.split(",") if x]:
        linft.empirical_ntk(model, small, output=out, params=params, dtype=torch.float32, sample_tile=tile)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t, ntk = _timed(lambda: linft.empirical_ntk(model, batch, output=out, params=params,
                                                    dtype=torch.float32, sample_tile=tile))
        say(f"empirical_ntk sample_tile={tile}: {t:.3f} s = {t / t_fb:.2f} x fwd+bwd; "
            f"peak {torch.cuda.max_memory_allocated() / 2**30 if dev == 'cuda' else 0:.1f} GiB; timings {ntk.timings}; "
            f"methods {sorted({b['method'] for b in ntk.plan.get('blocks', [])})}")
        del ntk

    if args.phases_n:
        pb = harness.make_batch(args.phases_n, args.t, spec["vocab"], seed=5, device=dev)
        phase_breakdown(model, pb, out, params, args.phases_tile, say)
        if args.out:
            Path(args.out).write_text(buf.getvalue())

    if args.profile_n:
        from torch.profiler import ProfilerActivity, profile
        pb = harness.make_batch(args.profile_n, args.t, spec["vocab"], seed=3, device=dev)
        kw = dict(output=out, params=params, dtype=torch.float32, sample_tile=args.profile_tile)
        linft.empirical_ntk(model, pb, **kw)
        t_plain, _ = _timed(lambda: linft.empirical_ntk(model, pb, **kw))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            linft.empirical_ntk(model, pb, **kw)
            _sync()
        ka = prof.key_averages()
        busy = sum(e.self_device_time_total for e in ka  # kernel events only (as the table's footer counts)
                   if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation) / 1e6
        say(f"\n== profile of empirical_ntk on {args.profile_n} samples, sample_tile={args.profile_tile}: "
            f"{t_plain:.3f} s unprofiled, GPU kernels busy {busy:.3f} s (the rest is host time the GPU waited for)")
        say(ka.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
        say("== top CPU time (self)")
        say(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof2:
            harness._fwdbwd(model, pb, out, names, 32)
            _sync()
        say(f"\n== profile of fwd+bwd on {args.profile_n} samples: top CUDA time")
        say(prof2.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
    if args.out:
        Path(args.out).write_text(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
