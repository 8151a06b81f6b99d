"""Inputs of the NTK engine: a mapping of tensors with a leading batch dimension (tokenizer output), or
an iterable of such mappings, cut into sample tiles."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def _batch_size(batch: Mapping, where: str) -> int:
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes:
        raise ValueError(f"{where}: a batch must hold at least one tensor with a leading batch dimension")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: tensors disagree on the batch dimension: {sizes}")
    return next(iter(sizes.values()))


def as_batches(inputs, where: str = "inputs") -> list[dict]:
    """A list of batches (dicts) from a mapping or an iterable of mappings; validates sizes."""
    if isinstance(inputs, Mapping):
        batches = [dict(inputs)]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, torch.Tensor)):
        batches = [dict(b) for b in inputs]
        for i, b in enumerate(batches):
            if not isinstance(b, Mapping):
                raise TypeError(f"{where}: item {i} is {type(b).__name__}, expected a mapping of tensors")
    else:
        raise TypeError(f"{where} must be a mapping of tensors (tokenizer output) or an iterable of them, "
                        f"got {type(inputs).__name__}")
    batches = [b for b in batches if _batch_size(b, where) > 0]
    if not batches:
        raise ValueError(f"{where} is empty: no samples")
    return batches


def n_samples(batches: list[dict]) -> int:
    return sum(_batch_size(b, "inputs") for b in batches)


def tiles(batches: list[dict], tile: int):
    """Yield (start, batch) with at most `tile` samples each, in order."""
    start = 0
    for b in batches:
        n = _batch_size(b, "inputs")
        for i in range(0, n, tile):
            yield start + i, _rows(b, i, i + tile)
        start += n


def _rows(batch: dict, i: int, j: int) -> dict:
    return {k: (v[i:j] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


def split(batch: dict, start: int, size: int) -> list[tuple[int, dict]]:
    """(start + i, rows i..i+size-1 of batch) for each piece of at most `size` samples, in order."""
    n = _batch_size(batch, "inputs")
    return [(start + i, _rows(batch, i, i + size)) for i in range(0, n, size)]


def take(batches: list[dict], start: int, count: int) -> dict:
    """Samples start..start+count-1 of the batches, which lie in one batch (as every tile's do)."""
    first = 0
    for b in batches:
        n = _batch_size(b, "inputs")
        if start < first + n:
            if start + count > first + n:
                raise ValueError(f"samples {start}..{start + count - 1} span two batches")
            return _rows(b, start - first, start - first + count)
        first += n
    raise IndexError(f"sample {start} is past the {first} samples of the batches")


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def token_mask(batch: dict) -> torch.Tensor | None:
    m = batch.get("attention_mask")
    return None if m is None else (m != 0)


def unpadded_samples(batches: list[dict]) -> torch.Tensor:
    """Host bool (n,): whether each sample has no padding token (all True without attention masks).
    One device-to-host copy per batch, so tiles can be told apart without a GPU synchronization each."""
    flags = []
    for b in batches:
        m = token_mask(b)
        n = _batch_size(b, "inputs")
        flags.append(torch.ones(n, dtype=torch.bool) if m is None else m.reshape(n, -1).all(dim=1).cpu())
    return torch.cat(flags)


def padding_mask(batch: dict, unpadded: torch.Tensor) -> torch.Tensor | None:
    """The batch's token mask for capture, or None when `unpadded` (its samples' host flags, from
    `unpadded_samples`) says no sample is padded: the forms then skip masking, decided on the host."""
    return None if bool(unpadded.all()) else token_mask(batch)
