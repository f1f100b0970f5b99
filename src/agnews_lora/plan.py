"""Budget planner: the largest LoRA rank that fits the budget for each common placement and head.

Counts come from `model.budget_breakdown` (exact, on the meta device). For a fixed placement the
trainable count is linear in r, so two counts (r=1, r=2) give the slope and intercept; the
chosen rank is then counted once more to confirm it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from agnews_lora.config import Config
from agnews_lora.model import Breakdown, budget_breakdown

# Placement name -> canonical module names model.py understands.
PLACEMENTS: dict[str, list[str]] = {
    "query+value": ["query", "value"],
    "query+key+value": ["query", "key", "value"],
    "attention (q,k,v,attn_out)": ["attention"],
    "attention+FFN (all)": ["all"],
}
HEADS = ("roberta", "linear")


@dataclass
class PlanRow:
    """One placement x layer set x head, with its largest fitting rank (None: nothing fits)."""

    placement: str
    modules: list[str]
    layers: list[int] | None  # None = all layers
    head: str
    per_rank: int  # trainable parameters added by each unit of r
    head_params: int
    max_r: int | None
    lora: int | None  # at max_r
    total: int | None  # at max_r


def _variant(cfg: Config, modules: list[str], layers: list[int] | None, head: str, r: int) -> Config:
    c = copy.deepcopy(cfg)
    c.lora.target_modules, c.lora.layers, c.model.head, c.lora.r = list(modules), layers, head, r
    return c


def plan_one(cfg: Config, modules: list[str], layers: list[int] | None, head: str) -> tuple[int | None, Breakdown, int]:
    """Largest r whose exact count fits cfg.budget.max_trainable.

    Args:
        cfg: supplies model.name, model.num_labels and budget.max_trainable.
        modules: lora.target_modules of the placement.
        layers: lora.layers (None = all).
        head: model.head.

    Returns:
        (max r or None when even r=1 exceeds the budget, breakdown at max r (at r=1 when None),
        parameters per unit of r).
    """
    one = budget_breakdown(_variant(cfg, modules=modules, layers=layers, head=head, r=1))
    two = budget_breakdown(_variant(cfg, modules=modules, layers=layers, head=head, r=2))
    per_rank = two.total - one.total
    fixed = one.total - per_rank
    r = (cfg.budget.max_trainable - fixed) // per_rank
    if r < 1:
        return None, one, per_rank
    chosen = {1: one, 2: two}.get(r) or budget_breakdown(_variant(cfg, modules=modules, layers=layers,
                                                                   head=head, r=r))
    if chosen.total != fixed + r * per_rank or chosen.total > cfg.budget.max_trainable:
        raise RuntimeError(f"trainable count is not linear in r for {modules} (r={r}: {chosen.total:,}, "
                           f"expected {fixed + r * per_rank:,})")
    return r, chosen, per_rank


def plan_budget(cfg: Config) -> list[PlanRow]:
    """Every common placement on all layers (and on cfg.lora.layers when set), with either head.

    Args:
        cfg: the resolved config (backbone, budget, optional lora.layers).

    Returns:
        One PlanRow per placement x layer set x head.
    """
    layer_sets: list[list[int] | None] = [None]
    if cfg.lora.layers is not None:
        layer_sets.append(sorted(set(cfg.lora.layers)))
    rows = []
    for layers in layer_sets:
        for head in HEADS:
            for name, modules in PLACEMENTS.items():
                r, b, per_rank = plan_one(cfg, modules=modules, layers=layers, head=head)
                rows.append(PlanRow(placement=name, modules=modules, layers=layers, head=head, per_rank=per_rank,
                                    head_params=b.head_total, max_r=r, lora=b.lora if r else None,
                                    total=b.total if r else None))
    return rows


def format_plan(rows: list[PlanRow], cfg: Config) -> str:
    """A plain-text table of the plan."""
    budget = cfg.budget.max_trainable
    lines = [f"{cfg.model.name}: largest LoRA rank within budget.max_trainable={budget:,}",
             f"{'placement':<28} {'layers':<12} {'head':<8} {'max r':>6} {'per r':>8} {'LoRA':>10} "
             f"{'head':>9} {'total':>10} {'left':>8}"]
    for row in rows:
        layers = "all" if row.layers is None else ",".join(map(str, row.layers))
        if row.max_r is None:
            lines.append(f"{row.placement:<28} {layers:<12} {row.head:<8} {'-':>6} {row.per_rank:>8,} {'-':>10} "
                         f"{row.head_params:>9,}   (even r=1 exceeds the budget)")
            continue
        lines.append(f"{row.placement:<28} {layers:<12} {row.head:<8} {row.max_r:>6} {row.per_rank:>8,} "
                     f"{row.lora:>10,} {row.head_params:>9,} {row.total:>10,} {budget - row.total:>8,}")
    return "\n".join(lines)


def plan_to_dicts(rows: list[PlanRow]) -> list[dict]:
    return [asdict(row) for row in rows]
