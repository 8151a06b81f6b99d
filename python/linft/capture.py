"""Capture of per-sample layer factors, one sample tile at a time: forward hooks record each tracked
module's input and output; one `autograd.grad` per model output gives the output gradients of every
tracked module at once (frozen parameters never get gradients). From those, each block's stored form,
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

import torch
from torch.autograd.graph import get_gradient_edge

from .blocks import Block


class NonFiniteError(FloatingPointError):
    """Non-finite values in the model output or in a captured layer quantity."""


class _Recorder:
    def __init__(self, blocks: list[Block]):
        self.modules: dict[str, torch.nn.Module] = {}
        for b in blocks:
            if b.kind in ("linear", "bias", "embedding", "local"):
                self.modules[b.module_name] = b.module
        self.inputs: dict[str, list] = {n: [] for n in self.modules}
        self.outputs: dict[str, list] = {n: [] for n in self.modules}
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
            self.inputs[name].append(args[0].detach())
            self.outputs[name].append(out)
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _NotSingleInput(RuntimeError):
    def __init__(self, module_name):
        super().__init__(module_name)
        self.module_name = module_name


def _check_finite(f: torch.Tensor, rec: _Recorder) -> None:
    if torch.isfinite(f).all():
        return
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
                 store: "Store | None" = None, start: int = 0):
    """Stored forms of `blocks` for one tile, written into `store` at rows start, start+1, ...
    (a new Store of this tile alone when None). Returns (store, C)."""
    # Resident memory peaks in the last tiles: the store is nearly full and a tile's autograd graph is
    # alive beside it. What earlier tiles freed is handed back to the system before the last tile, and
    # each graph in the second half of the store after its backward (each release costs the next tile
    # page faults, so not earlier: there the store is small).
    end = start + _batch_rows(batch)
    on_cpu = _on_cpu(batch)
    late = on_cpu and store is not None and 2 * end > store.n
    if on_cpu and store is not None and end >= store.n:
        release_free_memory()
    if mask is not None and bool(mask.all()):
        mask = None  # nothing padded: the forms below skip their masking (one check per tile)
    rec = _Recorder(blocks)
    with rec:
        with torch.enable_grad():
            f = run_output(model, batch, output)
    _check_finite(f, rec)
    B, C = f.shape
    if C_expected is not None and C != C_expected:
        raise ValueError(f"output returned {C} values per sample on one tile and {C_expected} on another")
    if store is None:
        store, start = Store(B), 0
    names = [n for n in rec.modules if rec.outputs[n]]
    calls = {n: len(rec.outputs[n]) for n in names}
    slots = [(n, call) for n in names for call in range(calls[n])]
    ys = [y for n in names for y in rec.outputs[n]]
    zeros = [(y.shape, y.dtype, y.device) for y in ys]  # the output gradient where y does not reach f
    live = [k for k, y in enumerate(ys) if y.requires_grad]
    edges = [get_gradient_edge(ys[k]) for k in live]
    # From here on only the outputs' places in the graph are needed, not their values: they go before
    # the backward passes, so an output that no backward op saved (a LoRA B output, a projection
    # followed by a residual add) frees its memory for them.
    del ys
    for n in rec.outputs:
        rec.outputs[n].clear()
    # grads[module][call][c]: output gradient of output c, shaped like the module output
    grads = {n: [[None] * C for _ in range(calls[n])] for n in names}
    if edges:
        for c, gs in _output_gradients(f, edges):
            for k, g in zip(live, gs):
                if g is not None:
                    n, call = slots[k]
                    grads[n][call][c] = g.detach()
            del gs
    del f
    for k, (n, call) in enumerate(slots):
        per_out = grads[n][call]
        if any(g is None for g in per_out):
            shape, dtype, device = zeros[k]
            zero = torch.zeros(shape, dtype=dtype, device=device)
            grads[n][call] = [zero if g is None else g for g in per_out]
    if late:
        release_free_memory()
    uses = {}
    for b in blocks:
        if b.kind != "generic":
            uses[b.module_name] = uses.get(b.module_name, 0) + 1
    for b in blocks:
        if b.kind == "generic":
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


def batched_output_gradients() -> bool:
    """LINFT_BATCHED_OUTPUT_GRADS=1: the C backward passes of a tile run as one batched pass
    (autograd's is_grads_batched, vmapped over the outputs' cotangents): the same gradients with about
    half the operator launches of C passes, for launch-bound GPU captures. Off by default until
    measured on a GPU (backward ops without a batching rule fall back to a loop there)."""
    return os.environ.get("LINFT_BATCHED_OUTPUT_GRADS", "0") not in ("", "0")


def _output_gradients(f: torch.Tensor, ys: list):
    """(c, gradients of sum_i f[i, c] with respect to each of ys) for every output c, None where
    a y does not reach f: C backward passes, or one batched pass (`batched_output_gradients`).
    ys: tensors or their gradient edges (`torch.autograd.graph.get_gradient_edge`)."""
    C = f.shape[1]
    if C > 1 and batched_output_gradients():
        cotangents = torch.eye(C, dtype=f.dtype, device=f.device)[:, None, :].expand(C, *f.shape)
        gs = torch.autograd.grad(f, ys, grad_outputs=cotangents, is_grads_batched=True, allow_unused=True)
        for c in range(C):
            yield c, [None if g is None else g[c] for g in gs]
        return
    for c in range(C):
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
    if b.kind in ("linear", "bias"):
        xs, ms, gs = [], [], [[] for _ in range(C)]
        for x, g_call in zip(calls_x, calls_g):
            x3 = _flat3(x)
            xs.append(x3), ms.append(_mask_for(x.shape, mask, B))
            for c in range(C):
                gs[c].append(g_call[c].reshape(B, x3.shape[1], g_call[c].shape[-1]))
        masked = any(mm is not None for mm in ms)  # some token of this block is padding
        per_sample = b.kind == "bias" or b.method == "features"
        x, g, m = _cat_tokens(xs, 1), [_cat_tokens(gc, 1) for gc in gs], None
        if masked or not per_sample:  # the per-sample forms need no mask where nothing is padded
            m = _cat_tokens([torch.ones(B, xx.shape[1], dtype=torch.bool, device=xx.device) if mm is None
                             else mm for xx, mm in zip(xs, ms)], 1)
        if per_sample:
            if masked:  # padding adds nothing: zeroed in the narrower factor (x is shared by the outputs)
                if b.kind == "bias" or x.shape[-1] > C * g[0].shape[-1]:
                    g = [gc * m[:, :, None] for gc in g]
                else:
                    x = x * m[:, :, None]
            if b.kind == "bias":
                return {"features": [gc.sum(dim=1) for gc in g]}  # C x (B, d_out)
            return {"features": [_sample_gradients(gc, x).reshape(B, -1) for gc in g]}
        x, g, m = _compact(x, g, m, compact)
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
    if b.kind == "local":
        return {"features": _local_features(b, calls_x, calls_g, B, C)}
    raise AssertionError(b.kind)


def _local_features(b: Block, calls_x, calls_g, B, C) -> list:
    """Per-sample gradients of one leaf module's parameter by torch.func: for each call and output c,
    vjp of module(x_i) with cotangent g_i,c, vmapped over samples. C x (B, P)."""
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
    total = [None] * C
    for x, g_call in zip(calls_x, calls_g):  # a module called several times: gradients add up
        for c in range(C):
            f = vm(x, g_call[c]).reshape(B, -1)
            total[c] = f if total[c] is None else total[c] + f
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
            cur = {}
            for k, v in form.items():
                per_out = isinstance(v, list)
                ref = v[0] if per_out else v
                shape = (self.n,) + ((len(v),) if per_out else ()) + tuple(ref.shape[1:])
                cur[k] = torch.empty(shape, dtype=ref.dtype, device=ref.device)
                cur[k][:start].zero_()  # earlier tiles where the module did not run
            self.forms[name] = cur
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

    @staticmethod
    def _grow(t: torch.Tensor, axis: int, T_new: int, filled: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[axis] = T_new
        grown = torch.empty(shape, dtype=t.dtype, device=t.device)
        head = grown[:filled]
        head.narrow(axis, 0, t.shape[axis]).copy_(t[:filled])
        head.narrow(axis, t.shape[axis], T_new - t.shape[axis]).zero_()
        return grown
