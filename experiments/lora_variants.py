#!/usr/bin/env python3
"""Do LoRA's free variants beat plain LoRA under the budget? Each initialisation (lora.init), rank-
stabilised scaling (lora.rslora) and LoRA+ (train.loraplus_lr_ratio) against plain LoRA, with the
same rows, steps and seeds, paired over seeds and test rows.

    python experiments/lora_variants.py --dry-run          # the plan: arms, seeds, exact counts
    python experiments/lora_variants.py                    # trains + tests every run; resumable
    python experiments/lora_variants.py --arms lora,pissa,eva --seeds 3
    python experiments/lora_variants.py --table-only       # rewrite the table from finished runs
    python experiments/lora_variants.py --scale paper --arms lora,gaussian,lora_ga   # MPNet-base, paper rows 1,5,7
    python experiments/lora_variants.py --arms lora,loraplus,pissa --lrs 2.5e-4,5e-4,1e-3 --seeds 1   # each arm at its best rate

Arms: plain LoRA (lora.init=kaiming, the preset's), each initialisation peft offers on these
encoders (gaussian, pissa, olora, eva, corda, lora_ga), rsLoRA, and LoRA+ (B matrices at
--loraplus-ratio x the learning rate). None adds a parameter: every arm has the preset's exact count.

Conditions (every arm): configs/cpu-minilm.yaml (the MiniLM stand-in, LoRA r=16 alpha=32 on query,
key, value and every dense projection, its head, learning rate and schedule) with --rows training
rows (a stratified seeded draw of the three offline train files after 640 validation rows are set
aside) and --steps optimizer steps of batch 16; validation half-way and at the end, the better
checkpoint scored on all 7,600 test rows. --seeds N trains every arm with seeds 42, 43, ... (the seed
also draws the rows and their order: one seed, the same rows and batches for every arm).

--scale paper runs the chosen arms on MPNet-base (roberta-base's sizes) under the paper table's
conditions instead (experiments/paper_table.py: its rows --paper-rows, default 1, 5 and 7; 400 steps
of batch 16 over 6,400 rows, max length 96, the same validation rows and schedule): each arm is the
row's own configuration plus the arm's keys, paired with plain LoRA on the same row. Its runs are
named ARM-ROW (e.g. pissa-5-targeted), its records and table are its own
(docs/results/lora-variants-paper.md by default).

Each run is `agnews-lora train` in a child process (agnews_lora.study), in its own folder under --out
(ARM, ARM.seedS). Resumable: a finished run is not rerun, an interrupted one resumes from its
checkpoint. Each finished run also leaves a record (its figures and every test row's prediction) in
experiments/records/lora_variants/, which is committed: a later session, whose run folders are gone,
skips the recorded runs and pairs the new ones with them. Runs go seed by seed (every arm at seed 42 first), so that a partial study already pairs
every arm with plain LoRA. The table (docs/results/lora-variants.md) and its JSON beside it are
rewritten after every run: per arm its test accuracy over seeds, and its difference from plain LoRA
paired by seed and test row (`seeds.paired_over_seeds`: a standard error from both the seeds and
the rows).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from agnews_lora import study
from agnews_lora.runs import RunFolder
from agnews_lora.study import Planned, Row, minutes, percent

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ROW_FILE = "lora_variants_row.json"  # per run folder: wall time and peak memory of the call that finished it
# Each finished run's figures and test predictions, committed, so that a later session (whose run
# folders are gone) resumes the study where it stopped and the table pairs every run it ever had.
RECORDS = ROOT / "experiments" / "records" / "lora_variants"
PRESET = ROOT / "configs" / "cpu-minilm.yaml"
PLAIN = "lora"
ARMS = {  # arm -> (title, overrides beyond the common ones)
    "lora": ("LoRA (kaiming init)", ()),
    "gaussian": ("Gaussian init", ("lora.init=gaussian",)),
    "pissa": ("PiSSA", ("lora.init=pissa",)),
    "olora": ("OLoRA", ("lora.init=olora",)),
    "eva": ("EVA", ("lora.init=eva",)),
    "corda": ("CorDA (IPM)", ("lora.init=corda",)),
    "lora_ga": ("LoRA-GA", ("lora.init=lora_ga",)),
    "rslora": ("rsLoRA", ("lora.rslora=true",)),
    "loraplus": ("LoRA+", ()),  # its ratio from --loraplus-ratio
}


def arm_extra(args: argparse.Namespace, arm: str) -> tuple[str, ...]:
    """The overrides that make `arm` out of plain LoRA."""
    return (f"train.loraplus_lr_ratio={args.loraplus_ratio:g}",) if arm == "loraplus" else ARMS[arm][1]


def unit_key(arm: str, paper_row: str | None, lr: float | None = None) -> str:
    """A run's name without its seed: the arm (screen scale) or ARM-ROW (paper scale), then -lrX
    for a learning rate other than the preset's (--lrs)."""
    return (arm if paper_row is None else f"{arm}-{paper_row}") + ("" if lr is None else "-lr" + f"{lr:g}".replace(".", "p"))


