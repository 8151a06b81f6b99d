"""Capture of per-sample layer factors for one sample tile: forward hooks record each tracked module's
input and output; one `autograd.grad` per model output gives the output gradients of every tracked
module at once (frozen parameters never get gradients). From those, each block's stored form:

  linear     x (B, T', d_in), g (B, C, T', d_out), mask (B, T')      [method ghost / psg]
             or features F (B, C, d_out*d_in)                       [method features]
  bias       features (B, C, d_out)
  embedding  ids (B, T'), g (B, C, T', d), mask (B, T')
  local      features (B, C, P) by torch.func vjp of the module alone
"""
from __future__ import annotations

import torch

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


def capture_tile(model, batch, output, blocks: list[Block], mask: torch.Tensor | None, C_expected=None):
    """Stored forms of `blocks` for one tile. Returns ({block name: dict of tensors}, C)."""
    rec = _Recorder(blocks)
    with rec:
        with torch.enable_grad():
            f = run_output(model, batch, output)
    _check_finite(f, rec)
    B, C = f.shape
    if C_expected is not None and C != C_expected:
        raise ValueError(f"output returned {C} values per sample on one tile and {C_expected} on another")
    names = [n for n in rec.modules if rec.outputs[n]]
    ys = [y for n in names for y in rec.outputs[n]]
    grads = {n: [[] for _ in rec.outputs[n]] for n in names}
    if ys and any(y.requires_grad for y in ys):
        for c in range(C):
            gs = torch.autograd.grad(f[:, c].sum(), ys, retain_graph=c < C - 1, allow_unused=True)
            k = 0
            for n in names:
                for call in range(len(rec.outputs[n])):
                    g = gs[k]
                    grads[n][call].append(torch.zeros_like(ys[k]) if g is None else g.detach())
                    k += 1
    stored = {}
    for b in blocks:
        if b.kind == "generic":
            continue
        calls_x = rec.inputs.get(b.module_name, [])
        calls_g = [torch.stack(gc, dim=1) for gc in grads.get(b.module_name, [])]  # (B, C, ...)
        if not calls_x:
            stored[b.name] = {"empty": True, "B": B}
            continue
        stored[b.name] = _block_form(b, calls_x, calls_g, rec.outputs[b.module_name], mask, B, C)
    return stored, C


def _cat_tokens(tensors, dim):
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def _block_form(b: Block, calls_x, calls_g, calls_y, mask, B, C) -> dict:
    if b.kind in ("linear", "bias"):
        xs, gs, ms = [], [], []
        for x, g in zip(calls_x, calls_g):
            m = _mask_for(x.shape, mask, B)
            x3 = _flat3(x)
            g4 = g.reshape(B, C, x3.shape[1], g.shape[-1])
            if m is None:
                m = torch.ones(B, x3.shape[1], dtype=torch.bool, device=x.device)
            xs.append(x3), gs.append(g4), ms.append(m)
        x, g, m = _cat_tokens(xs, 1), _cat_tokens(gs, 2), _cat_tokens(ms, 1)
        if b.kind == "bias":
            feats = (g * m[:, None, :, None]).sum(dim=2)  # (B, C, d_out)
            return {"features": feats}
        if b.method == "features":
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            gm = (g * m[:, None, :, None]).to(acc)
            F = torch.einsum("bcto,btd->bcod", gm, x.to(acc))
            return {"features": F.reshape(B, C, -1)}
        return {"x": x, "g": g, "mask": m}
    if b.kind == "embedding":
        ids, gs, ms = [], [], []
        for x, g in zip(calls_x, calls_g):
            ids2 = x.reshape(B, -1)
            m = _mask_for((B, ids2.shape[1], 1) if x.dim() == 2 else x.shape, mask, B)
            if m is None:
                m = torch.ones_like(ids2, dtype=torch.bool)
            if b.module.padding_idx is not None:  # that row gets no gradient
                m = m & (ids2 != b.module.padding_idx)
            ids.append(ids2), gs.append(g.reshape(B, C, ids2.shape[1], g.shape[-1])), ms.append(m)
        return {"ids": _cat_tokens(ids, 1), "g": _cat_tokens(gs, 2), "mask": _cat_tokens(ms, 1)}
    if b.kind == "local":
        return {"features": _local_features(b, calls_x, calls_g, B, C)}
    raise AssertionError(b.kind)


def _local_features(b: Block, calls_x, calls_g, B, C) -> torch.Tensor:
    """Per-sample gradients of one leaf module's parameter by torch.func: for each call and output c,
    vjp of module(x_i) with cotangent g_i,c, vmapped over samples."""
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
        per_c = torch.stack([vm(x, g[:, c]).reshape(B, -1) for c in range(C)], dim=1)
        total = per_c if total is None else total + per_c
    return total
