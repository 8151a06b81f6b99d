"""Which trainable parameter tensors exist and how each one's NTK block is computed.

Every selected parameter becomes exactly one `Block`; a parameter is never skipped. Kinds:

  linear     weight of nn.Linear (peft LoRA A/B are nn.Linear) or transformers Conv1D: per-sample
             gradient g^T x from the layer input x and output gradient g (ghost or materialized)
  bias       bias of such a layer: per-sample gradient sum_t g_t
  embedding  weight of a plain nn.Embedding: sum over equal token ids of g_t . g_s
  local      any other parameter owned by a leaf module called with one tensor (LayerNorm, RMSNorm
             weights and biases, custom elementwise layers): per-sample gradients by torch.func vjp of
             that module alone, from its captured input and output gradient
  generic    everything else (shared/tied parameters, modules with several inputs, parameters used
             outside their module's forward): per-sample Jacobians of the whole output by autograd
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch


@dataclass
class Block:
    name: str
    param: torch.nn.Parameter
    kind: str                      # linear | bias | embedding | local | generic
    module_name: str | None = None
    module: torch.nn.Module | None = None
    transposed: bool = False       # Conv1D stores W as (d_in, d_out)
    method: str | None = None      # set by the planner: ghost | psg | features | embedding | local | generic
    notes: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def d_in(self) -> int:
        w = self.param
        return w.shape[0] if self.transposed else w.shape[1]

    @property
    def d_out(self) -> int:
        w = self.param
        return w.shape[1] if self.transposed else w.shape[0]


def select_parameters(model: torch.nn.Module, params) -> dict[str, torch.nn.Parameter]:
    """'trainable' (requires_grad) or a list of glob patterns over parameter names."""
    named = dict(model.named_parameters())
    if isinstance(params, str) and params == "trainable":
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("params='trainable' but no parameter of the model requires grad; "
                             "pass glob patterns (e.g. params=['*.c_attn.weight']) or unfreeze some")
        return chosen
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns:
        raise ValueError("params is an empty list of patterns")
    chosen, unmatched = {}, []
    for pat in patterns:
        hits = [n for n in named if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            unmatched.append(pat)
        for n in hits:
            chosen[n] = named[n]
    if unmatched:
        raise ValueError(f"params: no parameter name matches {unmatched}; names look like "
                         f"{list(named)[:5]}")
    return dict(sorted(chosen.items(), key=lambda kv: list(named).index(kv[0])))


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _is_plain_embedding(module) -> bool:
    return (isinstance(module, torch.nn.Embedding) and type(module).forward is torch.nn.Embedding.forward
            and module.max_norm is None)


def classify(model: torch.nn.Module, selected: dict[str, torch.nn.Parameter]) -> list[Block]:
    """One Block per selected parameter, in model order."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    modules = dict(model.named_modules())
    blocks = []
    for name, p in selected.items():
        mod_name, _, leaf = name.rpartition(".")
        module = modules.get(mod_name) if mod_name else model
        shared = len(owners.get(id(p), [])) > 1
        block = Block(name, p, "generic", mod_name or None, module)
        if shared:
            block.notes.append("parameter is shared by several modules (tied): generic path")
        elif isinstance(module, torch.nn.Linear) or _is_conv1d(module):
            if leaf == "weight":
                block.kind = "linear"
                block.transposed = _is_conv1d(module)
            elif leaf == "bias":
                block.kind = "bias"
        elif _is_plain_embedding(module) and leaf == "weight":
            block.kind = "embedding"
        elif module is not None and len(list(module.children())) == 0:
            block.kind = "local"
        blocks.append(block)
    return blocks
