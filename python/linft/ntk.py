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


def fingerprint_tensors(tensors) -> str:
    """A digest of (name, tensor) pairs: names, dtypes, shapes and bytes."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class Checkpoint:
    """The finished blocks of one `empirical_ntk` call, kept in a directory so that a run that stops
    (killed, out of memory, an exception) resumes at the first unfinished block and gives the identical
    matrix: blocks are added to the total in the same order either way.

    Files, each replaced atomically (written under a temporary name, then renamed):
      checkpoint.json         format, the call's fingerprint, finished blocks in order (with the method
                              each was contracted by), and the sequence number of the current state
      state-<seq>.safetensors the running total after those blocks (the previous state is deleted only
                              once the JSON names the new one)
      block-<i>.safetensors   with per_layer=True, the matrix of the i-th finished block
    A directory holding another computation (other inputs, parameters, options or plan) is refused
    rather than overwritten.
    """

    FORMAT = "linft.NTK-checkpoint/1"

    def __init__(self, directory, fingerprint: dict):
        from safetensors.torch import load_file

        self.dir = os.fspath(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.done: list[str] = []
        self.methods: dict[str, list] = {}
        self.seq = 0
        self._state = None
        path = os.path.join(self.dir, "checkpoint.json")
        if os.path.exists(path):
            with open(path) as f:
                side = json.load(f)
            if side.get("format") != self.FORMAT:
                raise ValueError(f"{path} is not a linft NTK checkpoint (format {side.get('format')!r})")
            theirs = side.get("fingerprint", {})
            differ = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
            if differ:
                raise ValueError(f"checkpoint directory {self.dir} holds another computation (it differs in "
                                 f"{differ}); give another directory, or empty this one to start over")
            self.done, self.methods, self.seq = list(side["done"]), dict(side["methods"]), int(side["seq"])
            self._state = load_file(self._state_path(self.seq))

    def _state_path(self, seq: int) -> str:
        return os.path.join(self.dir, f"state-{seq}.safetensors")

    def _block_path(self, i: int) -> str:
        return os.path.join(self.dir, f"block-{i}.safetensors")

    def restore(self, total: torch.Tensor, kept: dict) -> None:
        """Put the saved total into `total` and the saved per-block matrices into `kept`."""
        from safetensors.torch import load_file

        if self._state is None:
            return
        total.copy_(self._state["total"])
        for i, name in enumerate(self.done):
            if os.path.exists(self._block_path(i)):
                kept[name] = load_file(self._block_path(i))["k"].to(total.device)
        self._state = None

    def block_done(self, name: str, total: torch.Tensor, block: torch.Tensor | None, method: str,
                   reason: str) -> None:
        from safetensors.torch import save_file

        i = len(self.done)
        if block is not None:
            save_file({"k": block.contiguous().cpu()}, self._block_path(i) + ".tmp")
            os.replace(self._block_path(i) + ".tmp", self._block_path(i))
        seq = self.seq + 1
        save_file({"total": total.contiguous().cpu()}, self._state_path(seq) + ".tmp")
        os.replace(self._state_path(seq) + ".tmp", self._state_path(seq))
        side = {"format": self.FORMAT, "fingerprint": self.fingerprint, "done": self.done + [name],
                "methods": {**self.methods, name: [method, reason]}, "seq": seq}
        path = os.path.join(self.dir, "checkpoint.json")
        with open(path + ".tmp", "w") as f:
            json.dump(side, f, indent=1)
        os.replace(path + ".tmp", path)
        if os.path.exists(self._state_path(self.seq)):
            os.remove(self._state_path(self.seq))
        self.done.append(name)
        self.methods[name] = [method, reason]
        self.seq = seq
