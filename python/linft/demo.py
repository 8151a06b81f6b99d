"""The main job on the embedded default (interim): the per-layer empirical NTK of a small sequence
model, computed from captured layer factors with `linft_kernels` and checked against torch.func.

Each linear layer's NTK block is the Gram of its per-sample gradients, which `ghost_gram` contracts
from the layer inputs x and output gradients g without forming the gradients; the sum of the blocks is
compared with J J^T from `torch.func.vmap(jacrev)` in float64.
"""
from __future__ import annotations

import time

import torch

import linft_kernels as lk


class TinySeqModel(torch.nn.Module):
    def __init__(self, vocab=50, d=32, hidden=64, classes=3):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.fc1 = torch.nn.Linear(d, hidden)
        self.fc2 = torch.nn.Linear(hidden, d)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, ids, mask):
        h = self.embed(ids)
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)  # (B, C)


def _factor_ntk(model, ids, mask, layers):
    """Per-layer NTK blocks from hooks: one backward per output class."""
    xs, gs = {}, {}
    hooks = []
    for name in layers:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: xs.__setitem__(n, i[0].detach())))
        hooks.append(mod.register_full_backward_hook(
            lambda m, gi, go, n=name: gs.setdefault(n, []).append(go[0].detach())))
    out = model(ids, mask)
    N, C = out.shape
    for c in range(C):
        out[:, c].sum().backward(retain_graph=c < C - 1)
    for h in hooks:
        h.remove()
    K = torch.zeros(N * C, N * C, dtype=torch.float64)
    blocks = {}
    for name in layers:
        x = xs[name]
        if x.dim() == 2:
            x = x.unsqueeze(1)
        ones = torch.ones(*x.shape[:2], 1, dtype=x.dtype)
        # Row i*C + c: sample i, output c (one backward per output c, in order).
        g = torch.stack(gs[name], dim=1)           # (N, C, T, d_out)
        g = g.reshape(N * C, *g.shape[2:]) if g.dim() == 4 else g.reshape(N * C, 1, -1)
        xr = x.repeat_interleave(C, dim=0)
        kw = lk.ghost_gram(xr, g, out=torch.zeros(N * C, N * C, dtype=torch.float64))
        kb = lk.ghost_gram(ones.repeat_interleave(C, dim=0), g, out=torch.zeros_like(kw))
        blocks[name] = kw + kb
        K += blocks[name]
    return K, blocks


def run(samples: int = 16, seed: int = 0) -> int:
    torch.manual_seed(seed)
    model = TinySeqModel().double()
    T = 12
    ids = torch.randint(0, 50, (samples, T))
    lengths = torch.randint(3, T + 1, (samples,))
    mask = (torch.arange(T) < lengths[:, None]).double()
    layers = ["fc1", "fc2", "head"]
    for p in model.parameters():
        p.requires_grad_(False)
    for name in layers:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)

    t0 = time.perf_counter()
    K, blocks = _factor_ntk(model, ids, mask, layers)
    t_factor = time.perf_counter() - t0

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    t0 = time.perf_counter()

    def f(params, i, m):
        return torch.func.functional_call(model, params, (i[None], m[None]))[0]

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0, 0))(params, ids, mask)
    J = torch.cat([j.reshape(samples * j.shape[1], -1) for j in jac.values()], dim=1)
    K_ref = J @ J.T
    t_ref = time.perf_counter() - t0

    rel = ((K - K_ref).norm() / K_ref.norm()).item()
    print(f"linft demo: empirical NTK of a {sum(p.numel() for p in params.values())}-parameter subset "
          f"({', '.join(layers)}), N={samples}, C={K.shape[0] // samples}")
    for name, blk in blocks.items():
        print(f"  block {name:<5} trace {blk.trace().item():12.4f}")
    ev = torch.linalg.eigvalsh(K)
    print(f"  total  trace {K.trace().item():12.4f}  lambda_max {ev[-1].item():.4f}  "
          f"lambda_min {ev[0].item():.3e}")
    print(f"  factored kernels: {t_factor * 1e3:.1f} ms   torch.func vmap(jacrev) + J J^T: {t_ref * 1e3:.1f} ms")
    print(f"  relative error against torch.func: {rel:.2e}")
    ok = rel < 1e-10
    print("  OK" if ok else "  MISMATCH")
    return 0 if ok else 1
