"""The `NTK` result: total matrix, per-block matrices, metadata, plan and timings; safetensors I/O."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

# Layer index in common transformer parameter names: ...layers.3..., ...h.3..., ...layer.3..., blocks.3
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Transformer layer index of a parameter name, or None for parameters outside the layer stack."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_name(name: str) -> str:
    """The owning module of a parameter: 'h.0.attn.c_attn.weight' -> 'h.0.attn.c_attn'."""
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass
class NTK:
    """Empirical NTK K[(i,a),(j,b)] = <J_a(x_i), J_b(x'_j)>, row index i*C + a.

    matrix: (N*C, M*C) total kernel. blocks: {parameter name: (N*C, M*C)} per-tensor kernels summing to
    `matrix` (empty unless computed with per_layer=True). meta: sample counts, outputs, kernel variant,
    parameter names and sizes, dtype. plan: what the planner chose per block. timings: seconds per stage.
    """

    matrix: torch.Tensor
    blocks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    # ---- shape helpers --------------------------------------------------------------------------
    @property
    def n_outputs(self) -> int:
        return int(self.meta.get("n_outputs", 1))

    @property
    def symmetric(self) -> bool:
        return bool(self.meta.get("symmetric", True))

    @property
    def shape(self):
        return tuple(self.matrix.shape)

    def per_output(self) -> torch.Tensor:
        """The kernel as (N, C, M, C) (sample, output, sample, output)."""
        C = self.n_outputs
        return self.matrix.reshape(self.matrix.shape[0] // C, C, self.matrix.shape[1] // C, C)

    # ---- block sums -----------------------------------------------------------------------------
    def _require_blocks(self):
        if not self.blocks:
            raise ValueError("this NTK has no per-block matrices; compute it with per_layer=True")

    def sum_blocks(self, names) -> torch.Tensor:
        """K_S = sum of the blocks named (or matched by glob patterns) in `names`."""
        import fnmatch
        self._require_blocks()
        names = [names] if isinstance(names, str) else list(names)
        chosen = [b for b in self.blocks if any(fnmatch.fnmatchcase(b, p) for p in names)]
        if not chosen:
            raise KeyError(f"no block matches {names}; blocks are {list(self.blocks)[:8]}...")
        return sum(self.blocks[b] for b in chosen)

    def by_module(self) -> dict[str, torch.Tensor]:
        """Blocks summed per owning module (weight + bias of one layer, LoRA A + B stay separate
        modules: 'lora_A.default' and 'lora_B.default')."""
        self._require_blocks()
        out: dict[str, torch.Tensor] = {}
        for name, k in self.blocks.items():
            key = module_name(name)
            out[key] = out[key] + k if key in out else k.clone()
        return out

    def by_layer(self) -> dict[int | str, torch.Tensor]:
        """Blocks summed per transformer layer index; parameters outside the stack under 'other'."""
        self._require_blocks()
        out: dict[int | str, torch.Tensor] = {}
        for name, k in self.blocks.items():
            idx = layer_index(name)
            key = "other" if idx is None else idx
            out[key] = out[key] + k if key in out else k.clone()
        return out

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write `<path>` (safetensors: matrix and blocks) and `<path>.json` (meta, plan, timings),
        each atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tensors = {"matrix": self.matrix.contiguous().cpu()}
        names = list(self.blocks)
        for i, name in enumerate(names):
            tensors[f"block.{i}"] = self.blocks[name].contiguous().cpu()
        side = {"format": "linft.NTK/1", "blocks": names, "meta": self.meta, "plan": self.plan,
                "timings": self.timings}
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)
        with open(path + ".json.tmp", "w") as f:
            json.dump(side, f, indent=2, default=str)
        os.replace(path + ".json.tmp", path + ".json")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "NTK":
        from safetensors.torch import load_file

        path = os.fspath(path)
        if not os.path.exists(path) or not os.path.exists(path + ".json"):
            raise FileNotFoundError(f"an NTK is saved as {path} and {path}.json; one of them is missing")
        with open(path + ".json") as f:
            side = json.load(f)
        if side.get("format") != "linft.NTK/1":
            raise ValueError(f"{path}.json is not a linft NTK file (format {side.get('format')!r})")
        tensors = load_file(path, device=device)
        blocks = {name: tensors[f"block.{i}"] for i, name in enumerate(side["blocks"])}
        return cls(matrix=tensors["matrix"], blocks=blocks, meta=side["meta"], plan=side["plan"],
                   timings=side["timings"])

    def __repr__(self) -> str:
        return (f"NTK(shape={self.shape}, n_outputs={self.n_outputs}, kernel={self.meta.get('kernel')!r}, "
                f"blocks={len(self.blocks)}, dtype={self.matrix.dtype})")
