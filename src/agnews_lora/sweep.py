"""Hyper-parameter sweeps with Optuna: each trial is a normal run folder, checked against the budget.

The search space is the config's `sweep.space`: dotted config key -> spec, one of
    {type: int, low: 4, high: 32, step: 4}            (optional: step, log)
    {type: float, low: 1.0e-4, high: 1.0e-3, log: true} (optional: step, log)
    {type: categorical, choices: [[query, value], [all]]}  (choices may be lists or null)
Storage defaults to SQLite in the sweep folder; a PostgreSQL URL lets workers on several
machines share one study. Trials carry a heartbeat: when a worker dies, the next worker that
starts a trial marks the dead one FAILED and re-queues its parameters (resuming its run folder).

Each evaluation of a trial reports its sweep.metric to Optuna (`trial.report`, through the recipe's
`on_evaluate` hook), and sweep.pruner (hyperband by default; median; none) stops a trial whose scores
trail the others' at the same step: it raises `optuna.TrialPruned` from the hook, training stops
there, and the trial's run folder keeps its checkpoints and metrics (resumable with train.resume=true).
A trial over the budget is pruned before it trains. sweep.timeout stops a worker from starting new
trials after that many seconds.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agnews_lora import methods, runs
from agnews_lora.checkpoint import atomic_write_json, atomic_write_text
from agnews_lora.config import Config, config_from_dict, to_dict
from agnews_lora.data import resolve_labels
from agnews_lora.errors import ConfigError, finite
from agnews_lora.outputs import claim_folder
from agnews_lora.extras import require
from agnews_lora.model import budget_breakdown
from agnews_lora.report import compare_runs, md_table
from agnews_lora import train as recipe  # each trial: recipe.train(cfg)
from agnews_lora.writeup import finish_run

MAX_RETRIES = 2  # a trial whose worker keeps dying is re-queued at most this often
_RESERVED = ("out_dir", "name", "sweep.", "train.resume")


@dataclass
class Param:
    """One dimension of the search space."""

    key: str  # dotted config key
    kind: str  # int | float | categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: dict[str, Any] | None = None  # label shown to Optuna -> config value

    def suggest(self, trial) -> Any:
        """The value for this trial (a categorical label is mapped back to its config value)."""
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)
        return self.choices[trial.suggest_categorical(self.key, list(self.choices))]


def _label(choice: Any) -> Any:
    # Optuna stores categorical choices as scalars; lists (module sets, layer sets) get a JSON label.
    return choice if isinstance(choice, (str, int, float, bool)) else json.dumps(choice)


def parse_space(cfg: Config) -> list[Param]:
    """Check `sweep.space` and turn it into Params; every bound and choice is tried on the config.

    Everything is checked here, before a sweep creates its folder or storage.

    Args:
        cfg: the sweep's base config.

    Returns:
        The Params, in file order.

    Raises:
        ConfigError: naming the key (and the spec's field) that is wrong.
    """
    if not cfg.sweep.space:
        raise ConfigError("sweep.space is empty: give dotted config keys with a spec, e.g. "
                          "sweep: {space: {lora.r: {type: int, low: 4, high: 16, step: 4}}}")
    params = []
    for key, spec in cfg.sweep.space.items():
        where = f"sweep.space.{key}"
        if key.startswith(_RESERVED):
            raise ConfigError(f"{where}: this key is set by the sweep itself and cannot be searched")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a spec such as {{type: int, low: 4, high: 16}}, got {spec!r}")
        kind = spec.get("type")
        if kind in ("int", "float"):
            param = _range_param(key, kind=kind, spec=spec)
            values = [param.low, param.high]
        elif kind == "categorical":
            param = _categorical_param(key, spec)
            values = list(param.choices.values())
        else:
            raise ConfigError(f"{where}: type must be int, float or categorical, got {kind!r}")
        for value in values:
            try:
                methods.check_sizes(apply_values(cfg, {key: value}))  # sizes too large to build are refused now
            except ConfigError as err:
                raise ConfigError(f"{where}: value {value!r} does not fit the config: {err}") from None
        params.append(param)
    return params


def _range_param(key: str, kind: str, spec: dict) -> Param:
    """An int or float dimension, every field checked (Optuna would fail only at the first trial)."""
    where = f"sweep.space.{key}"
    extra = set(spec) - {"type", "low", "high", "step", "log"}
    if extra or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: {kind} needs low <= high and optionally step or log (not both), got {spec}")
    low, high = _number(spec, "low", where, kind=kind), _number(spec, "high", where, kind=kind)
    if not low <= high:
        raise ConfigError(f"{where}: {kind} needs low <= high, got low={low} and high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
    step = None if spec.get("step") is None else _number(spec, "step", where, kind=kind)
    if log and step is not None:
        raise ConfigError(f"{where}: give step or log, not both")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}.step: must be > 0, got {step}")
    if log and low <= 0:
        raise ConfigError(f"{where}.log: a log scale needs low > 0, got low={low}")
    return Param(key, kind, low=low, high=high, step=step, log=log)


def _number(spec: dict, name: str, where: str, kind: str) -> int | float:
    """spec[name] as a finite number; an integer for int dimensions."""
    value = spec[name]
    if isinstance(value, bool):  # YAML's yes/no: a bool is an int to Python
        raise ConfigError(f"{where}.{name}: expected a number, got {value!r}")
    number = finite(value, f"{where}.{name}")
    if kind == "float":
        return number
    if not number.is_integer():
        raise ConfigError(f"{where}.{name}: an int dimension needs an integer, got {value!r}")
    return value if isinstance(value, int) else int(number)


def _categorical_param(key: str, spec: dict) -> Param:
    """A categorical dimension: a non-empty list of distinct choices, floats among them finite."""
    where = f"sweep.space.{key}"
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices or set(spec) != {"type", "choices"}:
        raise ConfigError(f"{where}: categorical needs a non-empty list `choices`, got {spec}")
    for choice in choices:
        if isinstance(choice, float):
            finite(choice, f"{where}.choices")
    labels = {_label(c): c for c in choices}
    if len(labels) != len(choices):
        raise ConfigError(f"{where}: choices repeat a value: {choices}")
    return Param(key, "categorical", choices=labels)


def apply_values(base: Config, values: dict[str, Any]) -> Config:
    """A new validated Config: `base` with each dotted key set to its value."""
    data = to_dict(base)
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key '{dotted}'")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key '{dotted}'")
        node[leaf] = value
    return config_from_dict(data)


# ---------------------------------------------------------------- study


def sweep_dir_for(cfg: Config, study_name: str) -> Path:
    """The sweep folder: out_dir when the config sets one, else runs/STUDY_NAME."""
    return Path(cfg.out_dir).expanduser() if cfg.out_dir else Path("runs") / study_name


def mask_url(url: str) -> str:
    """`url` with its password replaced by ***, also when SQLAlchemy cannot parse it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: show it as given (the user sees the typo), all but the password
        scheme, sep, rest = url.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if at and ":" in userinfo:
            rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
        return scheme + sep + rest


def check_storage_url(url: str) -> None:
    """Raise ConfigError, naming the problem and never the password, when `url` is no database URL
    SQLAlchemy can parse or its port is not one (`postgresql://u@h:abc/db`)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        port = make_url(url).port
    except ArgumentError:
        raise ConfigError(f"storage URL {mask_url(url)} is not a database URL; expected e.g. "
                          "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:5432/DB") from None
    except ValueError:  # SQLAlchemy's int() of the port
        raise ConfigError(f"storage URL {mask_url(url)}: the port must be a number from 1 to 65535 "
                          "(postgresql://USER:PASSWORD@HOST:5432/DB)") from None
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"storage URL {mask_url(url)}: port {port} is not in 1..65535")


def with_driver(url: str) -> str:
    """`postgresql://...` -> `postgresql+psycopg://...`: the driver this package installs (psycopg 3),
    whatever SQLAlchemy's default for the bare scheme is."""
    return "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def open_study(url: str, study_name: str, cfg: Config, heartbeat: int, pruner=None):
    """Create the study, or join it when another worker already did.

    Args:
        url: SQLAlchemy URL (sqlite:///PATH, postgresql://USER@HOST:PORT/DB, ...).
        study_name: shared by every worker of the sweep.
        cfg: supplies sweep.direction and sweep.seed.
        heartbeat: seconds between a running trial's heartbeats; a trial silent for twice as
            long is marked FAILED (and re-queued) by the next worker that starts a trial.
        pruner: this worker's Optuna pruner (each worker brings its own; none is stored).

    Returns:
        The optuna Study.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, ProgrammingError

    last: Exception | None = None
    for attempt in range(8):
        try:
            storage = RDBStorage(with_driver(url), heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES))
            return optuna.create_study(storage=storage, study_name=study_name, direction=cfg.sweep.direction,
                                       sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed), pruner=pruner,
                                       load_if_exists=True)
        except (IntegrityError, ProgrammingError, optuna.exceptions.DuplicatedStudyError) as err:
            # Workers creating the tables or the study at the same moment: one wins, the rest load it.
            last = err
            time.sleep(0.2 + random.random() * 0.3 * (attempt + 1))
        except (ArgumentError, OperationalError, ImportError) as err:
            raise ConfigError(f"--storage {mask_url(url)}: cannot open the study database: "
                              f"{str(err).splitlines()[0]} (check host, port, user, password and database)") from None
    raise RuntimeError(f"could not create or load study {study_name!r} in {mask_url(url)}") from last


def best_value(run_dir: Path, metric: str, direction: str) -> float:
    """The best `metric` over a run's evaluations (max or min as `direction` says)."""

    values = [e[metric] for e in runs.read_records(run_dir / runs.METRICS) if metric in e]
    if not values:
        raise RuntimeError(f"{run_dir}/metrics.jsonl holds no {metric}")
    return max(values) if direction == "maximize" else min(values)


def make_pruner(name: str):
    """The Optuna pruner of sweep.pruner: none; median (a trial below the median of the earlier trials'
    values at the same step, once 3 trials have finished); hyperband (Optuna's default brackets over the
    evaluation steps, reduction factor 3; the longest trial sets the largest budget)."""
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    raise ConfigError(f"sweep.pruner={name!r}: choose none, median or hyperband")


class Reporter:
    """The recipe's `on_evaluate` hook for one trial: each evaluation's metric goes to Optuna
    (`trial.report` at the evaluation's step); when the study's pruner says so, the trial is marked
    and `optuna.TrialPruned` stops the training."""

    def __init__(self, trial, metric: str, pruner: str):
        self.trial, self.metric, self.pruner = trial, metric, pruner
        self.reported: set[int] = set()

    def __call__(self, record: dict) -> None:
        import optuna

        if self.metric not in record or record["step"] in self.reported:
            return
        step, value = int(record["step"]), float(record[self.metric])
        self.trial.report(value, step=step)
        self.reported.add(step)
        self.trial.set_user_attr("steps", step)
        if self.trial.should_prune():
            reason = f"pruned by the {self.pruner} pruner at step {step} ({self.metric} {value:.4f})"
            self.trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)


