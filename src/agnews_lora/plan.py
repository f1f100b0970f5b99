"""Budget planner: the largest LoRA rank that fits the budget for each common placement and head,
and the largest size of every other PEFT method (`plan_methods`).

Counts come from `model.budget_breakdown` (exact, on the meta device). For a fixed placement the
trainable count is linear in r, so two counts (r=1, r=2) give the slope and intercept; the
chosen rank is then counted once more to confirm it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass

from agnews_lora import methods
from agnews_lora.config import Config, class_count
from agnews_lora.model import Breakdown, budget_breakdown
from agnews_lora.registry import METHODS
from agnews_lora.config import ConfigError
from agnews_lora.model import load_backbone_config, position_limit

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
        cfg: supplies model.name, the classes (config.class_count) and budget.max_trainable.
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
    r = min(methods.MAX_SIZE, (cfg.budget.max_trainable - fixed) // per_rank)  # larger ranks are refused
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


# ---------------------------------------------------------------- every PEFT method

SEARCH_CAP = methods.MAX_SIZE  # sizes searched up to this where nothing structural bounds them


@dataclass
class MethodPlanRow:
    """One method x placement x layer set x head, with its largest fitting size.

    `limit` says what stopped the size: "budget"; "positions" (prompt/prefix tuning: the virtual
    tokens and data.max_length fill the backbone's positions); "saturates" (larger sizes add no
    parameters, e.g. LoKr once its factors are stored full); "fixed" (a method without a size
    option: its count is what the placement gives); or why the method cannot run there.
    """

    method: str
    size_key: str | None  # the option that sets the size (None: no size option)
    placement: str | None  # None: the method places nothing on Linear layers
    modules: list[str] | None
    layers: list[int] | None
    head: str
    max_size: int | None  # None: nothing fits (or the method cannot run here)
    limit: str
    adapter: int | None  # trainable parameters besides the head, at max_size
    head_params: int | None
    total: int | None


def size_cap(cfg: Config) -> int:
    """The largest size worth searching: for prompt/prefix tuning what the backbone's positions leave
    beside data.max_length, else SEARCH_CAP."""
    if cfg.peft.method not in methods.PROMPT_LEARNING:
        return SEARCH_CAP
    limit = position_limit(load_backbone_config(cfg.model.name, class_count(cfg) or 2))  # positions only
    return SEARCH_CAP if limit is None else max(0, limit - cfg.data.max_length)


def largest_size(cfg: Config, cap: int | None = None) -> tuple[int | None, Breakdown, str]:
    """Largest size of cfg.peft.method (methods.SIZE_KEYS) whose exact count fits cfg.budget.max_trainable.

    Counts come from `budget_breakdown` at each size tried. Most methods' counts are linear in the
    size: two counts predict the answer, and two more confirm it (it fits, one more does not). Where
    that fails (LoKr stores a factor full once its rank would not save parameters, so its count
    jumps), a galloping then binary search over integer sizes finds a size that fits while the next
    one does not, or the size from which the count no longer grows.

    Args:
        cfg: the config (method, placement, head, budget).
        cap: the largest size to consider (default `size_cap(cfg)`).

    Returns:
        (size or None when even the smallest size exceeds the budget, breakdown at that size (at the
        smallest when None),
        limit: "budget", "positions" or "saturates").
    """
    cap = size_cap(cfg) if cap is None else cap
    budget, seen = cfg.budget.max_trainable, {}

    def count(size: int) -> Breakdown:
        if size not in seen:
            seen[size] = budget_breakdown(methods.with_size(cfg, size))
        return seen[size]

    capped = "positions" if cfg.peft.method in methods.PROMPT_LEARNING else "budget"
    first = methods.SMALLEST_SIZE.get(cfg.peft.method, 1)
    if cap < first or count(first).total > budget:
        return None, count(first), "positions" if cap < first else "budget"
    if cap == first:
        return first, count(first), capped
    slope = count(first + 1).total - count(first).total
    if slope > 0:
        guess = min(cap, first + (budget - count(first).total) // slope)
        if count(guess).total <= budget and (guess == cap or count(guess + 1).total > budget):
            return guess, count(guess), capped if guess == cap else "budget"
    lo, hi = first, 2 * first  # invariant: count(lo) fits
    while hi <= cap and count(hi).total <= budget:
        if count(hi).total == count(lo).total:  # the count stopped growing
            final, lo = count(hi).total, first - 1
            while hi - lo > 1:  # the smallest size with the final count
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if count(mid).total == final else (mid, hi)
            return hi, count(hi), "saturates"
        lo, hi = hi, 2 * hi
    if hi > cap:
        return (cap, count(cap), capped) if count(cap).total <= budget else _bisect(count, lo, cap, budget)
    return _bisect(count, lo, hi, budget)


def _bisect(count, lo: int, hi: int, budget: int) -> tuple[int, Breakdown, str]:
    """count(lo) fits, count(hi) does not: the last fitting size of the boundary between them."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid).total <= budget else (lo, mid)
    return lo, count(lo), "budget"


