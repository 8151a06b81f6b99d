"""Capture of per-sample layer factors, one sample tile at a time: forward hooks record each tracked
module's input and output; one `autograd.grad` per model output gives the output gradients of every
tracked module at once (frozen parameters never get gradients). A module whose input is another
tracked module's output (a LoRA B module) is handled during those backward passes instead: a hook
turns its output gradient into its per-sample features as it is produced, so neither its output nor
its gradients are kept (`_Recorder`, `_InPassForms`). From the gradients, each block's stored form,
written into a `Store` that holds the block for all samples:

  linear     x (N, T', d_in), g (N, C, T', d_out), mask (N, T')      [method ghost / psg]
             or features F (N, C, d_out*d_in)                       [method features]
  bias       features (N, C, d_out)
  embedding  ids (N, T'), g (N, C, T', d), mask (N, T')
  local      features (N, C, P) by torch.func vjp of the module alone

T' counts only tokens whose output gradient is nonzero for some output (see `_compact`).
"""
from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import torch
from torch.autograd.graph import get_gradient_edge

from .blocks import Block


class NonFiniteError(FloatingPointError):
    """Non-finite values in the model output or in a captured layer quantity."""


class _Output(NamedTuple):
    """What capture keeps of a recorded module output once the forward is done, not its values: the
    autograd edge whose gradient is the one at the value the module returned (None where it does not
    require gradient), `view` = (size, stride, offset) when that edge is the output's base's (the
    output's gradient is then `take`n out of it), and its shape, dtype and device at return."""
    edge: object
    view: tuple | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def zeros(self) -> torch.Tensor:
        """The output's gradient where the output does not reach the model output."""
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    def take(self, g: torch.Tensor) -> torch.Tensor:
        """The output's gradient from the gradient at `edge`."""
        if self.view is None:
            return g
        size, stride, offset = self.view
        g = g.contiguous()  # laid out as the base (contiguous); g may itself start inside a storage
        return g.as_strided(size, stride, g.storage_offset() + offset)

    @staticmethod
    def at_return(out: torch.Tensor, x: torch.Tensor) -> "_Output":
        """The edge of the value `out` (the output of a module called on x) holds now, when the module
        returns, such that later in-place ops do not change it. A view's is its base's (a contiguous
        base made by the module, as a Linear's 3-d output is a view of its 2-d product): an in-place op
        on a view re-routes the later uses of it through the base's node and around the view's own,
        while the base's original node gets every use, before and after. Otherwise the output's own:
        an in-place op on a non-view takes that node as its input, so it too gets every use."""
        if not out.requires_grad:
            return _Output(None, None, out.shape, out.dtype, out.device)
        base = out._base
        if (base is not None and base.requires_grad and base.is_contiguous() and base is not x
                and base is not x._base):
            view = (tuple(out.size()), tuple(out.stride()), out.storage_offset() - base.storage_offset())
            return _Output(get_gradient_edge(base), view, out.shape, out.dtype, out.device)
        return _Output(get_gradient_edge(out), None, out.shape, out.dtype, out.device)


