"""Runs that differ only in their seed: which runs form one recipe, and the figures over seeds.

A recipe is a resolved config with its seed and its place left out (`recipe_key`): two finished
runs belong to the same recipe when every other setting agrees, whatever their folders are
called. Over the seeds of a recipe, `spread` gives the mean and standard deviation of a figure;
`crossed_mean` and `paired_over_seeds` give a mean over seeds and test rows with a standard error
that counts both the seed and the rows (docstring of `crossed_mean`).

Pure functions over configs and arrays; the run folders are read by their callers (report.py).
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np

from agnews_lora.config import Config, to_dict
from agnews_lora.runs import NOT_SETTINGS

# Not part of a recipe: where a run lives, its name, and its seed. train.seed also draws the
# validation rows and the training subsample (data.load_splits), so the spread over seeds includes
# which rows a run trained on, not only its initialisation, dropout and batch order.
NOT_RECIPE = (*NOT_SETTINGS, "name", "train.seed")


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def recipe_key(cfg: Config) -> str:
    """The config's settings without NOT_RECIPE, as one canonical string (equal strings: the same
    recipe)."""
    flat = {k: v for k, v in _flat(to_dict(cfg)).items() if k not in NOT_RECIPE}
    return json.dumps(flat, sort_keys=True, default=str)


def group_by_recipe(configs: Sequence[Config]) -> list[list[int]]:
    """Indices of `configs` grouped by recipe, groups in order of first appearance, each group's
    indices ordered by seed (then position).

    Raises:
        ValueError: two runs of one recipe share a seed (the same run twice: nothing to average).
    """
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(recipe_key(cfg), []).append(i)
    out = []
    for members in groups.values():
        members.sort(key=lambda i: (configs[i].train.seed, i))
        seeds = [configs[i].train.seed for i in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"runs {members} have the same settings and seed: pass each run once")
        out.append(members)
    return out


def spread(values: Sequence[float | None]) -> dict:
    """Mean and sample standard deviation (ddof 1; None for fewer than two values) of the values
    that are not None.

    Returns:
        {"mean", "sd", "n"} (mean None when no value).
    """
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {"mean": float(x.mean()) if len(x) else None, "sd": float(x.std(ddof=1)) if len(x) > 1 else None,
            "n": int(len(x))}


def crossed_mean(values: np.ndarray) -> dict:
    """Mean of a seeds x rows table (e.g. correctness of each seed's run on each test row, or the
    difference of two recipes' correctness) with a standard error that accounts for both the seeds
    and the rows.

    The estimator. Model each cell as x[s, i] = mu + a[s] + b[i] + e[s, i]: a seed effect a
    (variance va: how much a whole run moves with its seed), a row effect b (variance vb: how hard
    the row is, or for a difference how much the row favours one recipe), and an interaction e
    (ve), all independent. Seeds and rows are both draws from larger populations (other seeds,
    other test rows), so the grand mean m = mean(x) has
        Var(m) = va / S + vb / n + ve / (S n)        (S seeds, n rows).
    The two-way ANOVA mean squares without replication,
        MS_seed = n * sum_s (m_s - m)^2 / (S - 1)                       E = ve + n va
        MS_row  = S * sum_i (m_i - m)^2 / (n - 1)                       E = ve + S vb
        MS_err  = sum (x - m_s - m_i + m)^2 / ((S - 1)(n - 1))          E = ve
    (m_s, m_i: the seed and row means) give the unbiased estimate
        Var(m) ~ (MS_seed + MS_row - MS_err) / (S n),
    the scalar case of two-way cluster-robust variance (Cameron, Gelbach & Miller 2011: seed
    clusters + row clusters - their intersection). Rarely it is not positive; then the larger of
    MS_seed and MS_row over S n is used (conservative). With one seed, the seed term cannot be
    estimated: the standard error is the rows' alone, sd(x) / sqrt(n), which for a difference is
    the paired standard error of `evaluate.paired_difference`; `seed_se` is then None.

    Args:
        values: [S, n] float array, S >= 1 seeds, n >= 2 rows.

    Returns:
        {"mean", "se", "seed_se" (sqrt(MS_seed / (S n)) = sd of the seed means / sqrt(S): the
        standard error from the seeds alone, None for one seed), "row_se" (sqrt(MS_row / (S n)):
        from the rows alone), "seeds", "rows", "fallback" (True when the conservative form was used)}.

    Raises:
        ValueError: not a 2-D table with at least one seed and two rows.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 2:
        raise ValueError(f"crossed_mean needs a seeds x rows table with >= 2 rows, got shape {x.shape}")
    s, n = x.shape
    m, seed_means, row_means = x.mean(), x.mean(axis=1), x.mean(axis=0)
    ms_row = s * ((row_means - m) ** 2).sum() / (n - 1)
    if s == 1:
        return {"mean": float(m), "se": float(np.sqrt(ms_row / n)), "seed_se": None,
                "row_se": float(np.sqrt(ms_row / n)), "seeds": 1, "rows": n, "fallback": False}
    ms_seed = n * ((seed_means - m) ** 2).sum() / (s - 1)
    resid = x - seed_means[:, None] - row_means[None, :] + m
    ms_err = (resid ** 2).sum() / ((s - 1) * (n - 1))
    var = (ms_seed + ms_row - ms_err) / (s * n)
    fallback = not var > 0
    if fallback:
        var = max(ms_seed, ms_row) / (s * n)
    return {"mean": float(m), "se": float(np.sqrt(var)), "seed_se": float(np.sqrt(ms_seed / (s * n))),
            "row_se": float(np.sqrt(ms_row / (s * n))), "seeds": s, "rows": n, "fallback": bool(fallback)}


def paired_over_seeds(labels: np.ndarray, preds_a: Mapping[int, np.ndarray],
                      preds_b: Mapping[int, np.ndarray]) -> dict | None:
    """Accuracy of recipe A minus recipe B over the seeds both have and the same test rows, paired
    by seed (A's seed-s run against B's seed-s run: the same training rows and batch order) and by
    row, with `crossed_mean`'s standard error of the difference table
    d[s, i] = [A_s right on row i] - [B_s right on row i].

    Args:
        labels: [n] gold labels of the test rows (the same rows for every run).
        preds_a, preds_b: seed -> [n] predicted labels.

    Returns:
        `crossed_mean`'s figures with "difference" (= mean) and "paired_seeds" (the seeds used),
        or None when no seed is shared.
    """
    seeds = sorted(set(preds_a) & set(preds_b))
    if not seeds:
        return None
    y = np.asarray(labels)
    d = np.stack([(np.asarray(preds_a[s]) == y).astype(np.float64) - (np.asarray(preds_b[s]) == y) for s in seeds])
    out = crossed_mean(d)
    return {"difference": out["mean"], **out, "paired_seeds": seeds}