class Objective:
    """One trial: sample, check the budget (prune without training), train with each evaluation
    reported to the pruner, score on validation."""

    def __init__(self, base: Config, params: list[Param], sweep_dir: Path, pruner: str = "none"):
        self.base, self.params, self.sweep_dir, self.pruner = base, params, sweep_dir, pruner

    def __call__(self, trial) -> float:
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        values = {p.key: p.suggest(trial) for p in self.params}
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        original = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
        # A re-queued trial continues the dead worker's run folder from its last checkpoint.
        folder = f"trial-{trial.number if original is None else original:03d}"
        cfg = apply_values(self.base, {**values, "out_dir": str(self.sweep_dir / folder),
                                       "name": f"{trial.study.study_name}-{folder}",
                                       "train.resume": original is not None})
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("run_dir", folder)
        trainable = budget_breakdown(cfg).total
        trial.set_user_attr("trainable", trainable)
        if trainable > cfg.budget.max_trainable:
            reason = f"over budget: {trainable:,} > {cfg.budget.max_trainable:,} trainable parameters"
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)
        reporter = Reporter(trial, metric=cfg.sweep.metric, pruner=self.pruner)
        if original is not None:  # the dead worker's evaluations up to its checkpoint, for the pruner
            run = runs.RunFolder(cfg.out_dir)
            for record in runs.read_records(run.path / runs.METRICS):
                if record["step"] <= run.steps_done():
                    reporter(record)
        recipe.reset_accelerator_state()  # trials run one after another in this process; each sets its own precision
        run_dir = recipe.train(cfg, on_evaluate=reporter)
        finish_run(run_dir)

        summary = runs.read_summary(run_dir) or {}
        for key in ("test_accuracy", "train_seconds", "steps"):
            trial.set_user_attr(key, summary.get(key))
        return best_value(run_dir, metric=cfg.sweep.metric, direction=cfg.sweep.direction)


