"""The NTK planner: per block, what to keep (layer factors or per-sample gradients) and how to
contract it, from the cost model of DESIGN.md section 4; then blocks grouped into passes over the data
so that what a pass keeps fits `memory_budget`.

Counts, with N (M) samples on the left (right), C outputs, T (S) tokens per sample at the layer:
  keep factors     N*T*(d_in + C*d_out) values        keep features   N*C*d_in*d_out values
  ghost            (NC)(MC) * T*S * (d_in + d_out) multiply-adds
  materialize      NC*T*d_in*d_out + (NC)(MC)*d_in*d_out multiply-adds (psg_gram tiles, or stored features)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .blocks import Block

STRATEGIES = ("auto", "ghost", "materialize", "generic")


@dataclass
class BlockPlan:
    name: str
    kind: str
    method: str
    keep: str              # factors | features | ids
    bytes: int             # what the block keeps, both datasets
    flops: float           # multiply-adds of its contraction
    reason: str = ""


@dataclass
class Plan:
    blocks: list[BlockPlan]
    passes: list[list[str]]
    memory_budget: int | None
    n_samples: tuple[int, int]
    n_outputs: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"memory_budget": self.memory_budget, "n_samples": list(self.n_samples),
                "n_outputs": self.n_outputs, "passes": self.passes, "notes": self.notes,
                "blocks": [vars(b) for b in self.blocks]}

    def describe(self) -> str:
        lines = [f"NTK plan: N={self.n_samples[0]} M={self.n_samples[1]} C={self.n_outputs}, "
                 f"{len(self.blocks)} blocks in {len(self.passes)} pass(es), budget "
                 f"{_fmt_bytes(self.memory_budget) if self.memory_budget else 'none'}"]
        by_name = {b.name: b for b in self.blocks}
        for i, names in enumerate(self.passes):
            kept = sum(by_name[n].bytes for n in names)
            lines.append(f"  pass {i}: {len(names)} blocks, keeps {_fmt_bytes(kept)}")
            for n in names:
                b = by_name[n]
                lines.append(f"    {n:<60} {b.kind:<9} {b.method:<9} keep {b.keep:<8} "
                             f"{_fmt_bytes(b.bytes):>10} {b.flops:10.3g} MAC {b.reason}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt_bytes(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def linear_costs(NC: int, MC: int, T: int, S: int, d_in: int, d_out: int) -> tuple[float, float]:
    """Multiply-adds of the two exact contractions of a linear block: (ghost, materialize)."""
    ghost = NC * MC * T * S * (d_in + d_out)
    mat = (NC + MC) * max(T, S) * d_in * d_out + NC * MC * d_in * d_out
    return ghost, mat


class BudgetTooSmall(MemoryError):
    """memory_budget cannot hold what the smallest pass must keep."""


def plan_blocks(blocks: list[Block], tokens: dict[str, tuple[int, int]], N: int, M: int, C: int,
                kernel: str, strategy: str, memory_budget: int | None, elem_bytes: int,
                cross: bool, vocab: dict[str, int] | None = None) -> Plan:
    """Choose a method per block and group blocks into passes. `tokens[name]` = (T, S) per sample."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    NC, MC = N * C, M * C
    n_keep = N + (M if cross else 0)
    feat_bytes = 8 if elem_bytes == 8 else 4
    out: list[BlockPlan] = []
    notes: list[str] = []
    for b in blocks:
        T, S = tokens.get(b.name, (1, 1))
        Tm = max(T, S)
        if strategy == "generic" or b.kind == "generic":
            b.method = "generic"
            bp = BlockPlan(b.name, b.kind, "generic", "features", n_keep * C * b.numel * feat_bytes,
                           NC * MC * b.numel, "; ".join(b.notes) or ("forced" if strategy == "generic" else ""))
        elif b.kind in ("bias", "local"):
            b.method = "features"
            bp = BlockPlan(b.name, b.kind, "features", "features", n_keep * C * b.numel * feat_bytes,
                           NC * MC * b.numel, "small per-sample gradient")
        elif b.kind == "embedding":
            b.method = "embedding"
            d = b.param.shape[1]
            bp = BlockPlan(b.name, b.kind, "embedding", "ids", n_keep * Tm * (C * d * elem_bytes + 9),
                           NC * MC * T * S * d, "token-equality contraction")
        else:  # linear weight
            d_in, d_out = b.d_in, b.d_out
            keep_factors = n_keep * Tm * (d_in + C * d_out) * elem_bytes + n_keep * Tm
            keep_features = n_keep * C * d_in * d_out * feat_bytes
            ghost, mat = linear_costs(NC, MC, T, S, d_in, d_out)
            features_fit = keep_features <= keep_factors
            if strategy == "ghost" and kernel == "sgd":
                method, reason = "ghost", "forced"
            elif strategy == "ghost":
                method, reason = "psg", f"forced ghost, but the {kernel} kernel needs per-sample gradients"
            elif strategy == "materialize":
                method, reason = ("features" if features_fit else "psg"), "forced"
            elif kernel == "sgd" and ghost < mat:
                method, reason = "ghost", f"ghost {ghost:.3g} < materialize {mat:.3g} MAC"
            else:
                method = "features" if features_fit else "psg"
                reason = (f"materialize {mat:.3g} <= ghost {ghost:.3g} MAC" if kernel == "sgd"
                          else f"{kernel} needs per-sample gradients")
            b.method = method
            keep = "features" if method == "features" else "factors"
            bp = BlockPlan(b.name, b.kind, method, keep, keep_features if keep == "features" else keep_factors,
                           ghost if method == "ghost" else mat, reason)
        out.append(bp)
    passes = _group(out, memory_budget)
    return Plan(out, passes, memory_budget, (N, M), C, notes)


def _group(plans: list[BlockPlan], budget: int | None) -> list[list[str]]:
    """Greedy grouping in model order: a new pass starts when the next block would exceed the budget."""
    if budget is None:
        return [[p.name for p in plans]]
    biggest = max(plans, key=lambda p: p.bytes)
    if biggest.bytes > budget:
        raise BudgetTooSmall(
            f"memory_budget={budget} bytes cannot hold block {biggest.name!r}, which keeps "
            f"{biggest.bytes} bytes ({biggest.method}); the smallest budget that works is {biggest.bytes} "
            f"bytes ({_fmt_bytes(biggest.bytes)}), or use fewer samples per call")
    passes, cur, used = [], [], 0
    for p in plans:
        if cur and used + p.bytes > budget:
            passes.append(cur)
            cur, used = [], 0
        cur.append(p.name)
        used += p.bytes
    if cur:
        passes.append(cur)
    return passes
