"""Output presets: callables ``(model, batch) -> Tensor (B,) or (B, C)`` whose Jacobian is the NTK's.

Every preset is per-sample: output row i depends only on sample i of the batch (the NTK engine sums
outputs over the batch before differentiating, which is exact only then). Keys of the batch that the
model does not take (``labels``, ``label``, ``idx``) are dropped before the call.
"""
from __future__ import annotations

import operator
from typing import Callable, Mapping, Sequence

import torch

_NOT_MODEL_INPUTS = ("labels", "label", "idx", "index")


def model_inputs(batch: Mapping) -> dict:
    """The entries of a batch that are passed to the model."""
    return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def _logits(model, batch) -> torch.Tensor:
    out = model(**model_inputs(batch))
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


# Model classes whose forward does not take a per-sample `logits_to_keep` (checked once per class).
_NO_LOGITS_TO_KEEP: set[str] = set()


def _logits_at(model, batch, pos: torch.Tensor) -> torch.Tensor:
    """LM logits at one position per sample, (B, V). Asks the model for those positions only
    (transformers' ``logits_to_keep`` with a (B, 1) index tensor), so the vocabulary projection and
    its backward cost one row per sample instead of T; falls back to full logits for models whose
    forward does not take it. Both give the same numbers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    key = f"{type(model).__name__}/{type(inner).__module__}.{type(inner).__name__}"
    if key not in _NO_LOGITS_TO_KEEP:
        try:
            out = model(**model_inputs(batch), logits_to_keep=pos.unsqueeze(1))
            z = out.logits if hasattr(out, "logits") else out[0]
            if z.dim() == 3 and z.shape[:2] == (pos.shape[0], 1):
                return z[:, 0]
        except TypeError as e:
            if "logits_to_keep" not in str(e):
                raise
        _NO_LOGITS_TO_KEEP.add(key)
    z = _logits(model, batch)  # (B, T, V)
    return z[torch.arange(z.shape[0], device=z.device), pos]


def last_token_index(batch: Mapping) -> torch.Tensor:
    """Index of the last real token of each sample (right or left padding), from attention_mask."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)


class _Columns:
    """Fixed column indices, copied to each device once: indexing a GPU tensor with a host list or
    tensor copies it from pageable memory, which waits for the GPU's queued work (once per call:
    the host then could not queue a tile's backward passes while its forward runs)."""

    def __init__(self, ids, what: str):
        try:  # ints, numpy integers, 0-d integer tensors; not floats or booleans (a mask is not a list)
            ids = list(ids)
            if any(isinstance(i, bool) or getattr(i, "dtype", None) in (torch.bool, bool) for i in ids):
                raise TypeError
            self.ids = torch.as_tensor([operator.index(i) for i in ids], dtype=torch.long)
        except TypeError:
            shown = repr(ids if not isinstance(ids, list) or len(ids) <= 8 else ids[:8] + ["..."])
            raise TypeError(f"{what}: expected a sequence of integer indices, got {shown}") from None
        self._on: dict = {}

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        ids = self._on.get(rows.device)
        if ids is None:
            ids = self._on[rows.device] = self.ids.to(rows.device)
        return rows[:, ids]


def logits(classes: Sequence[int] | None = None) -> Callable:
    """Classification-head logits ``model(**batch).logits`` (B, C), optionally only `classes`."""
    cols = None if classes is None else _Columns(classes, "logits(classes)")

    def output(model, batch):
        z = _logits(model, batch)
        if z.dim() != 2:
            raise ValueError(f"logits(): expected classification logits (B, C), got shape {tuple(z.shape)}; "
                             "for a language model use label_word_logits()")
        return z if cols is None else cols.take(z)

    output.__name__ = "logits"
    return output


def label_word_logits(label_token_ids: Sequence[int], *, position: str = "last",
                      mask_token_id: int | None = None) -> Callable:
    """Language-model logits of the label words at one position per sample: (B, len(label_token_ids)).

    position="last": the last real token (the prompt-based fine-tuning view of Malladi et al.);
    position="mask": the (single) mask token of each sample, for masked language models.
    """
    cols = _Columns(label_token_ids, "label_word_logits")
    if cols.ids.numel() == 0:
        raise ValueError("label_word_logits: label_token_ids is empty")
    if position not in ("last", "mask"):
        raise ValueError(f"label_word_logits: position must be 'last' or 'mask', got {position!r}")
    if position == "mask" and mask_token_id is None:
        raise ValueError("label_word_logits: position='mask' needs mask_token_id")

    def output(model, batch):
        if position == "last":
            pos = last_token_index(batch)
        else:
            is_mask = batch["input_ids"] == mask_token_id
            if not bool(is_mask.any(dim=1).all()):
                raise ValueError("label_word_logits: a sample has no mask token "
                                 f"(mask_token_id={mask_token_id})")
            pos = is_mask.int().argmax(dim=1)
        rows = _logits_at(model, batch, pos)  # (B, V)
        return cols.take(rows)

    output.__name__ = f"label_word_logits[{position}]"
    return output


def sequence_log_likelihood(*, normalize: bool = False) -> Callable:
    """Sum (or mean, with normalize=True) of next-token log-probabilities over real tokens: (B,).
    Targets are ``batch['labels']`` when present (-100 ignored), else the input ids shifted by one."""

    def output(model, batch):
        z = _logits(model, batch)[:, :-1]
        targets = batch.get("labels", batch["input_ids"])[:, 1:]
        valid = targets != -100
        mask = batch.get("attention_mask")
        if mask is not None:
            valid = valid & mask[:, 1:].bool()
        logp = torch.log_softmax(z, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = (logp * valid).sum(dim=1)
        return total / valid.sum(dim=1).clamp(min=1) if normalize else total

    output.__name__ = "sequence_log_likelihood"
    return output
