"""Sweeps report every evaluation to Optuna and prune hopeless trials (issue 28 item 2): a pruned
trial stops at that evaluation, keeps its run folder and is marked in sweep.md; sweep.pruner picks
the rule (hyperband by default), sweep.timeout caps the worker's time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from agnews_lora.checkpoint import read_jsonl
from agnews_lora.cli import main
from agnews_lora.config import ConfigError, load_config
from agnews_lora.sweep import make_pruner, run_sweep

from test_sweep import _sweep_config

optuna = pytest.importorskip("optuna")


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial at its first report: the same trials on every run."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1 and bool(trial.intermediate_values)


def test_pruner_keys():
    assert load_config().sweep.pruner == "hyperband" and load_config().sweep.timeout is None
    assert isinstance(make_pruner("hyperband"), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("median"), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match=r"sweep.pruner: 'asha' is not one of none, median, hyperband"):
        load_config(overrides=["sweep.pruner=asha"])
    for bad in ("0", "-5"):
        with pytest.raises(ConfigError, match=r"sweep.timeout=.* must be > 0 seconds"):
            load_config(overrides=[f"sweep.timeout={bad}"])
    with pytest.raises(ConfigError, match=r"sweep.timeout: 'inf' is not a finite number"):
        load_config(overrides=["sweep.timeout=inf"])


def test_every_evaluation_is_reported_and_pruned_trials_keep_their_folders(tiny_model_dir, ag_files, tmp_path):
    out = tmp_path / "sweep"
    config = _sweep_config(tmp_path / "sweep.yaml", tiny_model_dir, ag_files, out, budget=100_000, seed=3)
    cfg = load_config(config)
    md = run_sweep(cfg, trials=3, pruner=PruneOddTrials())
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out.resolve() / 'study.db'}")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    for t in trials:  # every evaluation (steps 2 and 4; the pruned trial: its first) was reported
        metrics = read_jsonl(out / t.user_attrs["run_dir"] / "metrics.jsonl")
        assert t.intermediate_values == {m["step"]: m["val_accuracy"] for m in metrics}
    assert sorted(trials[0].intermediate_values) == [2, 4] and sorted(trials[1].intermediate_values) == [2]
    pruned = out / trials[1].user_attrs["run_dir"]
    assert (pruned / "best").is_dir() and (pruned / "last").is_dir() and not (pruned / "summary.json").exists()
    assert json.loads((pruned / "last" / "state.json").read_text())["step"] == 2  # stopped at that evaluation
    assert trials[1].user_attrs["pruned"].startswith("pruned by the PruneOddTrials pruner at step 2 (val_accuracy ")
    text = md.read_text()
    assert "| 1 | PRUNED | - |" in text and "| trial-001 | pruned by the PruneOddTrials pruner at step 2" in text
    assert "Trials: 2 complete, 1 pruned by the pruner (their run folders keep their checkpoints), 0 over the " \
           "budget (not trained), 0 failed; 10 optimizer steps trained in all." in text
    best = json.loads((out / "best_trial.json").read_text())
    assert best["number"] in (0, 2)
    # A rerun with the same target trains nothing: the pruned trial counts as finished
    assert run_sweep(cfg, trials=3, pruner=PruneOddTrials()).read_text().count("| PRUNED |") == 1
    assert len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{out.resolve() / 'study.db'}")
               .get_trials()) == 3


def test_the_configured_pruner_runs_from_the_cli(tiny_model_dir, ag_files, tmp_path):
    """sweep.pruner=median through `agnews-lora sweep`: after three trials, a trial whose first
    evaluation is below the earlier trials' median is stopped there (a learning rate too small to
    move the tiny model, enqueued after three good ones)."""
    out = tmp_path / "sweep"
    config = _sweep_config(tmp_path / "sweep.yaml", tiny_model_dir, ag_files, out, budget=100_000, seed=3)
    data = yaml.safe_load(config.read_text())
    data["sweep"]["pruner"] = "median"
    config.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{out.resolve() / 'study.db'}"
    out.mkdir()
    study = optuna.create_study(storage=url, study_name="tiny", direction="maximize")
    for lr in (1e-2, 8e-3, 5e-3, 1e-4):  # distinct: `compare` refuses the same run twice
        study.enqueue_trial({"lora.r": 4, "lora.target_modules": '["query", "value"]', "train.lr": lr})
    main(["sweep", "-c", str(config), "--trials", "4"])
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    first = [t.intermediate_values[2] for t in trials[:3]]
    last = trials[3]
    import statistics

    expected = "PRUNED" if last.intermediate_values[2] < statistics.median(first) else "COMPLETE"
    assert last.state.name == expected
    assert "Pruner: median." in (out / "sweep.md").read_text()


def test_timeout_stops_starting_trials(tiny_model_dir, ag_files, tmp_path):
    out = tmp_path / "sweep"
    config = _sweep_config(tmp_path / "sweep.yaml", tiny_model_dir, ag_files, out, budget=100_000, seed=3)
    cfg = load_config(config, ["sweep.timeout=0.001", "sweep.pruner=none"])
    md = run_sweep(cfg, trials=5)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out.resolve() / 'study.db'}")
    assert len(study.get_trials()) == 1  # the first trial finishes; no further trial starts
    assert "Pruner: none." in md.read_text()


def test_pruning_benchmark_runs_both_arms_to_the_same_step_cap(tiny_model_dir, ag_files, tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("sweep_pruning", ROOT / "benchmarks" / "sweep_pruning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = _sweep_config(tmp_path / "sweep.yaml", tiny_model_dir, ag_files, tmp_path / "unused", budget=100_000,
                           seed=None)
    table = tmp_path / "pruning.md"
    argv = ["--config", str(config), "--pruners", "none,median", "--steps-cap", "8", "--out", str(tmp_path / "out"),
            "--table", str(table), "--records", str(tmp_path / "records")]
    dbs = bench.records_for(config, 0, [], tmp_path / "records")
    assert bench.main([*argv, "--max-minutes", "1e-9"]) == 0  # out of time before the first trial: nothing trained
    assert "8 (cap not reached)" not in table.read_text() and "| 0 (cap not reached) |" in table.read_text()
    assert bench.main(argv) == 0
    data = json.loads(table.with_suffix(".json").read_text())
    # a pruned arm short of half the cap gets no verdict (here both reach the cap in one call)
    short = [{**a, "steps": 3} if a["pruner"] == "median" else a for a in data["arms"]]
    assert bench.verdict(short, 8) == ["- median: 3 of the 4 steps that half the cap allows so far: no verdict yet.", ""]
    slices = [{"machine": "A", "trials": [0, 1]}, {"machine": "A", "trials": [2, 3]}, {"machine": "B", "trials": [4, 4]}]
    assert bench.machines_line([{"pruner": "none", "slices": slices}]) == "- Trained on: none: trials 0-3 on A; trials 4-4 on B."
    assert [a["pruner"] for a in data["arms"]] == ["none", "median"]
    for arm in data["arms"]:
        study = optuna.load_study(study_name=f"pruning-{arm['pruner']}",
                                  storage=f"sqlite:///{dbs / (arm['pruner'] + '.db')}")
        trials = study.get_trials()
        assert 8 <= arm["steps"] < 8 + 4  # trials of 4 steps until the cap: the last one may pass it
        assert arm["steps"] == sum(t.user_attrs.get("steps", 0) for t in trials)
        assert arm["complete"] + arm["pruned"] + arm["over_budget"] == len(trials)
        assert arm["best"] == max(t.value for t in trials if t.state.name == "COMPLETE")
        first = min(trials, key=lambda t: t.number)  # 4 steps: the only trial within half the cap (4)
        assert arm["best_by_half"] == (first.value if first.state.name == "COMPLETE" else None)
        done = sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.number)
        finder = next(t for t in done if t.value == arm["best"])  # the first trial with the best value
        assert arm["steps_to_best"] == sum(t.user_attrs.get("steps", 0) for t in trials if t.number <= finder.number)
    assert "| none |" in table.read_text() and "| median |" in table.read_text()
    assert "Best by 4 steps" in table.read_text()
    for arm in data["arms"]:  # which machine trained which trials, kept in the study itself
        assert [s["trials"][0] for s in arm["slices"]] == [0] and arm["slices"][0]["machine"]
    assert "- Trained on: none: trials 0-" in table.read_text()
    assert "- median by 4 steps against no pruner at 8:" in table.read_text() or "- median: no trial" in table.read_text()
    before = len(optuna.load_study(study_name="pruning-none",
                                   storage=f"sqlite:///{dbs / 'none.db'}").get_trials())
    assert bench.main(argv) == 0  # the cap is reached: a rerun trains nothing more
    assert len(optuna.load_study(study_name="pruning-none",
                                 storage=f"sqlite:///{dbs / 'none.db'}").get_trials()) == before
    shutil.rmtree(tmp_path / "out")  # a later session: the run folders are gone, the study databases kept
    argv[argv.index("--steps-cap") + 1] = "12"
    assert bench.main(argv) == 0
    trials = optuna.load_study(study_name="pruning-none", storage=f"sqlite:///{dbs / 'none.db'}").get_trials()
    assert len(trials) > before and sum(t.user_attrs.get("steps", 0) for t in trials) >= 12
