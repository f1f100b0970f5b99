"""Budget planner, search-space parsing, a SQLite sweep, and two workers sharing a PostgreSQL study."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from agnews_lora.checkpoint import read_jsonl
from agnews_lora.cli import main
from agnews_lora.config import ConfigError, load_config
from agnews_lora.model import budget_breakdown
from agnews_lora.plan import PLACEMENTS, plan_budget
from agnews_lora.sweep import apply_values, parse_space, with_driver

ROOT = Path(__file__).resolve().parents[1]
ROBERTA_BASE = ROOT.parent / "shared" / "models" / "roberta-base"


# ---------------------------------------------------------------- planner


@pytest.mark.skipif(not ROBERTA_BASE.is_dir(), reason="../shared/models/roberta-base is absent")
def test_plan_ranks_are_the_largest_that_budget_breakdown_accepts(capsys):
    cfg = load_config(overrides=[f"model.name={ROBERTA_BASE}", "lora.layers=[10,11]"])
    main(["budget", "--plan", "--json", f"model.name={ROBERTA_BASE}", "lora.layers=[10,11]"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(PLACEMENTS) * 2 * 2  # placements x (all layers, 10-11) x (roberta, linear head)
    by_key = {(r["placement"], str(r["layers"]), r["head"]): r for r in rows}
    # roberta-base anchors: the RoBERTa head is 593,668; q+v costs 36,864 per rank over 12 layers
    qv = by_key[("query+value", "None", "roberta")]
    assert (qv["head_params"], qv["per_rank"], qv["max_r"], qv["total"]) == (593_668, 36_864, 11, 999_172)
    assert by_key[("query+value", "None", "linear")]["max_r"] == 27
    for row in rows:
        chosen = apply_values(cfg, {"lora.target_modules": row["modules"], "lora.layers": row["layers"],
                                    "model.head": row["head"], "lora.r": row["max_r"]})
        b = budget_breakdown(chosen)
        assert (b.total, b.lora, b.head_total) == (row["total"], row["lora"], row["head_params"]), row
        assert b.total <= 1_000_000
        bigger = apply_values(chosen, {"lora.r": row["max_r"] + 1})
        assert budget_breakdown(bigger).total > 1_000_000, row


def test_plan_reports_placements_that_cannot_fit(tiny_model_dir):
    # Tiny model: the RoBERTa head is 1,188 parameters, LoRA on q+v costs 256 per rank.
    cfg = load_config(overrides=[f"model.name={tiny_model_dir}", "budget.max_trainable=1400"])
    rows = {(r.placement, r.head): r for r in plan_budget(cfg)}
    assert rows[("query+value", "roberta")].max_r is None  # 1,188 + 256 > 1,400
    linear = rows[("query+value", "linear")]
    assert linear.max_r == (1400 - linear.head_params) // 256
    assert linear.total == budget_breakdown(apply_values(cfg, {"model.head": "linear",
                                                               "lora.r": linear.max_r})).total


# ---------------------------------------------------------------- search space


def test_shipped_sweep_config_parses():
    cfg = load_config(ROOT / "configs" / "sweep-cpu-minilm.yaml")
    params = {p.key: p for p in parse_space(cfg)}
    assert {"lora.r", "lora.target_modules", "lora.layers", "train.lr", "model.head"} <= set(params)
    assert None in params["lora.layers"].choices.values()  # "all layers" is a choice


@pytest.mark.parametrize("space, message", [
    ({"lora.rank": {"type": "int", "low": 2, "high": 8}}, "sweep.space.lora.rank: .*unknown config key"),
    ({"lora.r": {"type": "int", "low": 0, "high": 8}}, r"sweep.space.lora.r: value 0 .*lora.r=0 must be >= 1"),
    ({"lora.r": {"type": "int", "low": 8, "high": 2}}, "sweep.space.lora.r: int needs low <= high"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True, "step": 1e-4}}, "not both"),
    ({"model.head": {"type": "categorical", "choices": ["roberta", "mlp"]}}, "'mlp' does not fit"),
    ({"lora.layers": {"type": "categorical", "choices": [[0], [0]]}}, "repeat"),
    ({"lora.r": {"type": "normal"}}, "type must be int, float or categorical"),
    ({"out_dir": {"type": "categorical", "choices": ["a", "b"]}}, "set by the sweep itself"),
    ({}, "sweep.space is empty"),
])
def test_bad_search_space_names_the_key(space, message):
    cfg = load_config(overrides=["sweep.seed=1"])
    cfg.sweep.space = space
    with pytest.raises(ConfigError, match=message):
        parse_space(cfg)


def test_sweep_direction_must_suit_the_metric():
    with pytest.raises(ConfigError, match="sweep.direction='maximize' does not suit sweep.metric=val_loss"):
        load_config(overrides=["sweep.metric=val_loss"])


# ---------------------------------------------------------------- sweeps on the tiny model


def _sweep_config(path: Path, model_dir, files, out: Path, budget: int, seed: int | None) -> Path:
    """A tiny sweep: on the tiny model q+v LoRA costs 256 per rank, all modules 896, the head 1,188."""
    sweep = {"metric": "val_accuracy", "direction": "maximize", "space": {
        "lora.r": {"type": "int", "low": 2, "high": 4, "step": 2},
        "lora.target_modules": {"type": "categorical", "choices": [["query", "value"], ["all"]]},
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    if seed is not None:
        sweep["seed"] = seed
    cfg = {"name": "tiny", "out_dir": str(out), "model": {"name": str(model_dir)},
           "data": {"train": [str(files["train"])], "test": [str(files["test"])], "val_size": 40,
                    "max_length": 64, "cache_dir": str(out.parent / "cache")},
           "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "log_every": 1, "precision": "fp32",
                     "progress": False},
           "budget": {"max_trainable": budget}, "sweep": sweep}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_complete_trial(trial, sweep_dir: Path) -> None:
    """The trial's value is its run's best validation accuracy; its run folder has its parameters."""
    run = sweep_dir / trial.user_attrs["run_dir"]
    assert trial.value == max(e["val_accuracy"] for e in read_jsonl(run / "metrics.jsonl"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lora"]["r"] == trial.params["lora.r"]
    assert saved["lora"]["target_modules"] == json.loads(trial.params["lora.target_modules"])
    assert (run / "report.md").is_file() and (run / "summary.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable"]["total"] == trial.user_attrs["trainable"]


def test_sqlite_sweep_prunes_over_budget_trials_without_training(tiny_model_dir, ag_files, tmp_path, capsys):
    import optuna
    from optuna.trial import TrialState

    out = tmp_path / "sweep"
    config = _sweep_config(tmp_path / "sweep.yaml", tiny_model_dir, ag_files, out, budget=3000, seed=3)
    out.mkdir()
    url = f"sqlite:///{out.resolve() / 'study.db'}"  # the default storage of `sweep`
    # Trial 0 is r=4 on all modules: 1,188 + 4 * 896 = 4,772 > 3,000.
    optuna.create_study(storage=url, study_name="tiny", direction="maximize").enqueue_trial(
        {"lora.r": 4, "lora.target_modules": '["all"]', "train.lr": 1e-3})
    main(["sweep", "-c", str(config), "--trials", "3"])
    printed = capsys.readouterr().out
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials()
    assert len(trials) == 3
    assert trials[0].state == TrialState.PRUNED
    assert trials[0].user_attrs["pruned"] == "over budget: 4,772 > 3,000 trainable parameters"
    assert not (out / "trial-000").exists()  # pruned before any training
    for t in trials[1:]:
        over = budget_breakdown(load_config(config, [f"lora.r={t.params['lora.r']}",
                                                     f"lora.target_modules={t.params['lora.target_modules']}"]))
        assert t.state == (TrialState.PRUNED if over.total > 3000 else TrialState.COMPLETE)
        assert t.user_attrs["trainable"] == over.total
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete, "the seeded sampler should train at least one trial"
    for t in complete:
        _check_complete_trial(t, out)
    best = max(complete, key=lambda t: t.value)
    md = (out / "sweep.md").read_text()
    assert f"**Best trial: {best.number}**, val_accuracy {best.value:.4f}" in md
    assert json.loads((out / "best_trial.json").read_text())["value"] == best.value
    for t in complete:
        assert f"| trial-{t.number:03d} |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0 | PRUNED | - | 4,772 |" in md and md in printed
    # --trials is a target for the whole study: running again adds nothing
    main(["sweep", "-c", str(config), "--trials", "3"])
    assert len(optuna.load_study(study_name="tiny", storage=url).get_trials()) == 3


# ---------------------------------------------------------------- PostgreSQL: shared study, dead worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on a free port (Debian's binaries), stopped at teardown."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not found[-1]:
        pytest.skip("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver this package depends on) is missing")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="agnews-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres account
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL as user postgres")
        try:
            shutil.chown(root, user="postgres")
        except LookupError:
            pytest.skip("running as root and there is no `postgres` user to run the server")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port, data = _free_port(), root / "data"
    pg_ctl = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*pg_ctl, "-l", str(root / "log"), "-w", "start",
                    "-o", f"-p {port} -k /tmp -c listen_addresses=localhost"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@localhost:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_running_trial(url: str, deadline: float):
    """The first RUNNING trial once its worker has tagged it (poll the shared study)."""
    import optuna

    while time.time() < deadline:
        try:
            trials = optuna.load_study(study_name="tiny", storage=with_driver(url)).get_trials(deepcopy=False)
        except KeyError:  # the workers have not created the study yet
            trials = []
        running = [t for t in trials if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        if running:
            return running[0]
        time.sleep(0.2)
    raise AssertionError("no worker started a trial in time")


def test_two_workers_share_a_postgres_study_and_a_dead_workers_trial_is_failed(
        postgres_url, tiny_model_dir, ag_files, tmp_path):
    import optuna
    from optuna.trial import TrialState

    out = tmp_path / "sweep"
    config = _sweep_config(tmp_path / "sweep.yaml", tiny_model_dir, ag_files, out, budget=100_000, seed=None)
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    cmd = [sys.executable, "-m", "agnews_lora.cli", "sweep", "-c", str(config), "--trials", "3",
           "--storage", postgres_url, "--heartbeat", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Both start on the empty database at once: creating the tables and the study races.
    workers = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path) for log in logs]
    try:
        doomed = _wait_for_running_trial(postgres_url, deadline=time.time() + 120)
        victim = next(w for w in workers if w.pid == int(doomed.user_attrs["worker"].rsplit(":", 1)[1]))
        victim.kill()  # SIGKILL: no chance to tell the study
        survivor = next(w for w in workers if w is not victim)
        assert survivor.wait(timeout=180) == 0, (tmp_path / f"worker{workers.index(survivor)}.log").read_text()
    finally:
        for w in workers:
            w.kill()
            w.wait()
    trials = optuna.load_study(study_name="tiny", storage=with_driver(postgres_url)).get_trials()
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states
    assert trials[doomed.number].state == TrialState.FAIL  # never lost, never left RUNNING
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == doomed.number]
    assert len(retries) == 1 and retries[0].params == doomed.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.WAITING)
    if retries[0].state == TrialState.COMPLETE:  # the retry continued the dead trial's run folder
        assert retries[0].user_attrs["run_dir"] == f"trial-{doomed.number:03d}"
    assert states.count(TrialState.COMPLETE) >= 3
    assert len({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}) == 2  # one study, two workers
    for t in trials:
        if t.state == TrialState.COMPLETE:
            _check_complete_trial(t, out)
    assert "postgresql://postgres@localhost" in (out / "sweep.md").read_text()
