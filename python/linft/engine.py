"""`empirical_ntk`: the exact empirical NTK of a model's trainable parameters, block by block.

Flow: select parameters -> classify each into a Block (blocks.py) -> probe one sample for token counts
and output size -> plan methods and passes (planner.py) -> per pass, capture the blocks' factors tile by
tile over the data into one preallocated store per block (capture.py; generic blocks by generic.py) ->
contract each block (contract.py) into its (N*C, M*C) matrix in `dtype`, freeing its store -> sum.
The model is put in eval mode (dropout off, LoRA dropout included) and only the selected parameters
require grad while it runs; both are restored after.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time

import torch

from . import data as _data
from .activations import fused_activations
from .blocks import Block, classify, select_parameters
from .capture import NonFiniteError, Store, capture_tile, check_finite, run_output
from .contract import contract_block
from .generic import generic_features
from .ntk import NTK, Checkpoint, fingerprint_tensors
from .planner import BudgetTooSmall, plan_blocks

KERNELS = ("sgd", "signgd", "asymmetric-signgd")


@contextlib.contextmanager
def _model_state(model: torch.nn.Module, selected: dict):
    """While linft runs the model: eval mode, only the selected parameters requiring grad, and no
    key/value cache (transformers' config.use_cache: the same outputs without building a cache that
    every forward would fill and nothing reads). All restored afterwards, also on error."""
    training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in selected.values()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        if use_cache:
            config.use_cache = False
        yield
    finally:
        model.train(training)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        if use_cache:
            config.use_cache = use_cache


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _probe(model, batch, output, blocks: list[Block]):
    """Up to two samples through the model: output size C and tokens per sample at each tracked
    module. Modules that take several inputs, or whose input or output is not per-sample (broadcast
    over the batch, like GPT-2's position embedding), are moved to the generic path here."""
    modules = {b.module_name: b.module for b in blocks if b.kind != "generic"}
    B = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    shapes: dict[str, list] = {n: [] for n in modules}
    multi: set[str] = set()
    handles = []
    for name, mod in modules.items():
        def hook(m, args, kwargs, out, name=name):
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
                multi.add((name, "is called with several inputs"))
                return
            if args[0].shape[:1] != (B,) or out.shape[:1] != (B,):
                multi.add((name, "is not per-sample (input or output broadcast over the batch)"))
                return
            shapes[name].append(tuple(args[0].shape[1:]))
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            f = run_output(model, batch, output)
    finally:
        for h in handles:
            h.remove()
    for b in blocks:  # a parameter used outside its module's forward (the hook never fired)
        if b.kind != "generic" and not shapes.get(b.module_name) and b.module_name not in {n for n, _ in multi}:
            multi.add((b.module_name, "did not run in the forward pass (its parameter may be used directly)"))
    for name, why in multi:
        for b in blocks:
            if b.module_name == name and b.kind != "generic":
                b.notes.append(f"module {name} {why}: generic path")
                b.kind = "generic"
    tokens = {}
    for b in blocks:
        sh = shapes.get(b.module_name, [])
        if b.kind == "embedding":
            tokens[b.name] = sum(math.prod(s) for s in sh)
        else:
            tokens[b.name] = sum(math.prod(s[:-1]) for s in sh)
    return f.shape[1], tokens


# A GPU's memory is the NTK's alone for the call; a fifth is left to the allocator's fragmentation and
# cuBLAS/cuDNN workspaces. Half (the earlier default) leaves room for only 32-sample tiles beside the
# 26 GB store of the 1.1B Llama LoRA NTK at N=1024 on an H200 (0.83 GB per sample of tile measured
# there), where tile 64 ran 2.2x faster than 16.
GPU_BUDGET_FRACTION = 0.8


def default_memory_budget(device: torch.device) -> int:
    """GPU: GPU_BUDGET_FRACTION of the device memory free now, counting what torch's caching allocator
    holds in wholly unused segments as free (the driver reports it taken, but this process's tensors
    reuse it, and the allocator releases it when it runs short: after a training step or a warm-up
    that can be tens of GB; free pieces of partly used segments, and freed blocks still waiting for
    another stream's work (active, not allocated), are not counted). CPU: half of MemAvailable (the
    host's memory is shared with everything else on it)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        split = stats.get("inactive_split_bytes.all.current", 0)
        active = stats.get("active_bytes.all.current", torch.cuda.memory_allocated(device))
        cached = max(0, torch.cuda.memory_reserved(device) - active - split)
        return int((free + cached) * GPU_BUDGET_FRACTION)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30  # no way to ask: 8 GiB


def empirical_ntk(model: torch.nn.Module, inputs, inputs2=None, *, output, params="trainable",
                  kernel: str = "sgd", per_layer: bool = False, dtype: torch.dtype = torch.float64,
                  memory_budget: int | None = None, strategy: str = "auto", progress: bool = False,
                  sample_tile: int | None = None, backend: str | None = None, verbose: bool = False,
                  checkpoint=None, fuse_activations: bool | None = None) -> NTK:
    """Exact empirical NTK K[(i,a),(j,b)] = <J_a(x_i), J_b(x2_j)> of the selected parameters.

    inputs/inputs2: a mapping of tensors with a leading batch dimension (tokenizer output) or an
        iterable of such mappings; inputs2=None gives the train kernel K(X, X).
    output: callable (model, batch) -> (B,) or (B, C); presets in `linft.outputs`.
    params: "trainable" (parameters with requires_grad) or a list of glob patterns over names.
    kernel: "sgd" (J J^T), "signgd" (sign J sign J^T) or "asymmetric-signgd" (J sign J^T).
    per_layer: keep the per-parameter-tensor blocks in `NTK.blocks` (they sum to `NTK.matrix`).
    dtype: accumulation and result dtype (float64 default, or float32); layers compute in the model's,
        and so do per-sample gradients that are materialized (as its own weight gradients would be:
        an fp32 model's in fp32, a bf16/fp16 model's summed in fp32 and rounded once to its dtype);
        sums over parameters, tokens of the ghost form and samples' products are accumulated in
        `dtype`.
    memory_budget: bytes that captured factors may occupy; blocks are split into passes over the data
        to fit. None: on a GPU 80% of its free memory (with what torch's allocator caches unused), on CPU
        half the available memory, when the call starts (`default_memory_budget`), less what the
        result matrices take.
    strategy: "auto" (cost model), or force "ghost", "materialize" or "generic" for every block.
    sample_tile: samples per forward/backward. None (default): 16 on CPU (larger tiles measured no
        faster per sample there); on a GPU, where a larger tile amortizes the many small launches of
        a forward and C backward passes (a 1.1B model on an H200: tile 64 is 2.2x faster than 16),
        the largest power of two up to 128 whose measured capture memory fits beside what the
        largest pass keeps within memory_budget (`_auto_sample_tile`; it resets the GPU's
        peak-memory statistics once). If the device still runs out of memory on an automatic tile,
        that tile's samples and the later ones are captured in tiles of half the size (the plan's
        notes say so; meta["sample_tile"] is the last one used); an explicit tile raises instead.
    backend: kernel backend for linft_kernels ops.
    checkpoint: a directory where each finished block is saved (atomically); a call that stopped
        resumes there at the first unfinished block and returns the identical matrix. A directory of
        another computation (inputs, parameters, options, plan) is refused.
    fuse_activations: activation and normalization modules written as chains of elementwise ops with a
        fused torch equivalent of the same function run as that fused op while linft runs the model
        (`linft.activations`): transformers' NewGELUActivation as torch's tanh gelu (its backward,
        done once per output, is one multiply instead of ~15 passes), Llama-form RMSNorms (Llama,
        Mistral, Qwen2/3, Phi-3 and ~140 other classes with the same forward) as F.rms_norm (on CUDA
        one kernel each way instead of ~6 forward and ~12 per backward). The same function to rounding
        (16-bit RMSNorm: rounded once instead of twice). None (default): on for "sgd", off for the
        sign kernels (the sign of a gradient entry within rounding of zero follows the rounding, so
        they keep the model's own); False runs every module as written.
    Returns an `NTK` with matrix (N*C, M*C), row index i*C + a.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64 (the accumulator), got {dtype}")
    if not callable(output):
        raise TypeError("output must be a callable (model, batch) -> Tensor (B,) or (B, C); "
                        "see linft.outputs for presets")
    if sample_tile is not None and sample_tile < 1:
        raise ValueError(f"sample_tile must be >= 1 or None, got {sample_tile}")
    if fuse_activations is None:
        fuse_activations = kernel == "sgd"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    batches1 = _data.as_batches(inputs, "inputs")
    batches2 = None if inputs2 is None else _data.as_batches(inputs2, "inputs2")
    N = _data.n_samples(batches1)
    M = N if batches2 is None else _data.n_samples(batches2)
    selected = select_parameters(model, params)
    blocks = classify(model, selected)
    device = _model_device(model)
    elem_bytes = next(iter(selected.values())).element_size()

    with _model_state(model, selected), fused_activations(model, fuse_activations) as n_fused:
        first = next(_data.tiles(batches1, 2))[1]
        C, tokens1 = _probe(model, _data.to_device(first, device), output, blocks)
        tokens2 = tokens1
        if batches2 is not None:
            _, tokens2 = _probe(model, _data.to_device(next(_data.tiles(batches2, 2))[1], device), output, blocks)
        # Tokens per sample at each module, as the probe saw them (batches are padded to one length).
        tokens = {b.name: (max(1, tokens1.get(b.name, 1)), max(1, tokens2.get(b.name, 1))) for b in blocks}
        if memory_budget is None:  # what the result matrices take is not the captured factors'
            n_results = 1 + (len(blocks) if per_layer else 0)
            result = N * C * M * C * torch.finfo(dtype).bits // 8 * n_results
            available = default_memory_budget(device)
            if result >= available:
                raise BudgetTooSmall(
                    f"the result matrices ({n_results} of {N * C} x {M * C} in "
                    f"{dtype}: {result} bytes) take all of the default memory budget ({available} bytes); "
                    "use per_layer=False, dtype=torch.float32 or fewer samples, or pass memory_budget= "
                    "(the bytes the captured factors may take)")
            budget = available - result
        else:
            budget = int(memory_budget)
        plan = plan_blocks(blocks, tokens, N, M, C, kernel, strategy, budget, elem_bytes,
                           cross=batches2 is not None)
        if n_fused:
            plan.notes.append(f"{n_fused} activation and RMSNorm modules run as their fused torch equivalent "
                              "(fuse_activations; linft.activations)")
        if memory_budget is None:
            share = "80% of the free GPU memory" if device.type == "cuda" else "half the available memory"
            plan.notes.append(f"memory_budget not given: using {share} less the result matrices "
                              f"({budget} bytes)")
        requested_tile = sample_tile
        if sample_tile is None:
            sample_tile = _auto_sample_tile(model, _data.to_device(first, device), output, blocks, plan,
                                            C, N, budget, device)
        if verbose:
            print(plan.describe())
        timings["plan"] = time.perf_counter() - t_start

        total = torch.zeros(N * C, M * C, dtype=dtype, device=device)
        kept: dict[str, torch.Tensor] = {}
        by_name = {b.name: b for b in blocks}
        plans = {bp.name: bp for bp in plan.blocks}
        ckpt = None
        if checkpoint is not None:
            ckpt = Checkpoint(checkpoint, _fingerprint(model, batches1, batches2, plan, N, M, C, kernel, dtype,
                                                       per_layer, strategy, requested_tile, backend, output,
                                                       fuse_activations))
            ckpt.restore(total, kept)
            for name, (method, reason) in ckpt.methods.items():
                plans[name].method, plans[name].reason = method, reason
            if ckpt.done:
                plan.notes.append(f"resumed from checkpoint {ckpt.dir}: {len(ckpt.done)} blocks already done")
        n_pass = N + (0 if batches2 is None else M)  # samples captured per pass
        bar = _progress(progress, len(plan.passes) * n_pass, "NTK")
        timings["capture"] = timings["contract"] = timings["generic"] = 0.0
        peak = 0
        for names in plan.passes:
            group = [by_name[n] for n in names if ckpt is None or n not in ckpt.methods]
            if not group:
                if bar is not None:
                    bar.update(n_pass)
                continue
            factored = [b for b in group if b.method != "generic"]
            generic = [b for b in group if b.method == "generic"]
            stores = []
            for batches in ([batches1] if batches2 is None else [batches1, batches2]):
                t0 = time.perf_counter()
                store = Store(_data.n_samples(batches))
                if factored:
                    sample_tile = _capture_pass(model, batches, output, factored, C, store, sample_tile, device,
                                                requested_tile is None, plan.notes, bar)
                elif bar is not None:
                    bar.update(_data.n_samples(batches))
                timings["capture"] += _elapsed(t0, device)
                if generic:
                    t0 = time.perf_counter()
                    feats = generic_features(model, _data.tiles(batches, sample_tile), output, generic, C,
                                             dtype, device, _data.to_device)
                    store.forms.update({name: {"features": f} for name, f in feats.items()})
                    feats = None
                    timings["generic"] += _elapsed(t0, device)
                stores.append(store)
            peak = max(peak, sum(s.nbytes() for s in stores))
            t0 = time.perf_counter()
            for b in group:
                # each block's factors are freed as soon as it is contracted
                s1 = stores[0].forms.pop(b.name, {})
                s2 = None if batches2 is None else stores[1].forms.pop(b.name, {})
                if per_layer:
                    k = torch.zeros_like(total)
                    used = contract_block(b, s1, s2, kernel, k, C, backend, auto=strategy == "auto")
                    kept[b.name] = k
                    total += k
                else:
                    used = contract_block(b, s1, s2, kernel, total, C, backend, auto=strategy == "auto")
                s1 = s2 = None
                if used != b.method:
                    _note_method(plans[b.name], used)
                if ckpt is not None:
                    ckpt.block_done(b.name, total, kept.get(b.name), plans[b.name].method, plans[b.name].reason)
            timings["contract"] += _elapsed(t0, device)
            # Drop every reference to this pass's factors before the next pass captures its own,
            # or two passes' worth would be alive at once (loop variables outlive the loop body).
            stores = store = None
        if bar is not None:
            bar.close()
    timings["total"] = time.perf_counter() - t_start
    meta = {
        "n_samples": N, "n_samples2": M, "n_outputs": C, "kernel": kernel,
        "symmetric": batches2 is None and kernel != "asymmetric-signgd",
        "cross": batches2 is not None, "dtype": str(dtype).replace("torch.", ""),
        "model_dtype": str(next(iter(selected.values())).dtype).replace("torch.", ""),
        "params": {n: p.numel() for n, p in selected.items()},
        "n_params": sum(p.numel() for p in selected.values()),
        "output": getattr(output, "__name__", type(output).__name__),
        "peak_kept_bytes": peak,
        "sample_tile": sample_tile,
    }
    return NTK(matrix=total, blocks=kept, meta=meta, plan=plan.as_dict(), timings=timings)


def _defer_checks(device: torch.device) -> bool:
    """Whether the model outputs' finiteness is checked once after all tiles of a pass instead of in
    each tile: on a GPU, where a check waits for the tile's queued work, so the host could not issue
    the next work while the GPU runs (on CPU a check costs nothing and fails early)."""
    return device.type == "cuda"


class _FiniteFlags:
    """Finiteness flags of a pass's tiles, given by capture_tile as device tensors, each with the
    samples (start, count) of its tile. Each is copied to host memory without waiting (CUDA: pinned
    memory, an event recorded after the copy), so the tiles already done on the GPU can be checked
    while later ones run, and the check of them all at the end waits only once."""

    def __init__(self):
        self._host: list = []  # (host copy, event or None, samples) per flag
        self._read = 0  # flags before this one were read and finite

    def append(self, flag: torch.Tensor, samples: tuple[int, int]) -> None:
        if flag.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._host.append((host, event, samples))
        else:
            self._host.append((flag, None, samples))

    def first_bad(self, wait: bool) -> tuple[int, int] | None:
        """The samples (start, count) of the first tile whose output was non-finite among those whose
        flag is on the host (all of them with wait=True), else None. Flags read once are not read again."""
        while self._read < len(self._host):
            host, event, samples = self._host[self._read]
            if event is not None and not event.query():
                if not wait:
                    return None
                event.synchronize()
            if not bool(host):
                return samples
            self._read += 1
        return None


def _capture_pass(model, batches, output, blocks, C: int, store, sample_tile: int, device, shrink: bool,
                  notes: list, bar) -> int:
    """Every tile of one dataset captured into `store`. Returns the sample tile in use at the end: with
    `shrink` (an automatic tile) a tile the device runs out of memory on is captured again in halves,
    and so are the tiles after it (noted in `notes`). On CUDA the tiles' finiteness is read without
    waiting for the GPU (`_FiniteFlags`); a non-finite output raises NonFiniteError naming its samples."""
    unpadded = _data.unpadded_samples(batches)
    flags = _FiniteFlags() if _defer_checks(device) else None
    for start, tile in _capture_tiles(batches, sample_tile, store.n, device):
        todo = [(start, tile)]  # a tile, or its pieces once the tile was made smaller
        while todo:
            s0, piece = todo.pop(0)
            B = _data.n_samples([piece])
            if B > sample_tile:
                todo[:0] = _data.split(piece, s0, sample_tile)
                continue
            on_device = _data.to_device(piece, device)
            mask = _data.padding_mask(on_device, unpadded[s0:s0 + B])
            # a tile's flag counts once the tile is captured: a failed attempt's would name its samples
            # (and re-run the tile that ran out of memory) though their retry was finite
            given = [] if flags is not None else None
            finite = None if given is None else given.append
            if not _capture_or_shrink(model, on_device, output, blocks, mask, C, store, s0, finite, shrink):
                # half the tile from here on; this piece in halves (it may be a short last tile)
                sample_tile = max(1, sample_tile // 2)
                notes.append(f"sample_tile={sample_tile}: the device ran out of memory on a tile of {B} "
                             f"samples (from sample {s0}); those and the later samples were captured in "
                             "smaller tiles")
                todo[:0] = _data.split(piece, s0, min(sample_tile, (B + 1) // 2))
                continue
            for flag in given or ():
                flags.append(flag, (s0, B))
            if bar is not None:
                bar.update(B)
        if flags is not None and flags.first_bad(wait=False) is not None:
            break
    bad = None if flags is None else flags.first_bad(wait=True)
    if bad is not None:
        _raise_non_finite(model, batches, output, blocks, device, *bad)
    return sample_tile


# Allocation failures outside torch's caching allocator (a cuBLAS handle or workspace made in the
# autograd thread, a native kernel's scratch) come as plain RuntimeErrors carrying these.
_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether e is the device running out of memory. The messages count only while the device is
    healthy: cuBLAS also reports ALLOC_FAILED on a context that an earlier error (an illegal memory
    access, a device-side assert) broke, and that error must surface, not a retry."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return any(m in str(e) for m in _OOM_MESSAGES) and _device_healthy()


def _device_healthy() -> bool:
    """False when synchronizing the current CUDA device raises (a sticky error); True without CUDA."""
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        return False
    return True


def _capture_or_shrink(model, tile, output, blocks, mask, C, store, start, finite, shrink: bool) -> bool:
    """capture_tile, or False instead of the device's out-of-memory error when `shrink` (the tile was
    chosen automatically) and the tile has more than one sample: the caller then captures its samples
    again in smaller tiles (what the failed attempt stored for them is overwritten; in-pass forms of
    a retried tile start over, as they do for every tile)."""
    try:
        capture_tile(model, tile, output, blocks, mask, C, store, start, finite=finite)
        return True
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if not (shrink and _out_of_memory(e)) or _data.n_samples([tile]) < 2:
            raise
    # here the error and its frames, which held the failed tile's autograd graph, are gone
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return False


def _raise_non_finite(model, batches, output, blocks, device, start: int, count: int) -> None:
    """The tile of samples start..start+count-1 (its output was non-finite) run again to name the module
    (NonFiniteError)."""
    tile = _data.to_device(_data.take(batches, start, count), device)
    where = f"samples {start}..{start + count - 1}"
    with torch.no_grad():
        f = run_output(model, tile, output)
    try:
        check_finite(f, model, tile, output, blocks)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e} ({where})") from None
    raise NonFiniteError(f"non-finite model output in {where}, finite when they were run again")


def _elapsed(t0: float, device: torch.device) -> float:
    """Seconds since t0 with the device's queued work done (on a GPU the phases' timings would
    otherwise count work a phase queued in the next one's)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


AUTO_TILE_CPU = 16  # CPU: tiles of 8 and 32 measured no faster per sample (bench/README.md)
# GPU: the largest tile measured (H200, 1.1B Llama + LoRA, N=1024: 64 is 2.2x faster than 16; 128's
# capture 3.5% faster than 64's, 5.58 vs 5.78 s, at 76 vs 51 GiB peak); the memory budget picks a
# smaller tile where 128 does not fit (on that H200 it still picked 64: bench/README.md)
AUTO_TILE_MAX = 128


def _auto_sample_tile(model, probe, output, blocks, plan, C: int, N: int, budget: int,
                      device: torch.device) -> int:
    """sample_tile=None. CPU: AUTO_TILE_CPU. GPU: one capture of the probe samples measures the
    memory a tile takes per sample (its autograd graph, output gradients and stored forms, at the
    allocator's peak); the tile is the largest power of two up to AUTO_TILE_MAX (and N) whose
    capture, with a margin of 1.5x, fits in `budget` beside what the largest pass keeps. The choice
    is written into the plan's notes. The measurement resets the device's peak-memory statistics
    (torch.cuda.reset_peak_memory_stats) once, before the capture work of the call. The generic path
    runs one sample at a time whatever the tile, so only the factored capture is measured."""
    if device.type != "cuda":
        return max(1, min(AUTO_TILE_CPU, N))
    factored = [b for b in blocks if b.method != "generic"]
    B = _data.n_samples([probe])
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    if factored:
        mask = _data.padding_mask(probe, _data.unpadded_samples([probe]))
        capture_tile(model, probe, output, factored, mask, C)
    torch.cuda.synchronize(device)
    per_sample = max(1, torch.cuda.max_memory_allocated(device) - base) / B
    kept_bytes = {bp.name: bp.bytes for bp in plan.blocks}
    kept = max((sum(kept_bytes[n] for n in names) for names in plan.passes), default=0)
    tile = tile_for_room(budget - kept, per_sample, min(AUTO_TILE_MAX, N))
    plan.notes.append(f"sample_tile={tile} (auto: capture measured at {per_sample / 2**20:.1f} MiB per "
                      f"sample, {max(0, budget - kept) / 2**30:.2f} GiB of the budget left beside the "
                      f"largest pass)")
    return tile


def tile_for_room(room: float, per_sample: float, cap: int) -> int:
    """Largest power of two <= cap with 1.5 * tile * per_sample <= room; at least 1."""
    tile = 1
    while tile * 2 <= cap and 1.5 * tile * 2 * per_sample <= room:
        tile *= 2
    return tile


def _capture_tiles(batches, sample_tile: int, n: int, device: torch.device):
    """The sample tiles of one store. On CPU those past its first half are split in two: resident
    memory peaks there (a nearly full store beside a tile's autograd graph), a smaller graph lowers
    that peak, and a tile of half the samples costs about the same per sample. On a GPU a smaller tile
    costs more per sample (fwd+bwd over 1024 samples of a 1.1B model on an H200: 18% slower in
    micro-batches of 32 than of 64), so tiles stay whole there."""
    for start, tile in _data.tiles(batches, sample_tile):
        B = _data.n_samples([tile])
        if device.type != "cpu" or 2 * (start + B) <= n or B < 2:
            yield start, tile
            continue
        h = (B + 1) // 2
        yield from _data.split(tile, start, h)


def _fingerprint(model, batches1, batches2, plan, N, M, C, kernel, dtype, per_layer, strategy, sample_tile,
                 backend, output, fuse_activations) -> dict:
    """What a checkpoint must match to be resumed: the data, every parameter and buffer of the model
    (frozen ones shape the kernel too), and the options and plan that fix the order of the sums."""
    def data(batches):
        return None if batches is None else fingerprint_tensors(
            (f"{i}.{k}", v) for i, b in enumerate(batches) for k, v in sorted(b.items()) if isinstance(v, torch.Tensor))
    return {
        "inputs": data(batches1), "inputs2": data(batches2),
        "model": fingerprint_tensors(list(model.named_parameters()) + list(model.named_buffers())),
        "shape": [N, M, C], "kernel": kernel, "dtype": str(dtype), "per_layer": per_layer,
        "strategy": strategy, "sample_tile": sample_tile, "backend": backend, "fuse_activations": fuse_activations,
        "output": getattr(output, "__name__", type(output).__name__), "passes": plan.passes,
        "planned": {bp.name: bp.method for bp in plan.blocks},
    }


def _note_method(bp, used: str) -> None:
    """Record in the plan that a block was contracted by another method than planned."""
    bp.reason = (f"{bp.reason}; contracted by {used} instead of {bp.method}: the cost model at the "
                 f"token counts that carry gradient favours it")
    bp.method = used


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="sample")