def run_sweep(cfg: Config, trials: int, storage: str | None = None, study_name: str | None = None,
              heartbeat: int = 60, pruner=None, callbacks: list | None = None) -> Path:
    """Run trials until the study holds `trials` finished (complete or pruned) ones, or until
    sweep.timeout seconds have passed (a running trial is finished first).

    Args:
        cfg: the base config with `sweep.space`.
        trials: target for the whole study, shared by every worker; rerun with more to extend.
        storage: SQLAlchemy URL; default sqlite in the sweep folder.
        study_name: default cfg.name, else "sweep".
        heartbeat: seconds between heartbeats of a running trial.
        pruner: an Optuna pruner instead of sweep.pruner's (library use: a custom rule).
        callbacks: further Optuna callbacks, called after each trial (e.g. one that stops the study).

    Returns:
        The sweep summary (sweep.md) in the sweep folder.
    """
    require("sweep", "run_sweep (Optuna trials)")
    if storage:
        check_storage_url(storage)
    if storage and storage.startswith("postgresql"):
        require("postgres", f"the study storage {mask_url(storage)}")
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    params = parse_space(cfg)
    cfg = resolve_labels(cfg)  # once for every trial: the classes, from the data when left open
    if cfg.data.val_size < 1:
        raise ConfigError("data.val_size=0: a sweep scores trials on validation rows; set data.val_size > 0")
    if trials < 1 or heartbeat < 1:
        raise ConfigError(f"--trials {trials} --heartbeat {heartbeat}: both must be >= 1")
    study_name = study_name or cfg.name or "sweep"
    sweep_dir = claim_folder(sweep_dir_for(cfg, study_name), kind="sweep", label="out_dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs.write_marker(sweep_dir, "sweep")  # its trial runs may be written inside it
    url = storage or f"sqlite:///{(sweep_dir / runs.STUDY_DB).resolve()}"
    with warnings.catch_warnings():  # heartbeats and retries are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        name = cfg.sweep.pruner if pruner is None else type(pruner).__name__
        study = open_study(url, study_name=study_name, cfg=cfg, heartbeat=heartbeat,
                           pruner=make_pruner(cfg.sweep.pruner) if pruner is None else pruner)
        counted = (TrialState.COMPLETE, TrialState.PRUNED)
        left = trials - len(study.get_trials(deepcopy=False, states=counted))
        if left > 0:
            # torch errors (out of memory, ...) fail one trial; config and data errors stop the sweep.
            study.optimize(Objective(cfg, params, sweep_dir, pruner=name), n_trials=left, catch=(RuntimeError,),
                           callbacks=[MaxTrialsCallback(trials, states=counted), *(callbacks or [])],
                           gc_after_trial=True,
                           timeout=cfg.sweep.timeout)
        optuna.storages.fail_stale_trials(study)  # trials whose worker died while this one ran
        return write_sweep_summary(study, sweep_dir=sweep_dir, url=url, metric=cfg.sweep.metric, pruner=name)


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _trial_rows(study) -> list[list[Any]]:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    all_trials = study.get_trials(deepcopy=False)
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t): t.number for t in all_trials}
    rows = []
    for t in all_trials:
        note = t.user_attrs.get("pruned", "")
        if t.state.name == "FAIL":
            note = f"retried as trial {retried[t.number]}" if t.number in retried else "failed"
        params = format_params(t.params)
        value = "-" if t.value is None or t.state.name == "PRUNED" else f"{t.value:.4f}"
        trainable, steps = t.user_attrs.get("trainable"), t.user_attrs.get("steps")
        rows.append([t.number, t.state.name, value, "-" if trainable is None else f"{trainable:,}",
                     "-" if steps is None else steps, params, t.user_attrs.get("run_dir", ""), note])
    return rows


