"""The generic path: per-sample Jacobians of the whole output with respect to parameters that no
factored form covers (tied weights, parameters of modules with several inputs, parameters used
outside their module's forward). One sample at a time, one backward per output: slow but exact for
any architecture, so no trainable parameter is ever skipped."""
from __future__ import annotations

import torch

from .blocks import Block
from .capture import check_finite, run_output


def generic_features(model, sample_tiles, output, blocks: list[Block], C: int, acc: torch.dtype,
                     device, to_device) -> dict[str, torch.Tensor]:
    """{block name: (N, C, P_block)} per-sample gradients."""
    params = [b.param for b in blocks]
    rows: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    for _, batch in sample_tiles:
        batch = to_device(batch, device)
        B = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        for i in range(B):
            one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}
            with torch.enable_grad():
                f = run_output(model, one, output)
            check_finite(f, model, one, output, [])
            per_c = []
            for c in range(C):
                gs = torch.autograd.grad(f[0, c], params, retain_graph=c < C - 1, allow_unused=True)
                per_c.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
            for k, b in enumerate(blocks):
                rows[b.name].append(torch.stack([per_c[c][k].reshape(-1).to(acc) for c in range(C)]))
    return {name: torch.stack(r) for name, r in rows.items()}