@functools.cache
def paper_table():
    """experiments/paper_table.py as a module: the paper table's rows and conditions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "experiments" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paper_arm_rows(args: argparse.Namespace) -> list[Row]:
    """--scale paper: every arm on every chosen paper-table row, as paper_table.py trains the row
    (its preset, the table's common conditions, the row's settings), plus the arm's keys.
    The backbone is args.model_dir, which run() located (--model-dir, else MPNet-base from ../shared/tools)."""
    from dataclasses import replace

    from agnews_lora.errors import ConfigError

    table = paper_table()
    ns = table.parse_args(["--out", str(args.out), "--steps", str(args.steps), "--data-dir", args.data_dir,
                           "--rows", args.paper_rows, *[a for kv in args.set for a in ("--set", kv)]])
    ns.model_dir = args.model_dir
    chosen = table.select_rows(ns.rows)
    if any(r.command == "distill" for r in chosen):
        raise ConfigError(f"--paper-rows {args.paper_rows}: distillation rows (2, 3, 4) need a teacher; choose "
                          "rows that train directly (1, 5, 6, 7)")
    rows = []
    for prow in chosen:
        full = table.full_row(prow, ns)
        for arm in args.arms:
            key = unit_key(arm, prow.name)
            rows.append(replace(full, name=key, title=f"{ARMS[arm][0]}, row {prow.name}", overrides=(
                *full.overrides, *arm_extra(args, arm), f"out_dir={args.out / key}", f"name=lora-variants-{key}")))
    return rows


def arm_rows(args: argparse.Namespace) -> list[Row]:
    """Every arm at every seed, seed-major (all arms at the first seed, then the next)."""
    if args.scale == "paper":
        by_seed = study.with_seeds(paper_arm_rows(args), args.seeds)
    else:
        by_seed = study.with_seeds(screen_rows(args), args.seeds)
    seed_of = {r.name: ([o.split("=", 1)[1] for o in r.overrides if o.startswith("train.seed=")] or [""])[-1]
               for r in by_seed}  # the last train.seed wins, as in the config
    return sorted(by_seed, key=lambda r: (seed_of[r.name] != "", seed_of[r.name]))  # the rows' own seed first


def screen_rows(args: argparse.Namespace) -> list[Row]:
    """Every arm under configs/cpu-minilm.yaml at the screen's rows and steps (one seed)."""
    data = Path(args.data_dir)
    common = [f"data.test={data / study.AG_NEWS_TEST}", "data.train=" + ",".join(str(data / f) for f in study.AG_NEWS_TRAIN),
              f"data.max_train_rows={args.rows}", f"train.max_steps={args.steps}",
              f"train.eval_every={args.steps // 2 + 1}", "train.progress=false", *args.set]
    rows = []
    for lr in args.lrs:
        for arm in args.arms:
            key = unit_key(arm, None, lr)
            rows.append(Row(name=key, config=str(PRESET), title=ARMS[arm][0] + ("" if lr is None else f", lr {lr:g}"),
                            overrides=(*common, *([] if lr is None else [f"train.lr={lr!r}"]), *arm_extra(args, arm),
                                       f"out_dir={args.out / key}", f"name=lora-variants-{key}")))
    return rows