def trial_counts(study) -> dict[str, int]:
    """Trials by outcome: complete, pruned (by the pruner), over_budget, failed, running; and the
    optimizer steps every trial trained (its compute)."""
    counts = dict.fromkeys(("complete", "pruned", "over_budget", "failed", "running"), 0)
    steps = 0
    for t in study.get_trials(deepcopy=False):
        kind = {"COMPLETE": "complete", "FAIL": "failed", "RUNNING": "running"}.get(t.state.name)
        if t.state.name == "PRUNED":
            kind = "over_budget" if str(t.user_attrs.get("pruned", "")).startswith("over budget") else "pruned"
        if kind:
            counts[kind] += 1
        steps += int(t.user_attrs.get("steps") or 0)
    return {**counts, "steps": steps}


def write_sweep_summary(study, sweep_dir: Path, url: str, metric: str, pruner: str = "none") -> Path:
    """sweep.md (best trial, every trial, comparison of the finished runs) and best_trial.json.

    Args:
        study: the optuna Study.
        sweep_dir: the sweep folder holding the trial run folders.
        url: the storage URL (shown without its password).
        metric: the objective's name.
        pruner: the pruner this worker used (sweep.pruner).

    Returns:
        The path of sweep.md.
    """
    n = trial_counts(study)
    parts = [f"# Sweep {study.study_name}", "",
             f"Objective: {study.direction.name.lower()} {metric} (best over each run's evaluations). "
             f"Storage: `{mask_url(url)}`. Pruner: {pruner}.", "",
             f"Trials: {n['complete']} complete, {n['pruned']} pruned by the pruner (their run folders keep "
             f"their checkpoints), {n['over_budget']} over the budget (not trained), {n['failed']} failed"
             + (f", {n['running']} running" if n["running"] else "")
             + f"; {n['steps']:,} optimizer steps trained in all.", ""]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        atomic_write_json(sweep_dir / runs.BEST_TRIAL,
                          {**best.user_attrs, "number": best.number, "value": best.value, "params": best.params,
                           "run_dir": str(sweep_dir / best.user_attrs["run_dir"])})
        parts += [f"**Best trial: {best.number}**, {metric} {best.value:.4f}, run folder "
                  f"`{best.user_attrs['run_dir']}`: {format_params(best.params)}", ""]
    parts += ["## Trials", "", md_table(["Trial", "State", metric, "Trainable", "Steps", "Parameters", "Run", "Note"],
                                        _trial_rows(study), align="rlrrrlll"), ""]
    finished = [sweep_dir / t.user_attrs["run_dir"] for t in complete]
    finished = [d for d in finished if (d / runs.SUMMARY).is_file()]  # other workers' folders may be elsewhere
    if finished:
        table, plot = compare_runs(finished, sweep_dir / runs.COMPARISON, owner=sweep_dir)
        parts += ["## Comparison of the finished trials", "", table, "", f"![accuracy vs parameters]({plot.name})", ""]
    out = sweep_dir / runs.SWEEP_SUMMARY
    atomic_write_text(out, "\n".join(parts))
    return out