class _Recorder:
    """Forward hooks on the modules of `blocks`: per call, the module's input (detached) and its output
    as an `_Output` (taken when the module returns; the tensor itself is not kept, so an output that no
    backward op saves is freed as soon as the forward has used it). keep_values: the outputs
    themselves are kept instead (and no call is in-pass).

    In-pass calls: a call of a module in `eligible` whose input is the output of a recorded call that
    is not in-pass (a LoRA B module's input is its A module's output). `_InPassForms` gets its output
    gradient during the backward passes, on the way to the feeding output's, which the passes ask for."""

    def __init__(self, blocks: list[Block], eligible: set = frozenset(), keep_values: bool = False):
        self.modules: dict[str, torch.nn.Module] = {}
        for b in blocks:
            if b.kind in ("linear", "bias", "embedding", "local"):
                self.modules[b.module_name] = b.module
        self.keep_values = keep_values
        self.eligible = set() if keep_values else set(eligible)
        self.inputs: dict[str, list] = {n: [] for n in self.modules}
        self.outputs: dict[str, list] = {n: [] for n in self.modules}
        self.in_pass_calls: dict[str, list] = {n: [] for n in self.modules}  # per call: in-pass or not
        self._made: dict[int, tuple] = {}  # id -> (weak reference to a recorded output, in-pass)
        self.handles = []

    def __enter__(self):
        for name, mod in self.modules.items():
            self.handles.append(mod.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def _hook(self, name):
        def hook(mod, args, kwargs, out):
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
                raise _NotSingleInput(name)
            if args[0].shape[0] != out.shape[0]:
                raise _NotSingleInput(name)
            x = args[0]
            made = self._made.get(id(x))
            fed = made is not None and made[0]() is x and not made[1] and x.requires_grad
            in_pass = fed and name in self.eligible and out.requires_grad
            self._made[id(out)] = (weakref.ref(out), in_pass)
            self.inputs[name].append(x.detach())
            self.in_pass_calls[name].append(in_pass)
            self.outputs[name].append(out if self.keep_values else _Output.at_return(out, x))
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._made.clear()


class _NotSingleInput(RuntimeError):
    def __init__(self, module_name):
        super().__init__(module_name)
        self.module_name = module_name


def check_finite(f: torch.Tensor, model, batch, output, blocks: list[Block]) -> None:
    """Raise NonFiniteError if f has a non-finite value, naming the first recorded module whose output
    has one (found by running the tile's forward again, keeping the outputs: the model is in eval mode,
    so it gives the same values)."""
    if torch.isfinite(f).all():
        return
    rec = _Recorder(blocks, keep_values=True)
    with rec, torch.no_grad():
        run_output(model, batch, output)
    for name, outs in rec.outputs.items():
        for y in outs:
            if not torch.isfinite(y).all():
                raise NonFiniteError(f"non-finite model output; first non-finite activation is the output "
                                     f"of module {name!r}")
    raise NonFiniteError("non-finite model output (no tracked layer produced non-finite values)")


def run_output(model, batch, output) -> torch.Tensor:
    f = output(model, batch)
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"output must return a tensor (B,) or (B, C), got {type(f).__name__}")
    if f.dim() == 1:
        f = f.unsqueeze(1)
    if f.dim() != 2:
        raise ValueError(f"output must return a tensor of shape (B,) or (B, C), got {tuple(f.shape)}")
    return f