def units(args: argparse.Namespace) -> list[tuple[str, str, str | None, float | None]]:
    """(run name without seed, arm, paper row or None, learning rate or None for the preset's) of
    every arm this study can have at its --lrs."""
    if args.scale == "paper":
        rows = [r.name for r in paper_table().ROWS]
        return [(unit_key(arm, row), arm, row, None) for row in rows for arm in ARMS]
    return [(unit_key(arm, None, lr), arm, None, lr) for lr in args.lrs for arm in ARMS]


def records_dir(args: argparse.Namespace) -> Path:
    """Where this study's conditions keep their records: --records (committed) for the study's
    own conditions; OUT/records with --set overrides (those runs are the user's own study, so
    their records stay with their runs)."""
    root = args.out / "records" if args.set else args.records
    if args.scale == "paper":
        return root / f"paper_steps{args.steps}_loraplus{args.loraplus_ratio:g}"
    return root / f"rows{args.rows}_steps{args.steps}_loraplus{args.loraplus_ratio:g}"


def record_runs(args: argparse.Namespace) -> None:
    """Write a record for every finished run folder that has none yet."""
    folder = records_dir(args)
    from agnews_lora.checkpoint import atomic_write_json

    for key, arm, paper_row, lr in units(args):  # key has no dot: a dot starts the seed suffix
        for path in study.seed_runs(args.out / key):
            run = RunFolder(path)
            seed = run.config().train.seed
            dest = folder / f"{key}.seed{seed}.json"
            preds, summary = run.test_predictions(), run.summary()
            if dest.is_file() or preds is None:
                continue
            row = study.read_record(path, ROW_FILE) or {}
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(dest, {
                "arm": arm, **({"row": paper_row} if paper_row else {}), **({"lr": lr} if lr is not None else {}),
                "seed": seed, "commit": args.commit, "machine": str(study.machine()),
                "finished": row.get("finished"), "wall_seconds": row.get("wall_seconds"),
                "test_accuracy": summary.get("test_accuracy"), "best_val_accuracy": summary.get("best_val_accuracy"),
                "train_seconds": summary.get("train_seconds"), "trainable": summary["trainable"]["total"],
                # one digit per test row, in file order: gold label and predicted class
                "labels": "".join(map(str, preds["labels"].tolist())),
                "preds": "".join(map(str, preds["preds"].tolist()))})


