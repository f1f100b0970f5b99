#!/usr/bin/env python3
"""Does pruning find as good a configuration for less compute? The same search space, sampler seed
and compute cap, searched with and without a pruner.

    python benchmarks/sweep_pruning.py --steps-cap 6000                    # configs/sweep-cpu-minilm.yaml
    python benchmarks/sweep_pruning.py --pruners none,hyperband,median --steps-cap 6000 --set train.max_steps=300

Each arm is a sweep of its own (`agnews_lora.sweep.run_sweep`, SQLite in OUT/ARM) on the config's
`sweep.space` with the same sampler seed (--seed), so both arms start from the same proposals. The
compute cap is counted in optimizer steps trained (every trial's, pruned ones up to where they
stopped), not in seconds: the machine is shared, and steps are what a pruner saves. An arm's sweep
stops starting trials once its trials have trained --steps-cap steps (`StepCap`, an Optuna callback
given to `run_sweep`); the last trial may end past the cap, which the table shows. Rerunning
continues an arm that has not reached its cap. The arms' study databases live in --records
(experiments/records/sweep_pruning/, committed), so a later session, whose run folders are gone,
continues each arm from the trials it has (a trial cut off by the session's end is retried).

Per arm the table gives the best validation accuracy found (the sweep's objective), trials complete
and pruned, optimizer steps trained, and the trials' own time; its JSON beside it. Target (issue 28): pruning
finds the same best within noise for at most half the compute.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class StepCap:
    """An Optuna callback that stops the study once its trials have trained `cap` optimizer steps."""

    def __init__(self, cap: int):
        self.cap = cap

    def __call__(self, study, trial) -> None:
        from agnews_lora.sweep import trial_counts

        if trial_counts(study)["steps"] >= self.cap:
            study.stop()


class Deadline:
    """An Optuna callback that stops the study (after the trial that just finished) once the clock
    passes `deadline` (time.monotonic()): how a call is held to --max-minutes."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def __call__(self, study, trial) -> None:
        if self.passed():
            study.stop()


def records_for(base_config: Path, seed: int, overrides: list[str], records: Path) -> Path:
    """The folder of a search's study databases: one per config (its text), sampler seed and
    overrides, so that a changed config starts new studies instead of continuing old ones."""
    import hashlib

    text = base_config.read_bytes() + "\n".join(overrides).encode()
    return records / f"{base_config.stem}_seed{seed}_{hashlib.sha256(text).hexdigest()[:8]}"


