"""Seeds: study.with_seeds / seed_runs (one row over N seeds, each its own run folder) and the
estimators of agnews_lora.seeds, checked against independent computations (a Monte Carlo of the
random-effects model the standard error assumes, the sums-of-squares identity, and the rows-only
paired standard error of evaluate.paired_difference)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import make_shapes_model

from agnews_lora import runs, seeds, study
from agnews_lora.config import load_config
from agnews_lora.errors import ConfigError
from agnews_lora.evaluate import paired_difference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_shapes_model(tmp_path_factory.mktemp("shapes"))


def row(name: str, model_dir: Path, out: Path, *extra: str) -> study.Row:
    return study.Row(name, (f"model.name={model_dir}", "model.num_labels=4", "lora.r=4", f"name={name}", f"out_dir={out / name}",
                            "train.max_steps=10", "data.val_size=40", *extra))


def test_with_seeds_repeats_each_row_in_its_own_folder(model_dir, tmp_path):
    rows = [row("a", model_dir, tmp_path), row("teacher", model_dir, tmp_path),
            study.Row("c", unsupported="no key/value cache")]
    assert study.with_seeds(rows, 1) == rows  # one seed: the rows as they are
    expanded = study.with_seeds(rows, 3, keep=["teacher"])
    assert [r.name for r in expanded] == ["a", "a.seed43", "a.seed44", "teacher", "c"]
    assert expanded[0] is rows[0]  # the row's own seed keeps its folder: a study run once keeps its runs
    planned = study.plan(expanded)
    cfgs = [p.cfg for p in planned[:3]]
    assert [c.train.seed for c in cfgs] == [42, 43, 44]
    assert [Path(c.out_dir).name for c in cfgs] == ["a", "a.seed43", "a.seed44"]
    assert [c.name for c in cfgs] == ["a", "a.seed43", "a.seed44"]
    assert [p.trainable for p in planned[:3]] == [planned[0].trainable] * 3  # same recipe, same count
    assert len({seeds.recipe_key(c) for c in cfgs}) == 1  # they differ only in seed, name and folder
    assert cfgs[0].train.max_steps == cfgs[2].train.max_steps == 10 and cfgs[2].data.val_size == 40
    named = study.with_seeds(rows[:1], 2, first=7)
    assert [r.name for r in named] == ["a.seed7", "a.seed8"]  # neither is the row's own seed
    with pytest.raises(ConfigError, match="--seeds 0"):
        study.with_seeds(rows, 0)


def _finish(cfg, folder: Path) -> None:
    folder.mkdir(parents=True)
    runs.write_marker(folder, "run")
    runs.write_config(cfg, folder)
    (folder / runs.SUMMARY).write_text("{}")


def test_seed_runs_finds_the_rows_finished_seeds_by_config(model_dir, tmp_path):
    expanded = study.with_seeds([row("a", model_dir, tmp_path)], 3)
    for r in expanded[:2]:
        cfg = study.resolve(r)
        _finish(cfg, Path(cfg.out_dir))
    odd = study.resolve(study.Row("x", (*expanded[2].overrides, "lora.r=8")))  # a.seed44 with another rank
    _finish(odd, Path(odd.out_dir))
    (tmp_path / "a.seed45").mkdir()  # not finished
    assert study.seed_runs(tmp_path / "a") == [tmp_path / "a", tmp_path / "a.seed43"]
    assert study.seed_runs(tmp_path / "b") == []


def test_group_by_recipe_decides_from_the_configs(model_dir):
    base = [f"model.name={model_dir}", "model.num_labels=4", "lora.r=4"]
    cfgs = [load_config(overrides=[*base, "train.seed=43", "name=x", "out_dir=/tmp/anything"]),
            load_config(overrides=[*base, "lora.r=8", "train.seed=42"]),
            load_config(overrides=[*base, "train.seed=42", "name=y", "out_dir=/tmp/else"]),
            load_config(overrides=[*base, "lora.r=8", "train.seed=44", "train.lr=1e-3"])]
    assert seeds.group_by_recipe(cfgs) == [[2, 0], [1], [3]]  # ordered by seed within a recipe
    with pytest.raises(ValueError, match="same settings and seed"):
        seeds.group_by_recipe([cfgs[0], cfgs[0]])


def test_spread_is_the_mean_and_sample_sd():
    got = seeds.spread([0.91, None, 0.93, 0.90])
    assert got["mean"] == pytest.approx(statistics.mean([0.91, 0.93, 0.90]))
    assert got["sd"] == pytest.approx(statistics.stdev([0.91, 0.93, 0.90])) and got["n"] == 3
    assert seeds.spread([0.5]) == {"mean": 0.5, "sd": None, "n": 1}


def _anova_by_sums_of_squares(x: np.ndarray) -> float:
    """Var(grand mean) from the classical decomposition SS_total = SS_seed + SS_row + SS_err,
    with SS_err taken as the remainder (not from double-centred residuals as the library does)."""
    s, n = x.shape
    m = x.mean()
    ss_total = ((x - m) ** 2).sum()
    ss_seed = n * sum((x[k].mean() - m) ** 2 for k in range(s))
    ss_row = s * sum((x[:, i].mean() - m) ** 2 for i in range(n))
    ss_err = ss_total - ss_seed - ss_row
    return (ss_seed / (s - 1) + ss_row / (n - 1) - ss_err / ((s - 1) * (n - 1))) / (s * n)


def test_crossed_mean_equals_the_sums_of_squares_form_and_its_special_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 300)) + rng.normal(size=(5, 1)) * 0.3 + rng.normal(size=(1, 300))
    got = seeds.crossed_mean(x)
    assert got["mean"] == pytest.approx(x.mean()) and not got["fallback"]
    assert got["se"] ** 2 == pytest.approx(_anova_by_sums_of_squares(x), rel=1e-9)
    # only a seed effect (every row alike within a seed): the SE of the mean of the seed means
    seed_only = np.repeat(np.array([[0.90], [0.92], [0.89], [0.93]]), 50, axis=1)
    assert seeds.crossed_mean(seed_only)["se"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.89, 0.93]) / 2)
    # one seed: the rows-only paired SE of evaluate.paired_difference
    y = rng.integers(0, 4, 400)
    a, b = np.where(rng.random(400) < 0.9, y, (y + 1) % 4), np.where(rng.random(400) < 0.88, y, (y + 2) % 4)
    one = seeds.paired_over_seeds(y, {42: a}, {42: b})
    ref = paired_difference(y, a, b)
    assert one["difference"] == pytest.approx(ref["difference"]) and one["se"] == pytest.approx(ref["se"])
    assert one["seed_se"] is None and one["paired_seeds"] == [42]
    assert seeds.paired_over_seeds(y, {42: a}, {43: b}) is None  # no seed in common
    with pytest.raises(ValueError, match=">= 2 rows"):
        seeds.crossed_mean(np.zeros((3, 1)))


def test_crossed_mean_is_unbiased_under_the_model_it_assumes():
    """Monte Carlo: draw seeds x rows tables from x = a_s + b_i + e_si with known variances; the
    mean estimated variance and the variance of the grand mean across draws both match
    va / S + vb / n + ve / (S n)."""
    rng = np.random.default_rng(1)
    s, n, va, vb, ve, draws = 4, 60, 0.02, 0.5, 0.3, 4000
    x = (rng.normal(0, va ** 0.5, (draws, s, 1)) + rng.normal(0, vb ** 0.5, (draws, 1, n))
         + rng.normal(0, ve ** 0.5, (draws, s, n)))
    true = va / s + vb / n + ve / (s * n)
    estimates = np.array([seeds.crossed_mean(t)["se"] ** 2 for t in x])
    assert estimates.mean() == pytest.approx(true, rel=0.05)
    assert x.mean(axis=(1, 2)).var() == pytest.approx(true, rel=0.08)
    # the rows-only SE misses the seed term: it is too small here
    rows_only = np.array([seeds.crossed_mean(t)["row_se"] ** 2 for t in x]).mean()
    assert rows_only < 0.8 * true


def test_paired_over_seeds_pairs_by_seed_and_row():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    a = {s: np.where(rng.random(200) < 0.9, y, (y + 1) % 4) for s in (1, 2, 3)}
    b = {s: np.where(rng.random(200) < 0.85, y, (y + 1) % 4) for s in (2, 3, 4)}
    got = seeds.paired_over_seeds(y, a, b)
    d = np.stack([(a[s] == y).astype(float) - (b[s] == y) for s in (2, 3)])
    assert got["paired_seeds"] == [2, 3] and got["seeds"] == 2 and got["rows"] == 200
    assert got["difference"] == pytest.approx(np.mean([(a[s] == y).mean() - (b[s] == y).mean() for s in (2, 3)]))
    assert got["se"] ** 2 == pytest.approx(_anova_by_sums_of_squares(d), rel=1e-9)
