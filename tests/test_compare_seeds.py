"""`agnews-lora compare` groups runs that differ only in train.seed: per recipe the mean and sd over
seeds, the mean over seeds and rows with its standard error, and every recipe against the best
paired by seed and row; in the Markdown table and the --json file. Fake run folders (config,
summary, test predictions) with the figures recomputed independently here, and one real path:
study.with_seeds training a tiny row over two seeds in child processes, then compare on them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from agnews_lora import runs, study
from agnews_lora.cli import main
from agnews_lora.config import load_config
from conftest import make_shapes_model, tiny_run_overrides
from test_seeds import _anova_by_sums_of_squares

ROWS = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_shapes_model(tmp_path_factory.mktemp("shapes"))


def fake_run(folder: Path, model_dir: Path, seed: int, rank: int, labels: np.ndarray, preds: np.ndarray,
             val: float) -> Path:
    """A finished run folder as train leaves it, as far as compare reads it."""
    cfg = load_config(overrides=[f"model.name={model_dir}", "model.num_labels=4", f"lora.r={rank}", f"train.seed={seed}",
                                 f"name={folder.name}", f"out_dir={folder}", "train.max_steps=10"])
    folder.mkdir(parents=True)
    runs.write_marker(folder, "run")
    runs.write_config(cfg, folder)
    test = float((preds == labels).mean())
    runs.write_summary(folder, {"steps": 10, "trainable": {"total": 1000 + rank}, "best_val_accuracy": val,
                                "test_accuracy": test, "train_seconds": 1.0, "precision": "no"})
    runs.write_predictions(folder / runs.TEST_PREDICTIONS, labels, np.eye(4)[preds], source="test.csv")
    return folder


@pytest.fixture(scope="module")
def fake(model_dir, tmp_path_factory):
    """Recipe A (r=4) over seeds 1, 2, 3 and recipe B (r=8) over seeds 2, 3, 4 on the same 300 rows;
    folder names do not say which recipe a run belongs to."""
    out = tmp_path_factory.mktemp("fake-runs")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, ROWS)
    hard = rng.random(ROWS) < 0.3  # rows both recipes find hard
    preds, folders = {}, []
    for name, rank, seed, p_right, val in (("alpha", 4, 1, 0.93, 0.91), ("bravo", 8, 2, 0.88, 0.89),
                                           ("charlie", 4, 2, 0.90, 0.90), ("delta", 4, 3, 0.92, 0.92),
                                           ("echo", 8, 3, 0.86, 0.88), ("foxtrot", 8, 4, 0.89, 0.87)):
        right = rng.random(ROWS) < np.where(hard, p_right - 0.25, p_right + 0.1)
        preds[(rank, seed)] = np.where(right, labels, (labels + 1) % 4)
        folders.append(fake_run(out / name, model_dir, seed, rank, labels, preds[(rank, seed)], val))
    return {"out": out, "labels": labels, "preds": preds, "folders": folders}


def test_compare_groups_seeds_and_its_figures_match_an_independent_computation(fake, tmp_path, capsys):
    md, js = tmp_path / "comparison.md", tmp_path / "comparison.json"
    main(["compare", *map(str, fake["folders"]), "--output", str(md), "--json", str(js)])
    got = json.loads(js.read_text())
    y, preds = fake["labels"], fake["preds"]
    recipes = {r["name"]: r for r in got["recipes"]}
    assert set(recipes) == {"alpha", "bravo"}  # the lowest seed's run names each recipe
    a, b = recipes["alpha"], recipes["bravo"]
    assert a["runs"] == ["alpha", "charlie", "delta"] and a["seeds"] == [1, 2, 3]
    assert b["runs"] == ["bravo", "echo", "foxtrot"] and b["seeds"] == [2, 3, 4]
    acc = {k: float((v == y).mean()) for k, v in preds.items()}
    for recipe, rank, seeds_ in ((a, 4, (1, 2, 3)), (b, 8, (2, 3, 4))):
        tests = [acc[(rank, s)] for s in seeds_]
        assert recipe["test"]["mean"] == pytest.approx(statistics.mean(tests))
        assert recipe["test"]["sd"] == pytest.approx(statistics.stdev(tests))
        both = recipe["test_over_seeds_and_rows"]
        table = np.stack([(preds[(rank, s)] == y).astype(float) for s in seeds_])
        assert both["mean"] == pytest.approx(statistics.mean(tests))
        assert both["se"] ** 2 == pytest.approx(_anova_by_sums_of_squares(table), rel=1e-9)
    assert a["val"]["mean"] == pytest.approx(statistics.mean([0.91, 0.90, 0.92]))
    assert got["best"] == "alpha" and a["vs_best"] is None and got["rows"] == ROWS
    d = b["vs_best"]  # paired on the seeds both have (2, 3), row by row
    diff = np.stack([(preds[(8, s)] == y).astype(float) - (preds[(4, s)] == y) for s in (2, 3)])
    assert d["paired_seeds"] == [2, 3]
    assert d["difference"] == pytest.approx(statistics.mean([acc[(8, 2)] - acc[(4, 2)], acc[(8, 3)] - acc[(4, 3)]]))
    assert d["se"] ** 2 == pytest.approx(_anova_by_sums_of_squares(diff), rel=1e-9)
    assert [r["name"] for r in got["runs"]] == [f.name for f in fake["folders"]]
    text = md.read_text()
    assert "## Over seeds" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| bravo |") and "seeds)" in ln)
    assert f"{100 * d['difference']:+.2f} ± {100 * d['se']:.2f} (2 seeds)" in line
    assert f"{100 * b['test']['mean']:.2f}% ± {100 * b['test']['sd']:.2f}" in line
    assert "## Over seeds" in capsys.readouterr().out


def test_compare_without_seeds_keeps_one_table_and_refuses_a_run_twice(fake, tmp_path, capsys):
    md = tmp_path / "one.md"
    main(["compare", str(fake["folders"][0]), str(fake["folders"][1]), "--output", str(md)])
    assert "## Over seeds" not in md.read_text() and not (tmp_path / "one.json").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(fake["folders"][0]), str(fake["folders"][0]), "--output", str(tmp_path / "two.md")])
    assert exit_.value.code == 2 and "same settings and seed" in capsys.readouterr().err


def test_seeds_through_study_and_compare_on_a_tiny_model(tiny_model_dir, ag_files, tmp_path):
    """The real path: one tiny row over two seeds as its own child-process runs, then compare."""
    base = tiny_run_overrides(tiny_model_dir, ag_files, tmp_path / "cache", tmp_path / "row")
    rows = study.with_seeds([study.Row("row", (*base, "name=row", "model.num_labels=4"))], 2)
    planned = study.plan(rows)
    assert [p.name for p in planned] == ["row", "row.seed43"] and [p.status for p in planned] == ["new", "new"]
    for index, p in enumerate(planned, 1):
        study.run_row(p, index=index, count=2)
    assert [p.status for p in study.plan(rows)] == ["done", "done"]  # resumable: nothing left to do
    found = study.seed_runs(tmp_path / "row")
    assert found == [tmp_path / "row", tmp_path / "row.seed43"]
    summaries = [runs.RunFolder(f).summary() for f in found]
    stats = study.over_seeds(tmp_path / "row")
    assert stats["seeds"] == [42, 43]
    assert stats["test"]["mean"] == pytest.approx(statistics.mean(s["test_accuracy"] for s in summaries))
    js = tmp_path / "c.json"
    main(["compare", *map(str, found), "--output", str(tmp_path / "c.md"), "--json", str(js)])
    (recipe,) = json.loads(js.read_text())["recipes"]
    assert recipe["name"] == "row" and recipe["seeds"] == [42, 43]
    assert recipe["test_over_seeds_and_rows"]["mean"] == pytest.approx(stats["test"]["mean"])
    assert recipe["test"]["sd"] == pytest.approx(statistics.stdev(s["test_accuracy"] for s in summaries))