def _flat3(x: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, T', d) with all middle dimensions as tokens; (B, d) -> (B, 1, d)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _mask_for(x_shape, mask: torch.Tensor | None, B: int):
    """Token mask (B, T') for a module input of shape (B, ..., d) when its tokens are the sequence."""
    if mask is None or len(x_shape) != 3 or x_shape[1] != mask.shape[1]:
        return None
    return mask


def capture_tile(model, batch, output, blocks: list[Block], mask: torch.Tensor | None, C_expected=None,
                 store: "Store | None" = None, start: int = 0, finite=None):
    """Stored forms of `blocks` for one tile, written into `store` at rows start, start+1, ...
    (a new Store of this tile alone when None). Returns (store, C). mask: the tile's token mask, None
    where no token of the tile is padding (the forms then skip masking). finite: None checks the
    model output here (NonFiniteError); else it is called with the check's device flag (a 0-d bool
    tensor), which the caller reads later."""
    # Resident memory peaks in the last tiles: the store is nearly full and a tile's autograd graph is
    # alive beside it. What earlier tiles freed is handed back to the system before the last tile, and
    # each graph in the second half of the store after its backward (each release costs the next tile
    # page faults, so not earlier: there the store is small).
    end = start + _batch_rows(batch)
    on_cpu = _on_cpu(batch)
    late = on_cpu and store is not None and 2 * end > store.n
    if on_cpu and store is not None and end >= store.n:
        release_free_memory()
    eligible = set() if batched_output_gradients() else (
        _per_output_modules(blocks) - (store.not_in_pass if store is not None else set()))
    rec = _Recorder(blocks, eligible)
    with rec:
        with torch.enable_grad():
            f = run_output(model, batch, output)
    if finite is None:
        check_finite(f, model, batch, output, blocks)
    B, C = f.shape
    if C_expected is not None and C != C_expected:
        raise ValueError(f"output returned {C} values per sample on one tile and {C_expected} on another")
    if store is None:
        store, start = Store(B), 0
    names = [n for n in rec.modules if rec.outputs[n]]
    # Modules whose every call is in-pass: their forms are computed during the backward passes.
    in_pass = {n for n in names if all(rec.in_pass_calls[n])}
    # A module's in-pass calls are trusted once their edges were seen on f's graph (a module whose
    # output nothing reads is not); one that is not has its output gradients asked for directly from
    # then on (this tile again).
    unseen = {o.edge.node: n for n in names if n not in store.verified
              for o, early in zip(rec.outputs[n], rec.in_pass_calls[n]) if early}
    bad = _off_graph(f, unseen) if unseen else set()
    store.verified |= set(unseen.values()) - bad
    if bad:
        store.not_in_pass |= bad
        del f, rec
        return capture_tile(model, batch, output, blocks, mask, C_expected, store, start, finite)
    if finite is not None:  # the caller checks once for all tiles (a check here waits for the GPU)
        finite(torch.isfinite(f).all())
    calls = {n: len(rec.outputs[n]) for n in names}
    slots = [(n, call) for n in names for call in range(calls[n])]
    outs = [o for n in names for o in rec.outputs[n]]
    live = [k for k, o in enumerate(outs) if o.edge is not None and slots[k][0] not in in_pass]
    edges = [outs[k].edge for k in live]
    hooks = _InPassForms(blocks, in_pass, rec, mask, B, C, store, start)
    # grads[module][call][c]: output gradient of output c, shaped like the module output
    grads = {n: [[None] * C for _ in range(calls[n])] for n in names if n not in in_pass}
    try:
        for c, gs in (_output_gradients(f, edges, hooks.set_output) if edges else ()):
            for k, g in zip(live, gs):
                if g is not None:
                    n, call = slots[k]
                    grads[n][call][c] = outs[k].take(g.detach())
            del gs
    finally:
        hooks.remove()
    del f
    hooks.finish()
    for k, (n, call) in enumerate(slots):
        if n in in_pass:
            continue
        per_out = grads[n][call]
        if any(g is None for g in per_out):
            zero = outs[k].zeros()
            grads[n][call] = [zero if g is None else g for g in per_out]
    # the edges keep graph nodes that no pass ran alive (with what they saved): dropped before the forms
    del outs, edges
    rec.outputs.clear()
    if late:
        release_free_memory()
    uses = {}
    for b in blocks:
        if b.kind != "generic":
            uses[b.module_name] = uses.get(b.module_name, 0) + 1
    for b in blocks:
        if b.kind == "generic" or b.module_name in in_pass:
            continue
        calls_x = rec.inputs.get(b.module_name, [])
        calls_g = grads.get(b.module_name, [])
        form = _block_form(b, calls_x, calls_g, mask, B, C, store.compacts(b.name)) if calls_x else None
        if form is not None and "mask" in form:  # tokens per sample before and after _compact
            width = 1 if b.kind == "embedding" else calls_x[0].shape[-1]
            store.note_tokens(b.name, sum(x.numel() // (B * width) for x in calls_x), form["mask"].shape[1])
        store.put(b.name, start, B, form)
        del form
        uses[b.module_name] -= 1
        if not uses[b.module_name]:  # this tile's tensors of the module go as soon as they are stored
            rec.inputs.pop(b.module_name, None)
            grads.pop(b.module_name, None)
    return store, C


def _per_output_modules(blocks: list[Block]) -> set:
    """Modules all of whose blocks are per-sample features of a linear map (weight or bias): the
    candidates for in-pass capture. (Local blocks, computed by torch.func, are not run inside a
    backward pass.)"""
    kinds: dict[str, bool] = {}
    for b in blocks:
        if b.kind != "generic":
            kinds[b.module_name] = kinds.get(b.module_name, True) and _per_output(b) and b.kind != "local"
    return {n for n, ok in kinds.items() if ok}


def _off_graph(f: torch.Tensor, wanted: dict) -> set:
    """The values of `wanted` (autograd node -> module name) whose node the graph of f does not reach."""
    left = dict(wanted)
    stack = [f.grad_fn] if f.grad_fn is not None else []
    seen = set()
    while stack and left:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        left.pop(node, None)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return set(left.values())


class _InPassForms:
    """The per-output forms of in-pass modules (see `_Recorder`), computed by pre-hooks on their
    outputs' autograd nodes while each backward pass runs, from the output gradient as it is produced:
    autograd frees that gradient as it goes on, instead of it being kept until all C passes are done
    (the B outputs' gradients of a 1.1B Llama with LoRA on every projection are ~200 MB per sample and
    output). A module called several times adds its calls' features up."""

    def __init__(self, blocks, in_pass: set, rec: _Recorder, mask, B, C, store, start):
        assert not (in_pass and batched_output_gradients()), "in-pass forms need one pass per output"
        self.blocks = {n: [b for b in blocks if b.module_name == n] for n in in_pass}
        self.rec, self.mask, self.B, self.C, self.store, self.start = rec, mask, B, C, store, start
        self.done = {n: set() for n in in_pass}  # outputs c whose forms a call has stored
        self.c = None
        self.handles = []
        for n in in_pass:
            for call, o in enumerate(rec.outputs[n]):
                self.handles.append(o.edge.node.register_prehook(self._hook(n, call, o)))

    def set_output(self, c: int) -> None:
        """The backward pass about to run is output c's."""
        self.c = c

    def _hook(self, name: str, call: int, o: _Output):
        def hook(grad_outputs):
            g = grad_outputs[o.edge.output_nr]
            if g is not None and self.c is not None:
                self._store(name, call, self.c, o.take(g.detach()))
        return hook

    def _store(self, name: str, call: int, c: int, g: torch.Tensor) -> None:
        x = self.rec.inputs[name][call]
        for b in self.blocks[name]:
            form = _output_form(b, [x], [g], self.mask, self.B)
            self.store.put_output(b.name, self.start, self.B, c, self.C, form, add=c in self.done[name])
        self.done[name].add(c)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def finish(self) -> None:
        """Outputs that a module's output does not reach (no call's hook ran): zero features."""
        for name, done in self.done.items():
            for c in range(self.C):
                if c not in done:
                    self._store(name, 0, c, self.rec.outputs[name][0].zeros())


def batched_output_gradients() -> bool:
    """LINFT_BATCHED_OUTPUT_GRADS=1: the C backward passes of a tile run as one batched pass
    (autograd's is_grads_batched, vmapped over the outputs' cotangents): the same gradients with about
    half the operator launches of C passes, for launch-bound GPU captures. Off by default until
    measured on a GPU (backward ops without a batching rule fall back to a loop there)."""
    return os.environ.get("LINFT_BATCHED_OUTPUT_GRADS", "0") not in ("", "0")


def _output_gradients(f: torch.Tensor, ys: list, starting=None):
    """(c, gradients of sum_i f[i, c] with respect to each of ys) for every output c, None where
    a y does not reach f: C backward passes, or one batched pass (`batched_output_gradients`).
    ys: tensors or their gradient edges (`torch.autograd.graph.get_gradient_edge`). starting(c), when
    given, is called before the pass of output c (not used with a batched pass)."""
    C = f.shape[1]
    if C > 1 and batched_output_gradients():
        cotangents = torch.eye(C, dtype=f.dtype, device=f.device)[:, None, :].expand(C, *f.shape)
        gs = torch.autograd.grad(f, ys, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True)
        for c in range(C):
            yield c, [None if g is None else g[c] for g in gs]
        return
    for c in range(C):
        if starting is not None:
            starting(c)
        yield c, torch.autograd.grad(f[:, c].sum(), ys, retain_graph=c < C - 1, allow_unused=True)


def _on_cpu(batch) -> bool:
    """Whether the tile's tensors live in host memory (the heap release below concerns only those)."""
    return all(v.device.type == "cpu" for v in batch.values() if isinstance(v, torch.Tensor))


def _batch_rows(batch) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


_LIBC = None


def release_free_memory() -> None:
    """Return the process heap's free memory to the system (glibc malloc_trim; elsewhere nothing).
    Tensors below glibc's mmap threshold (up to 32 MiB) live in the heap, and the heap keeps what they
    freed (a tile's autograd graph, its output gradients): without this, that memory stays resident
    beside the store as it fills up, and through the contraction."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _cat_tokens(tensors, dim):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _first_sample_full(gs: list, m: torch.Tensor) -> bool:
    """Whether the first sample has every token carrying gradient: then the tokens kept per sample
    (their largest count) are all T and nothing can be compacted. One sample's pass over g instead of
    the tile's: most blocks get gradient at every token, and the test runs on each block's first tile."""
    if m.shape[0] == 0 or not bool(m[0].all()):
        return False
    live = gs[0][0].any(dim=-1)
    for g in gs[1:]:
        live |= g[0].any(dim=-1)
    return bool(live.all())


def _compact(tok: torch.Tensor, gs: list, m: torch.Tensor, check: bool = True):
    """Keep only the tokens that carry gradient. A token whose output gradient is exactly zero for every
    output (a position the outputs do not depend on, e.g. every position but the last in the last
    layer's MLP when the outputs are read at the last token) adds nothing to g^T x: it is dropped, and
    the tokens left are moved to the front of each sample. Returns (tok, gs, mask) with T' >= 1 tokens,
    T' the largest count of kept tokens in a sample. check=False skips the test (one pass over g)
    and keeps every token: exact too, only not compacted."""
    if not check or _first_sample_full(gs, m):
        return tok, gs, m
    live = m & gs[0].any(dim=-1)
    for g in gs[1:]:
        live |= m & g.any(dim=-1)
    T = live.shape[1]
    Tp = max(1, int(live.sum(dim=1).max())) if live.numel() else 1
    if Tp >= T:
        return tok, gs, live
    order = torch.sort(live.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :Tp]

    def take(t):
        if t.dim() == 2:
            return t.gather(1, order)
        return t.gather(1, order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    return take(tok), [take(g) for g in gs], take(live)


def _sample_gradients(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients F_i = g_i^T x_i (B, d_out, d_in) in the factors' dtype, as the
    model's own weight gradients are: summed over tokens in fp32 (fp64 for fp64 models) and, for
    16-bit models, rounded once to 16 bits (half the store of fp32 F, and their Gram runs on 16-bit
    matrix units). The sum is asked for in fp32 explicitly: a 16-bit GEMM may reduce in 16 bits
    (torch's allow_fp16_reduced_precision_reduction; seen on an H200: fp16 entries off by 2 ulps)."""
    gt = g.transpose(1, 2)
    if x.dtype not in (torch.float16, torch.bfloat16):
        return torch.bmm(gt, x)
    if x.is_cuda:
        try:
            return torch.bmm(gt, x, out_dtype=torch.float32).to(x.dtype)
        except (TypeError, RuntimeError):  # a torch without bmm's out_dtype
            pass
    return torch.bmm(gt.float(), x.float()).to(x.dtype)


def _block_form(b: Block, calls_x, calls_g, mask, B, C, compact: bool = True) -> dict:
    """One block's stored form for one tile. calls_g[call][c] is the output gradient of output c at that
    call. Entries given as a list hold one tensor per output (stored at dim 1 of the store). compact:
    drop the tokens without gradient (`_compact`)."""
    if _per_output(b):
        return {"features": [_output_form(b, calls_x, [g_call[c] for g_call in calls_g], mask, B)
                             for c in range(C)]}
    if b.kind == "linear":
        xs, ms, gs = [], [], [[] for _ in range(C)]
        for x, g_call in zip(calls_x, calls_g):
            x3 = _flat3(x)
            xs.append(x3), ms.append(_mask_for(x.shape, mask, B))
            for c in range(C):
                gs[c].append(g_call[c].reshape(B, x3.shape[1], g_call[c].shape[-1]))
        x, g, m = _compact(_cat_tokens(xs, 1), [_cat_tokens(gc, 1) for gc in gs], _calls_mask(xs, ms), compact)
        return {"x": x, "g": g, "mask": m}
    if b.kind == "embedding":
        ids, ms, gs = [], [], [[] for _ in range(C)]
        for x, g_call in zip(calls_x, calls_g):
            ids2 = x.reshape(B, -1)
            m = _mask_for((B, ids2.shape[1], 1) if x.dim() == 2 else x.shape, mask, B)
            if m is None:
                m = torch.ones_like(ids2, dtype=torch.bool)
            if b.module.padding_idx is not None:  # that row gets no gradient
                m = m & (ids2 != b.module.padding_idx)
            ids.append(ids2), ms.append(m)
            for c in range(C):
                gs[c].append(g_call[c].reshape(B, ids2.shape[1], g_call[c].shape[-1]))
        tok, g, m = _compact(_cat_tokens(ids, 1), [_cat_tokens(gc, 1) for gc in gs], _cat_tokens(ms, 1),
                             compact)
        return {"ids": tok, "g": g, "mask": m}
    raise AssertionError(b.kind)


def _calls_mask(xs: list, ms: list) -> torch.Tensor:
    """The token mask (B, T') of a module's calls joined along tokens: each call's mask, all True for
    a call without one (xs: the calls' inputs as (B, T, d))."""
    return _cat_tokens([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if m is None else m
                        for x, m in zip(xs, ms)], 1)


def _per_output(b: Block) -> bool:
    """Whether the block is stored as per-sample features, which each output gives on its own
    (`_output_form`)."""
    return b.kind in ("bias", "local") or (b.kind == "linear" and b.method == "features")


def _output_form(b: Block, calls_x, calls_g, mask, B) -> torch.Tensor:
    """One output's per-sample features (B, P) of a bias, local or features-method linear block, from
    the module's inputs and that output's gradients, one per call (a module called several times adds
    up over its calls)."""
    if b.kind == "local":
        return _local_features(b, calls_x, calls_g, B)
    xs, gs, ms = [], [], []
    for x, g in zip(calls_x, calls_g):
        x3 = _flat3(x)
        xs.append(x3), ms.append(_mask_for(x.shape, mask, B))
        gs.append(g.reshape(B, x3.shape[1], g.shape[-1]))
    x, g = _cat_tokens(xs, 1), _cat_tokens(gs, 1)
    if any(mm is not None for mm in ms):  # padding adds nothing: zeroed in the narrower factor
        m = _calls_mask(xs, ms)[:, :, None]
        if b.kind == "bias" or x.shape[-1] > g.shape[-1]:
            g = g * m
        else:
            x = x * m
    if b.kind == "bias":
        return g.sum(dim=1)  # (B, d_out)
    return _sample_gradients(g, x).reshape(B, -1)


def _local_features(b: Block, calls_x, calls_g, B) -> torch.Tensor:
    """Per-sample gradients (B, P) of one leaf module's parameter by torch.func for one output: for each
    call, vjp of module(x_i) with that call's output gradient g_i, vmapped over samples."""
    leaf = b.name.rsplit(".", 1)[-1]
    module = b.module
    params = {leaf: b.param.detach()}
    buffers = {k: v for k, v in module.named_buffers(recurse=False)}

    def per_sample(x_i, g_i):
        def fwd(p):
            return torch.func.functional_call(module, {**p, **buffers}, (x_i.unsqueeze(0),)).squeeze(0)
        _, vjp_fn = torch.func.vjp(fwd, params)
        return vjp_fn(g_i)[0][leaf]

    vm = torch.func.vmap(per_sample, in_dims=(0, 0))
    total = None
    for x, g in zip(calls_x, calls_g):  # a module called several times: gradients add up
        f = vm(x, g).reshape(B, -1)
        total = f if total is None else total + f
    return total


# Axis of the token dimension in each stored entry (per output for entries kept per output).
_TOKEN_AXIS = {"x": 1, "ids": 1, "mask": 1, "g": 1}


class Store:
    """The stored forms of some blocks over all `n` samples of one dataset, written tile by tile into
    tensors allocated once per block: no per-tile pieces are kept, joined or copied a second time
    (a join would briefly hold two copies, and the freed pieces stay in the process heap).

    forms[name] holds the entries of `_block_form`, those given per output stacked at dim 1:
    x (n, T, d_in), g (n, C, T, d_out), mask (n, T), ids (n, T), features (n, C, P). A block's token
    length is its first tile's; a later tile with more tokens grows it (earlier rows are padded with
    mask False and zeros), one with fewer is padded. Rows of tiles where the block's module did not run
    are zero (no gradient); a block whose module never ran has no entry.
    """

    def __init__(self, n: int):
        self.n = n
        self.forms: dict[str, dict] = {}
        self._compacts: dict[str, bool] = {}
        # in-pass capture (`_Recorder`): modules whose in-pass calls were seen on the graph, and
        # modules whose output gradients are asked for directly instead
        self.verified: set[str] = set()
        self.not_in_pass: set[str] = set()

    def compacts(self, name: str) -> bool:
        """Whether to look for tokens without gradient in this block's next tile: yes until its first
        tile is stored, then only if that tile had at most half of its tokens carrying gradient (the
        test is a pass over g; where nearly all tokens carry gradient it would only cost time)."""
        return self._compacts.get(name, True)

    def note_tokens(self, name: str, before: int, kept: int) -> None:
        """A tile of the block had `before` tokens per sample, of which `kept` were stored."""
        if name not in self._compacts:
            self._compacts[name] = 2 * kept <= before

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for form in self.forms.values() for t in form.values())

    def put(self, name: str, start: int, B: int, form: dict | None) -> None:
        cur = self.forms.get(name)
        if form is None:
            if cur is not None:
                for t in cur.values():
                    t[start:start + B].zero_()
            return
        if cur is None:
            cur = self.forms[name] = {}
        for k, v in form.items():  # all of them on the block's first tile (some after a failed allocation)
            if k not in cur:
                per_out = isinstance(v, list)
                self._allocate(name, k, start, v[0] if per_out else v, len(v) if per_out else None)
        for k, v in form.items():
            axis = _TOKEN_AXIS.get(k)
            per_out = isinstance(v, list)
            if axis is not None:
                T_new = (v[0] if per_out else v).shape[axis]
                T_cur = cur[k].shape[axis + (1 if per_out else 0)]
                if T_new > T_cur:
                    cur[k] = self._grow(cur[k], axis + (1 if per_out else 0), T_new, start)
            rows = cur[k][start:start + B]
            for c, src in (enumerate(v) if per_out else [(None, v)]):
                dst = rows if c is None else rows[:, c]
                if axis is None:
                    dst.copy_(src)
                    continue
                T_src = src.shape[axis]
                dst.narrow(axis, 0, T_src).copy_(src)
                if dst.shape[axis] > T_src:
                    dst.narrow(axis, T_src, dst.shape[axis] - T_src).zero_()

    def put_output(self, name: str, start: int, B: int, c: int, C: int, features: torch.Tensor,
                   add: bool = False) -> None:
        """Output c's per-sample features (B, P) of a block for the tile at rows start..start+B-1 (its
        entry "features" is (n, C, P)); add: added to what is there (another call of the module)."""
        cur = self.forms.setdefault(name, {})
        if "features" not in cur:
            self._allocate(name, "features", start, features, C)
        rows = cur["features"][start:start + B, c]
        rows.add_(features) if add else rows.copy_(features)

    def _allocate(self, name: str, key: str, start: int, ref: torch.Tensor, per_out: int | None) -> None:
        """The entry `key` of a block for all n samples, shaped like `ref` past its first dimension (with
        a dimension of per_out outputs after the samples' when given); rows of earlier tiles, where the
        module did not run, are zero."""
        shape = (self.n,) + ((per_out,) if per_out is not None else ()) + tuple(ref.shape[1:])
        t = self.forms[name][key] = torch.empty(shape, dtype=ref.dtype, device=ref.device)
        t[:start].zero_()

    @staticmethod
    def _grow(t: torch.Tensor, axis: int, T_new: int, filled: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[axis] = T_new
        grown = torch.empty(shape, dtype=t.dtype, device=t.device)
        head = grown[:filled]
        head.narrow(axis, 0, t.shape[axis]).copy_(t[:filled])
        head.narrow(axis, t.shape[axis], T_new - t.shape[axis]).zero_()
        return grown