def note_slice(study, first: int) -> None:
    """Keep, in the study itself, which machine trained the trials this call added (numbers `first`
    onwards): an arm trained over several sessions may span CPUs whose bf16 kernels differ."""
    from agnews_lora.study import machine

    last = len(study.trials) - 1
    if last < first:
        return
    slices = list(study.user_attrs.get("slices", []))
    slices.append({"machine": str(machine()), "trials": [first, last],
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    study.set_user_attr("slices", slices)


def machines_line(results: list[dict]) -> str:
    """Which machines trained which trials, per arm (from the studies' slices)."""
    parts = []
    for r in results:
        runs: list[list] = []  # [first, last, machine], consecutive slices on one machine merged
        for s in r.get("slices") or []:
            if runs and runs[-1][2] == s["machine"] and runs[-1][1] + 1 == s["trials"][0]:
                runs[-1][1] = s["trials"][1]
            else:
                runs.append([*s["trials"], s["machine"]])
        if runs:
            parts.append(f"{r['pruner']}: " + "; ".join(f"trials {a}-{b} on {m}" for a, b, m in runs))
    return ("- Trained on: " + " | ".join(parts) + ".") if parts else ""


def best_by(study, steps: int, maximize: bool = True) -> float | None:
    """The best objective among the complete trials an arm had once it had trained `steps` optimizer
    steps (trials in the order they were started, each counted with every step it trained, pruned
    ones included): what the arm would have found with that compute."""
    spent, best = 0, None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        spent += int(t.user_attrs.get("steps") or 0)
        if spent > steps:
            break
        if t.state.name == "COMPLETE" and t.value is not None:
            best = t.value if best is None else (max if maximize else min)(best, t.value)
    return best


def steps_to_best(study, maximize: bool = True) -> int | None:
    """Optimizer steps the arm had trained (trials in start order, the finding trial included) when
    it first found its final best objective; None when no trial completed."""
    spent, best, at = 0, None, None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        spent += int(t.user_attrs.get("steps") or 0)
        if t.state.name == "COMPLETE" and t.value is not None and (
                best is None or (t.value > best if maximize else t.value < best)):
            best, at = t.value, spent
    return at


def run_arm(base_config: Path, pruner: str, out: Path, steps_cap: int, seed: int, overrides: list[str],
            max_trials: int = 500, records: Path | None = None, deadline: Deadline | None = None) -> dict:
    """One arm: one sweep whose trials run until they have trained `steps_cap` optimizer steps.

    Returns:
        best (the best objective value; None when no trial completed), the trial counts and steps
        (`sweep.trial_counts`), whether it reached the cap, the trials' seconds (all calls), this call's
        wall seconds, and the sweep folder.
    """
    import optuna

    from agnews_lora.config import load_config
    from agnews_lora.sweep import run_sweep, trial_counts

    cfg = load_config(base_config, [*overrides, f"sweep.pruner={pruner}", f"sweep.seed={seed}",
                                    f"out_dir={out / pruner}", f"name=pruning-{pruner}"])
    db = (records / f"{pruner}.db") if records is not None else out / pruner / "study.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{db.resolve()}"
    start = time.perf_counter()
    done = db.is_file() and trial_counts(optuna.load_study(study_name=cfg.name, storage=url))["steps"] >= steps_cap
    if not done and not (deadline and deadline.passed()):  # a rerun continues the arm until the cap (the
        # sampler starts afresh: same seed, new proposals only for a study it has not seen)
        before = len(optuna.load_study(study_name=cfg.name, storage=url).trials) if db.is_file() else 0
        run_sweep(cfg, trials=max_trials, storage=url, callbacks=[StepCap(steps_cap), *([deadline] if deadline else [])])
        note_slice(optuna.load_study(study_name=cfg.name, storage=url), before)
    found = {"pruner": pruner, "folder": str(out / pruner), "study": str(db), "metric": cfg.sweep.metric,
             "wall_seconds": round(time.perf_counter() - start, 1)}
    if not db.is_file():  # --max-minutes ran out before this arm started
        return {**found, "best": None, "reached_cap": False, "steps": 0, "complete": 0, "pruned": 0,
                "over_budget": 0, "trial_seconds": 0.0}
    study = optuna.load_study(study_name=cfg.name, storage=url)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = (max if cfg.sweep.direction == "maximize" else min)(t.value for t in complete) if complete else None
    # every finished trial's own time, over all the calls that trained the arm
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete is not None and t.datetime_start is not None)
    maximize = cfg.sweep.direction == "maximize"
    return {**found, "best": best, "reached_cap": trial_counts(study)["steps"] >= steps_cap, **trial_counts(study),
            "best_by_half": best_by(study, steps_cap // 2, maximize), "val_rows": cfg.data.val_size,
            "steps_to_best": steps_to_best(study, maximize), "slices": study.user_attrs.get("slices", []),
            "trial_seconds": round(seconds, 1)}


def verdict(results: list[dict], steps_cap: int) -> list[str]:
    """The target's check, once the no-pruner arm has reached the cap: does each pruned arm's best by
    half the cap come within noise (one binomial standard error of an accuracy on the validation
    rows, at the no-pruner arm's best) of the no-pruner arm's best at the full cap?"""
    import math

    base = next((r for r in results if r["pruner"] == "none"), None)
    if base is None or not base["reached_cap"] or base["best"] is None or not 0 < base["best"] < 1:
        return []
    se = math.sqrt(base["best"] * (1 - base["best"]) / base["val_rows"])
    lines = []
    for r in results:
        if r is base:
            continue
        half = r.get("best_by_half")
        if r["steps"] < steps_cap // 2:
            lines.append(f"- {r['pruner']}: {r['steps']:,} of the {steps_cap // 2:,} steps that half the cap "
                         "allows so far: no verdict yet.")
            continue
        if half is None:
            lines.append(f"- {r['pruner']}: no trial completed within half the cap.")
            continue
        gap = half - base["best"]
        within = gap >= -se
        lines.append(f"- {r['pruner']} by {steps_cap // 2:,} steps against no pruner at {steps_cap:,}: "
                     f"{100 * gap:+.2f} points (one standard error of a {base['val_rows']}-row validation accuracy: "
                     f"{100 * se:.2f}): {'the same best within noise for half the compute' if within else 'worse beyond noise'}.")
    return [*lines, ""] if lines else []


def write_table(results: list[dict], path: Path, argv: list[str], steps_cap: int) -> None:
    from agnews_lora.checkpoint import atomic_write_json, atomic_write_text
    from agnews_lora.report import md_table
    from agnews_lora.study import commit as git_commit, machine

    commit = git_commit(ROOT)
    command = f"python benchmarks/sweep_pruning.py {shlex.join(argv)}".strip()
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    # the best by half the cap only once the arm has trained that much (before, it is not known yet)
    rows = [[r["pruner"], fmt(r["best"]), fmt(r.get("best_by_half")) if r["steps"] >= steps_cap // 2 else "not yet",
             "-" if r.get("steps_to_best") is None else f"{r['steps_to_best']:,}", r["complete"], r["pruned"],
             r["over_budget"], f"{r['steps']:,}" + ("" if r["reached_cap"] else " (cap not reached)"),
             f"{r['trial_seconds'] / 60:.1f} min"] for r in results]
    metric = results[0]["metric"]
    lines = ["# Sweep pruning: the same search with and without a pruner", "",
             f"- Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC at commit {commit}; machine of this call: {machine()}. "
             "The machine was shared with other jobs (wall times are indicative; the cap is in steps).",
             f"- Command of the call that wrote this table: `{command}`; the arms' trials may come from earlier "
             f"calls (slices), kept in their study databases ({Path(results[0]['study']).parent.name}). "
             f"Compute cap: {steps_cap:,} optimizer steps per arm.",
             *([line] if (line := machines_line(results)) else []), "",
             md_table(["Pruner", f"Best {metric}", f"Best by {steps_cap // 2:,} steps", "Steps to best", "Complete",
                       "Pruned", "Over budget", "Steps trained", "Trial time"], rows, align="lrrrrrrrr"), "",
             *verdict(results, steps_cap),
             "Best: the best objective over each arm's complete trials (each trial's best validation evaluation). "
             f"Best by {steps_cap // 2:,} steps: the same over the trials the arm had started and finished within "
             "half the cap (trials in start order, each with every step it trained). Steps to best: the steps the arm "
             "had trained, in the same order, when it first found its best. "
             "Pruned: stopped by the pruner at an evaluation; over budget: refused before training. Trial time: "
             "the trials' own durations summed over every call that trained the arm.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines))
    atomic_write_json(path.with_suffix(".json"), {"commit": commit, "command": command, "machine": str(machine()),
                                                  "steps_cap": steps_cap, "arms": results})


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "sweep-cpu-minilm.yaml"), help="sweep config")
    p.add_argument("--pruners", default="none,hyperband", help="comma-separated sweep.pruner values (arms)")
    p.add_argument("--steps-cap", type=int, required=True, help="optimizer steps every arm may train")
    p.add_argument("--seed", type=int, default=0, help="sampler seed of every arm")
    p.add_argument("--out", default=str(ROOT / "runs" / "sweep_pruning"), help="folder of the arms' sweeps")
    p.add_argument("--table", default=str(ROOT / "docs" / "results" / "generated" / "sweep_pruning.md"),
                   help="table to write")
    p.add_argument("--records", default=str(ROOT / "experiments" / "records" / "sweep_pruning"),
                   help="folder of the arms' study databases (committed: a later session whose --out is gone "
                        "continues each arm from its trials; '' = inside --out)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--max-minutes", type=float, default=0, help="start no trial after this many minutes in this "
                   "call (0: no limit); rerun to continue, e.g. between other jobs on a shared machine")
    args = p.parse_args(argv)
    args.pruners = [x.strip() for x in args.pruners.split(",") if x.strip()]
    bad = [x for x in args.pruners if x not in ("none", "median", "hyperband")]
    if bad or not args.pruners or args.steps_cap < 1:
        p.error("--pruners: none, median or hyperband; --steps-cap >= 1")
    args.out, args.table = Path(args.out).resolve(), Path(args.table).resolve()
    args.records = Path(args.records).resolve() if args.records else None
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    records = None if args.records is None else records_for(Path(args.config), args.seed, args.set, args.records)
    deadline = Deadline(time.monotonic() + 60 * args.max_minutes if args.max_minutes > 0 else None)
    results = [run_arm(Path(args.config), pruner=p, out=args.out, steps_cap=args.steps_cap, seed=args.seed,
                       overrides=args.set, records=records, deadline=deadline) for p in args.pruners]
    if not all(r["reached_cap"] for r in results):
        left = ", ".join(f"{r['pruner']} ({r['steps']:,} of {args.steps_cap:,} steps)" for r in results
                         if not r["reached_cap"])
        print(f"--max-minutes {args.max_minutes:g} reached; not at the cap yet: {left}; rerun to continue", flush=True)
    write_table(results, args.table, argv, args.steps_cap)
    print("RESULT " + json.dumps(results), flush=True)
    print(f"wrote {args.table}")


def main(argv: list[str] | None = None) -> int:
    from agnews_lora import study

    return study.run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