def method_config(cfg: Config, method: str, modules: list[str] | None, layers: list[int] | None,
                    head: str) -> Config:
    """cfg with another method, placement and head (the config a plan row counts): the keys `method`
    does not read at their defaults,
    those it reads (its own peft.<method> options, lora.alpha, ...) as cfg has them."""
    c, defaults = copy.deepcopy(cfg), Config()
    for f in dataclasses.fields(c.peft):
        if f.name not in ("method", method):
            setattr(c.peft, f.name, copy.deepcopy(getattr(defaults.peft, f.name)))
    for f in dataclasses.fields(c.lora):
        if f.name not in METHODS[method].lora_keys:
            setattr(c.lora, f.name, copy.deepcopy(getattr(defaults.lora, f.name)))
    c.peft.method, c.model.head = method, head
    if method in methods.PLACED:
        c.lora.target_modules, c.lora.layers = list(modules), layers
    return c


def plan_method(cfg: Config, method: str, modules: list[str] | None, layers: list[int] | None,
                head: str, placement: str | None = None) -> MethodPlanRow:
    """The largest size of `method` on one placement with one head (see `largest_size`)."""
    c = method_config(cfg, method, modules=modules, layers=layers, head=head)
    row = dict(method=method, size_key=methods.SIZE_KEYS[method], placement=placement,
               modules=list(modules) if modules is not None else None, layers=layers, head=head)
    try:
        if methods.SIZE_KEYS[method] is None:
            b = budget_breakdown(c)
            fits = b.total <= cfg.budget.max_trainable
            size, limit = (0 if fits else None), "fixed" if fits else "budget"
        else:
            size, b, limit = largest_size(c)
    except ConfigError as err:  # e.g. prefix tuning on a backbone whose attention takes no cache
        return MethodPlanRow(**row, max_size=None, limit=str(err), adapter=None, head_params=None, total=None)
    fits = size is not None
    return MethodPlanRow(**row, max_size=size, limit=limit, adapter=b.total - b.head_total if fits else None,
                         head_params=b.head_total, total=b.total if fits else None)


def plan_methods(cfg: Config, names: list[str] | None = None) -> list[MethodPlanRow]:
    """Every method (or `names`) on every common placement where it has one (all layers, and
    cfg.lora.layers when set), with either head.

    Args:
        cfg: the resolved config (backbone, budget, data.max_length, optional lora.layers).
        names: the methods (default: every entry of the registry).

    Returns:
        One MethodPlanRow per method x placement x layer set x head.
    """
    layer_sets: list[list[int] | None] = [None]
    if cfg.lora.layers is not None:
        layer_sets.append(sorted(set(cfg.lora.layers)))
    rows = []
    for method in names or list(METHODS):
        for head in HEADS:
            if method not in methods.PLACED:
                rows.append(plan_method(cfg, method, modules=None, layers=None, head=head))
                continue
            for layers in layer_sets:
                for name, modules in PLACEMENTS.items():
                    rows.append(plan_method(cfg, method, modules=modules, layers=layers, head=head, placement=name))
    return rows


def format_method_plan(rows: list[MethodPlanRow], cfg: Config) -> str:
    """A plain-text table of the per-method plan."""
    budget = cfg.budget.max_trainable
    lines = [f"{cfg.model.name}: largest size per PEFT method within budget.max_trainable={budget:,}",
             f"{'method':<8} {'size option':<31} {'placement':<27} {'layers':<8} {'head':<8} {'size':>7} "
             f"{'adapter':>9} {'head':>8} {'total':>10} {'left':>8}  limit"]
    for row in rows:
        layers = "-" if row.placement is None else "all" if row.layers is None else ",".join(map(str, row.layers))
        start = (f"{row.method:<8} {row.size_key or '-':<31} {row.placement or '-':<27} {layers:<8} {row.head:<8}")
        if row.total is None:
            why = {"budget": "even the smallest size exceeds the budget",
                   "positions": "data.max_length leaves the backbone no positions for virtual tokens"}.get(row.limit,
                                                                                                      row.limit)
            lines.append(f"{start} {'-':>7} {'-':>9} {row.head_params or 0:>8,} {'-':>10} {'-':>8}  {why}")
            continue
        size = "-" if row.size_key is None else f"{row.max_size:,}"
        lines.append(f"{start} {size:>7} {row.adapter:>9,} {row.head_params:>8,} {row.total:>10,} "
                     f"{budget - row.total:>8,}  {row.limit}")
    return "\n".join(lines)