def finished(args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """run name without seed (the arm, or ARM-ROW) -> {seed: record} for every run recorded (this
    session's and earlier sessions'), arms in ARMS order (rows first at the paper scale)."""
    import numpy as np

    record_runs(args)
    folder = records_dir(args)
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec["arm"] in ARMS:
            rec["labels"] = np.frombuffer(rec["labels"].encode(), dtype=np.uint8) - ord("0")
            rec["preds"] = np.frombuffer(rec["preds"].encode(), dtype=np.uint8) - ord("0")
            out.setdefault(unit_key(rec["arm"], rec.get("row"), rec.get("lr")), {})[rec["seed"]] = rec
    return {key: out[key] for key, *_ in units(args) if key in out}


def paired_difference(runs: dict[int, dict], base: dict[int, dict]) -> dict | None:
    """`runs` minus `base` (seed -> record; plain LoRA, or the arm itself at the preset's rate), paired
    by seed and test row over the seeds both have, with the seeds whose two runs ran on different
    CPUs; None without a shared seed or when the runs scored other test rows."""
    import numpy as np

    from agnews_lora.seeds import paired_over_seeds

    shared = sorted(set(runs) & set(base))
    labels = base[shared[0]]["labels"] if shared else None
    if not shared or not all(np.array_equal(runs[s]["labels"], labels) for s in shared):
        return None
    diff = paired_over_seeds(labels, {s: runs[s]["preds"] for s in shared}, {s: base[s]["preds"] for s in shared})
    # seeds whose two runs ran on different CPUs (bf16 kernels differ): paired all the same
    diff["cross_machine_seeds"] = [s for s in shared if runs[s]["machine"] != base[s]["machine"]]
    return diff


def compare(found: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per arm: test and validation accuracy over its seeds, train time, and the difference from plain
    LoRA paired by seed and test row (None for plain LoRA or without a shared seed)."""
    from agnews_lora.seeds import spread

    out = {}
    for key, runs in found.items():
        first = next(iter(runs.values()))
        arm, paper_row, lr = first["arm"], first.get("row"), first.get("lr")
        plain = found.get(unit_key(PLAIN, paper_row, lr))
        diff = paired_difference(runs, plain) if arm != PLAIN and plain else None
        out[key] = {"title": ARMS[arm][0], "arm": arm, "row": paper_row, "lr": lr, "seeds": sorted(runs),
                    "test": spread([r["test_accuracy"] for r in runs.values()]),
                    "val": spread([r["best_val_accuracy"] for r in runs.values()]),
                    "train_seconds": spread([r["train_seconds"] for r in runs.values()]),
                    "trainable": sorted({r["trainable"] for r in runs.values()}),
                    "machines": sorted({r["machine"] for r in runs.values()}),
                    "vs_plain": diff}
    return out


def chosen_by_validation(found: dict[str, dict[int, dict]], preset_lr: float) -> dict[str, dict]:
    """--lrs: per arm, the learning rate with the best mean validation accuracy over the seeds the
    arm has at every rate it ran (so each rate is judged on the same seeds; test rows play no part in
    the choice), and at that rate, over those seeds, its test accuracy minus plain LoRA's at plain
    LoRA's own validation-chosen rate and minus its own at the preset's rate (None when the preset's
    rate was chosen or not run), each paired by seed and test row. Arms that ran at one rate only,
    or at no seed common to their rates, are left out."""
    import numpy as np

    from agnews_lora.seeds import spread

    by_arm: dict[str, dict[float | None, dict[int, dict]]] = {}
    for runs in found.values():
        first = next(iter(runs.values()))
        by_arm.setdefault(first["arm"], {})[first.get("lr")] = runs
    best = {}
    for arm, at in list(by_arm.items()):
        common = set.intersection(*(set(runs) for runs in at.values()))
        if not common:
            del by_arm[arm]
            continue
        at = {lr: {seed: runs[seed] for seed in sorted(common)} for lr, runs in at.items()}
        # the best mean validation accuracy; a tie goes to the preset's rate (None), then the lower one
        lr = max(at, key=lambda r: (float(np.mean([x["best_val_accuracy"] for x in at[r].values()])), r is None,
                                    -(r or 0.0)))
        best[arm] = (lr, at[lr], at.get(None))
    out = {}
    for arm, (lr, runs, at_preset) in best.items():
        if len(by_arm[arm]) < 2:
            continue
        diff = paired_difference(runs, best[PLAIN][1]) if arm != PLAIN and PLAIN in best else None
        # what choosing the rate bought: the arm at its chosen rate minus itself at the preset's rate
        gain = paired_difference(runs, at_preset) if lr is not None and at_preset else None
        out[arm] = {"title": ARMS[arm][0], "lr": lr,
                    "lrs_tried": sorted(by_arm[arm], key=lambda r: rate(r, preset_lr)),
                    "val": spread([r["best_val_accuracy"] for r in runs.values()]),
                    "test": spread([r["test_accuracy"] for r in runs.values()]), "seeds": sorted(runs),
                    "vs_plain": diff, "vs_preset_rate": gain}
    return {arm: out[arm] for arm in ARMS if arm in out}


def pooled_over_rows(found: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Paper scale: per variant arm, its difference from plain LoRA over every (paper row, seed) pair
    that both have, paired by test row. `paired_over_seeds` treats each pair as a replicate, so its
    standard error counts how the difference moves between paper rows and seeds as well as between
    test rows. Arms without a pair, or whose runs scored other test rows, are left out."""
    import numpy as np

    from agnews_lora.seeds import paired_over_seeds

    arm_preds: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    labels = None
    for runs in found.values():
        for seed, rec in runs.items():
            if labels is None:
                labels = rec["labels"]
            elif not np.array_equal(rec["labels"], labels):
                return {}
            arm_preds.setdefault(rec["arm"], {})[(rec["row"], seed)] = rec["preds"]
    plain = arm_preds.get(PLAIN, {})
    out = {}
    for arm, preds in arm_preds.items():
        if arm != PLAIN and (diff := paired_over_seeds(labels, preds, plain)) is not None:
            out[arm] = {"title": ARMS[arm][0], **diff,
                        "paired_seeds": [f"{row} seed {seed}" for row, seed in diff["paired_seeds"]]}
    return {arm: out[arm] for arm in ARMS if arm in out}


def rate(lr: float | None, preset_lr: float) -> float:
    """The learning rate a run trained at: its --lrs rate, or the preset's (None)."""
    return preset_lr if lr is None else lr


def _cell(d: dict | None) -> str:
    if d is None:
        return "-"
    beyond = abs(d["difference"]) > 2 * d["se"]
    cross = d.get("cross_machine_seeds") or []
    return (f"{100 * d['difference']:+.2f} ± {100 * d['se']:.2f}" + (" **beyond 2 se**" if beyond else "")
            + (f" (seed {', '.join(map(str, cross))} paired across CPUs)" if cross else ""))


def write_table(args: argparse.Namespace, argv: list[str]) -> bool:
    """docs/results/lora-variants.md and .json from the finished runs (False when none has finished)."""
    from agnews_lora.checkpoint import atomic_write_json, atomic_write_text
    from agnews_lora.report import md_table

    # the arms asked for (--arms): a study of a few arms is not cluttered by the others' records
    found = {key: runs for key, runs in finished(args).items() if next(iter(runs.values()))["arm"] in args.arms}
    if not found:
        return False
    results = compare(found)
    records = sorted((r for runs in found.values() for r in runs.values() if r.get("finished")),
                     key=lambda r: r["finished"])
    # the conditions every run shares (the paper scale's backbone folder was located once, in run())
    cfg = study.resolve(arm_rows(args)[0])
    paper = args.scale == "paper"
    several_lrs = len(args.lrs) > 1
    machines = sorted({m for r in results.values() for m in r["machines"]})
    rows = []
    for r in results.values():
        t, v, secs = r["test"], r["val"], r["train_seconds"]
        sd = lambda s: "" if s["sd"] is None else f" ± {100 * s['sd']:.2f}"  # noqa: E731
        rows.append([*([r["row"]] if paper else []), r["title"],
                     *([f"{rate(r['lr'], args.preset_lr):g}"] if several_lrs else []),
                     f"{r['trainable'][0]:,}" if len(r["trainable"]) == 1 else str(r["trainable"]),
                     len(r["seeds"]), f"{percent(v['mean'])}{sd(v)}", f"{percent(t['mean'])}{sd(t)}",
                     _cell(r["vs_plain"]), minutes(secs["mean"])])
    wall = sum(r["wall_seconds"] or 0 for r in records)
    pooled = pooled_over_rows(found) if paper else {}
    chosen = chosen_by_validation(found, args.preset_lr) if several_lrs else {}
    if paper:
        every = (f"- Every run: a row of the paper table (`experiments/paper_table.py`, the row's preset and "
                 f"settings) on MPNet-base (roberta-base's sizes), {cfg.train.max_steps} optimizer steps of batch "
                 f"{cfg.train.batch_size} over {cfg.data.max_train_rows:,} training rows, max length "
                 f"{cfg.data.max_length}, lr {cfg.train.lr:g}, {cfg.train.scheduler} schedule; validation at steps "
                 f"{cfg.train.eval_every} and {cfg.train.max_steps}, the better checkpoint scored on all test rows. "
                 f"Each arm adds its keys to the row; it is paired with plain LoRA on the same row. LoRA+ ratio "
                 f"{args.loraplus_ratio:g}; data-driven inits read {cfg.lora.init_batches} training batches.")
    else:
        every = (f"- Every run: `configs/cpu-minilm.yaml` ({cfg.model.name}, LoRA r={cfg.lora.r} "
                 f"alpha={cfg.lora.alpha:g} on {', '.join(cfg.lora.target_modules)}, {cfg.model.head} head, lr "
                 + (f"as in the LR column (the preset's is {args.preset_lr:g})" if several_lrs else f"{cfg.train.lr:g}")
                 + f", {cfg.train.scheduler} schedule) with {cfg.data.max_train_rows:,} training rows "
                 f"and {cfg.train.max_steps} optimizer steps of batch {cfg.train.batch_size}; validation at steps "
                 f"{cfg.train.eval_every} and {cfg.train.max_steps}, the better checkpoint scored on all test rows. "
                 f"LoRA+ ratio {args.loraplus_ratio:g}; data-driven inits read {cfg.lora.init_batches} training "
                 "batches.")
    count = sum(len(f) for f in found.values())
    lines = [f"# LoRA variants against plain LoRA ({'MPNet-base, paper table rows' if paper else 'MiniLM stand-in'})",
             "",
             f"- Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {count} finished "
             f"run{'s' if count != 1 else ''}" + (f" (finished between {records[0]['finished'][:16]} and "
                                                 f"{records[-1]['finished'][:16]} UTC, wall time {minutes(wall)})"
                                                 if records else "") + ".",
             f"- Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}. The machine was shared with other "
             "jobs, and a study that spans sessions may run on more than one CPU: training times are indicative. "
             "Accuracy does not depend on the load, but bf16 kernels differ between CPUs (the MiniLM screen's "
             "plain LoRA at seed 42: 90.57% on an Intel Xeon with AMX, 90.51% on an AMD EPYC with AVX-512 BF16), so each run's record "
             "names its machine.",
             f"- Commit: {args.commit} (each run's own is in its record, experiments/records/lora_variants). "
             f"Command: `python experiments/lora_variants.py {shlex.join(argv)}`.",
             every, "",
             md_table([*(["Paper row"] if paper else []), "Arm", *(["LR"] if several_lrs else []), "Trainable",
                       "Seeds", "Val acc", "Test acc", "vs LoRA (paired)", "Train time"], rows,
                      align=("l" if paper else "") + "l" + ("r" if several_lrs else "") + "rrrrrr"), "",
             "Val and test accuracy: mean ± standard deviation over the seeds. vs LoRA (paired): the arm's test "
             f"accuracy minus plain LoRA's{' on the same paper row' if paper else ''}"
             f"{' at the same learning rate' if several_lrs else ''}, in points, over the seeds both "
             "have and the same 7,600 test rows, ± its "
             "standard error from both the seeds and the rows (`agnews_lora.seeds.paired_over_seeds`); "
             "**beyond 2 se** marks a difference larger than two standard errors. With one seed the error "
             "counts the rows only (how a second seed moves a run is not measured). \"paired across CPUs\": at that seed the "
             "arm and plain LoRA ran on different machines, so the pair also carries the CPUs' bf16 difference (0.06 "
             "points for plain LoRA at seed 42). Train time: optimizer steps "
             "only, mean over seeds.", ""]
    if chosen:
        cell = lambda s: f"{percent(s['mean'])}" + ("" if s["sd"] is None else f" ± {100 * s['sd']:.2f}")  # noqa: E731
        lines += ["## Each arm at its learning rate chosen on validation", "",
                  md_table(["Arm", "Rates tried", "Chosen on validation", "Val acc", "Test acc",
                            "vs LoRA at its chosen rate", "vs itself at the preset's rate"],
                           [[d["title"], ", ".join(f"{rate(lr, args.preset_lr):g}" for lr in d["lrs_tried"]),
                             f"{rate(d['lr'], args.preset_lr):g}", cell(d["val"]), cell(d["test"]),
                             _cell(d["vs_plain"]), _cell(d["vs_preset_rate"])]
                            for d in chosen.values()],
                           align="llrrrrr"), "",
                  "Each arm's rate is the one with the best mean validation accuracy (the 640 validation rows; a "
                  "tie keeps the preset's rate) over the seeds the arm has at every rate it ran, so each rate is "
                  "judged on the same seeds, and the figures in this section are over those seeds only; no test "
                  "row takes part in the choice. The test figures are then read at that rate and paired with "
                  "plain LoRA at plain LoRA's own chosen rate (same seeds and test rows), and with the arm itself "
                  "at the preset's rate: what choosing the rate on validation bought on the test rows (\"-\" where "
                  "validation kept the preset's rate).", ""]
    if pooled:
        lines += ["## Pooled over the paper rows", "",
                  md_table(["Arm", "Pairs (paper row, seed)", "vs LoRA (paired)"],
                           [[d["title"], len(d["paired_seeds"]), _cell(d)] for d in pooled.values()], align="lrr"), "",
                  "The arm's test accuracy minus plain LoRA's, averaged over every (paper row, seed) pair that both "
                  "have, each pair on the same 7,600 test rows. Each pair counts as one replicate of "
                  "`agnews_lora.seeds.paired_over_seeds`, so the standard error counts how the difference moves "
                  "between paper rows and seeds as well as between test rows: the figure is for the arm on these "
                  "recipes in general, not for one row.", ""]
    args.table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.table, "\n".join(lines))
    atomic_write_json(args.table.with_suffix(".json"),
                      {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": args.commit,
                       "machines": machines, "command": f"python experiments/lora_variants.py {shlex.join(argv)}",
                       "arms": {arm: {k: v for k, v in r.items()} for arm, r in results.items()},
                       **({"pooled_over_rows": pooled} if paper else {}),
                       **({"chosen_on_validation": chosen} if several_lrs else {})})
    return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("screen", "paper"), default="screen",
                   help="screen: configs/cpu-minilm.yaml on the MiniLM stand-in at --rows and --steps; paper: "
                        "MPNet-base under the paper table's conditions, on its rows --paper-rows")
    p.add_argument("--out", help="folder of the runs (default runs/lora_variants, or runs/lora_variants_paper)")
    p.add_argument("--records", default=str(RECORDS), help="folder of the committed run records")
    p.add_argument("--table", help="Markdown table to write; its JSON goes beside it (default "
                   "docs/results/lora-variants.md, or docs/results/lora-variants-paper.md)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default all: {','.join(ARMS)})")
    p.add_argument("--steps", type=int, help="optimizer steps of every run (default 625, or 400 at the paper scale)")
    p.add_argument("--rows", type=int, default=10_000, help="training rows of every run (screen scale)")
    p.add_argument("--paper-rows", default="1,5,7", help="paper scale: the paper table's rows (numbers or names) "
                   "that train directly (no distillation)")
    p.add_argument("--model-dir", help="paper scale: the backbone folder (default MPNet-base from "
                   "../shared/tools/get-mpnet-base.sh)")
    p.add_argument("--loraplus-ratio", type=float, default=8.0, help="LoRA+'s B learning-rate ratio")
    p.add_argument("--lrs", help="screen scale: comma-separated learning rates; every arm trains at each (default: "
                   "the preset's), and the table adds each arm at the rate its validation accuracy chooses")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "ag_news"), help="the offline AG News files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, after the study's own (repeatable)")
    p.add_argument("--max-runs", type=int, default=0, help="train at most N runs in this call (0: all); the rest "
                   "wait for the next call")
    p.add_argument("--dry-run", action="store_true", help="print the plan; train nothing")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from finished runs; train nothing")
    study.add_seeds_option(p)
    p.set_defaults(seeds=3)
    args = p.parse_args(argv)
    paper = args.scale == "paper"
    args.steps = args.steps or (400 if paper else 625)
    args.out = args.out or str(ROOT / "runs" / ("lora_variants_paper" if paper else "lora_variants"))
    args.table = args.table or str(ROOT / "docs" / "results" / ("lora-variants-paper.md" if paper else "lora-variants.md"))
    if args.steps < 2 or args.rows < 1 or args.loraplus_ratio <= 0 or args.max_runs < 0:
        p.error("--steps must be >= 2, --rows >= 1, --loraplus-ratio > 0, --max-runs >= 0")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        p.error(f"--arms: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(ARMS)}")
    args.arms = arms
    from agnews_lora.config import load_config

    args.preset_lr = load_config(str(PRESET)).train.lr
    lrs: list[float | None] = [None]  # None: the preset's rate (its runs keep their names and records)
    if args.lrs is not None:
        if paper:
            p.error("--lrs: the screen scale only (the paper scale runs the paper table's own rates)")
        lrs = []
        for text in (t.strip() for t in args.lrs.split(",")):
            try:
                lr = float(text)
            except ValueError:
                lr = math.nan
            if not (math.isfinite(lr) and lr > 0):
                p.error(f"--lrs: {text!r} is not a finite learning rate > 0")
            lr = None if lr == args.preset_lr else lr
            if lr not in lrs:
                lrs.append(lr)
    args.lrs = lrs
    args.out = Path(args.out).expanduser().resolve()
    args.table = Path(args.table).expanduser().resolve()
    args.records = Path(args.records).expanduser().resolve()
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    from agnews_lora.errors import ConfigError

    args.commit = study.commit(ROOT)
    if args.scale == "paper":  # located once: the planner's rows (7) build the backbone's shapes
        args.model_dir = study.resolve_model_dir(args.model_dir, SHARED / "tools" / "get-mpnet-base.sh")
    if args.table_only:
        if not write_table(args, argv):
            raise ConfigError(f"--table-only: no finished run in {args.out}")
        print(f"wrote {args.table}")
        return
    recorded = {(arm, seed) for arm, runs in finished(args).items() for seed in runs}
    planned: list[Planned] = study.plan(arm_rows(args))
    for p in planned:
        if p.status != "done" and (p.name.split(".")[0], p.cfg.train.seed) in recorded:
            p.status = "done"  # finished in an earlier session: its record is kept, its folder is gone
    todo = [p for p in planned if p.status != "done"]
    for p in planned:
        print(f"{p.name:<32} {p.trainable:>9,} trainable  {p.status}")
    if args.dry_run:
        return
    todo = todo[: args.max_runs] if args.max_runs else todo
    command = f"python experiments/lora_variants.py {shlex.join(argv)}".strip()
    for index, p in enumerate(todo, 1):
        study.run_row(p, index=index, count=len(todo), command=command, record=ROW_FILE)
        if write_table(args, argv):
            print(f"wrote {args.table}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, printed as one line)."""
    return study.run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
