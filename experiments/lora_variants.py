#!/usr/bin/env python3
"""Do LoRA's free variants beat plain LoRA under the budget? Each initialisation (lora.init), rank-
stabilised scaling (lora.rslora) and LoRA+ (train.loraplus_lr_ratio) against plain LoRA, with the
same rows, steps and seeds, paired over seeds and test rows.

    python experiments/lora_variants.py --dry-run          # the plan: arms, seeds, exact counts
    python experiments/lora_variants.py                    # trains + tests every run; resumable
    python experiments/lora_variants.py --arms lora,pissa,eva --seeds 3
    python experiments/lora_variants.py --table-only       # rewrite the table from finished runs

Arms: plain LoRA (lora.init=kaiming, the preset's), each initialisation peft offers on these
encoders (gaussian, pissa, olora, eva, corda, lora_ga), rsLoRA, and LoRA+ (B matrices at
--loraplus-ratio x the learning rate). None adds a parameter: every arm has the preset's exact count.

Conditions (every arm): configs/cpu-minilm.yaml (the MiniLM stand-in, LoRA r=16 alpha=32 on query,
key, value and every dense projection, its head, learning rate and schedule) with --rows training
rows (a stratified seeded draw of the three offline train files after 640 validation rows are set
aside) and --steps optimizer steps of batch 16; validation half-way and at the end, the better
checkpoint scored on all 7,600 test rows. --seeds N trains every arm with seeds 42, 43, ... (the seed
also draws the rows and their order: one seed, the same rows and batches for every arm).

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
import json
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


def arm_rows(args: argparse.Namespace) -> list[Row]:
    """Every arm at every seed, seed-major (all arms at the first seed, then the next)."""
    data = Path(args.data_dir)
    common = [f"data.test={data / study.AG_NEWS_TEST}", "data.train=" + ",".join(str(data / f) for f in study.AG_NEWS_TRAIN),
              f"data.max_train_rows={args.rows}", f"train.max_steps={args.steps}",
              f"train.eval_every={args.steps // 2 + 1}", "train.progress=false", *args.set]
    rows = []
    for arm in args.arms:
        title, extra = ARMS[arm]
        if arm == "loraplus":
            extra = (f"train.loraplus_lr_ratio={args.loraplus_ratio:g}",)
        rows.append(Row(name=arm, config=str(PRESET), title=title,
                        overrides=(*common, *extra, f"out_dir={args.out / arm}", f"name=lora-variants-{arm}")))
    by_seed = study.with_seeds(rows, args.seeds)
    seed_of = {r.name: next((o.split("=", 1)[1] for o in r.overrides if o.startswith("train.seed=")), "")
               for r in by_seed}
    return sorted(by_seed, key=lambda r: (seed_of[r.name] != "", seed_of[r.name]))  # the rows' own seed first


def records_dir(args: argparse.Namespace) -> Path | None:
    """Where this study's conditions keep their records (None with --set overrides: those runs
    are the user's own study, not this one's)."""
    if args.set:
        return None
    return args.records / f"rows{args.rows}_steps{args.steps}_loraplus{args.loraplus_ratio:g}"


def record_runs(args: argparse.Namespace) -> None:
    """Write a record for every finished run folder that has none yet."""
    folder = records_dir(args)
    if folder is None:
        return
    from agnews_lora.checkpoint import atomic_write_json

    for arm in ARMS:
        for path in study.seed_runs(args.out / arm):
            run = RunFolder(path)
            seed = run.config().train.seed
            dest = folder / f"{arm}.seed{seed}.json"
            preds, summary = run.test_predictions(), run.summary()
            if dest.is_file() or preds is None:
                continue
            row = study.read_record(path, ROW_FILE) or {}
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(dest, {
                "arm": arm, "seed": seed, "commit": args.commit, "machine": str(study.machine()),
                "finished": row.get("finished"), "wall_seconds": row.get("wall_seconds"),
                "test_accuracy": summary.get("test_accuracy"), "best_val_accuracy": summary.get("best_val_accuracy"),
                "train_seconds": summary.get("train_seconds"), "trainable": summary["trainable"]["total"],
                # one digit per test row, in file order: gold label and predicted class
                "labels": "".join(map(str, preds["labels"].tolist())),
                "preds": "".join(map(str, preds["preds"].tolist()))})


def finished(args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """arm -> {seed: record} for every run recorded (this session's and earlier sessions')."""
    import numpy as np

    record_runs(args)
    folder = records_dir(args)
    out: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec["arm"] in ARMS:
            rec["labels"] = np.frombuffer(rec["labels"].encode(), dtype=np.uint8) - ord("0")
            rec["preds"] = np.frombuffer(rec["preds"].encode(), dtype=np.uint8) - ord("0")
            out.setdefault(rec["arm"], {})[rec["seed"]] = rec
    return {arm: out[arm] for arm in ARMS if arm in out}


def compare(found: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per arm: test and validation accuracy over its seeds, train time, and the difference from plain
    LoRA paired by seed and test row (None for plain LoRA or without a shared seed)."""
    import numpy as np

    from agnews_lora.seeds import paired_over_seeds, spread

    out = {}
    for arm, runs in found.items():
        diff = None
        if arm != PLAIN and PLAIN in found:
            shared = sorted(set(runs) & set(found[PLAIN]))
            labels = found[PLAIN][shared[0]]["labels"] if shared else None
            if shared and all(np.array_equal(runs[s]["labels"], labels) for s in shared):
                diff = paired_over_seeds(labels, {s: runs[s]["preds"] for s in shared},
                                         {s: found[PLAIN][s]["preds"] for s in shared})
                # seeds whose two runs ran on different CPUs (bf16 kernels differ): paired all the same
                diff["cross_machine_seeds"] = [s for s in shared if runs[s]["machine"] != found[PLAIN][s]["machine"]]
        out[arm] = {"title": ARMS[arm][0], "seeds": sorted(runs),
                    "test": spread([r["test_accuracy"] for r in runs.values()]),
                    "val": spread([r["best_val_accuracy"] for r in runs.values()]),
                    "train_seconds": spread([r["train_seconds"] for r in runs.values()]),
                    "trainable": sorted({r["trainable"] for r in runs.values()}),
                    "machines": sorted({r["machine"] for r in runs.values()}),
                    "vs_plain": diff}
    return out


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

    found = finished(args)
    if not found:
        return False
    results = compare(found)
    records = sorted((r for runs in found.values() for r in runs.values() if r.get("finished")),
                     key=lambda r: r["finished"])
    cfg = study.resolve(arm_rows(args)[0])  # the conditions every run shares
    machines = sorted({m for r in results.values() for m in r["machines"]})
    rows = []
    for arm, r in results.items():
        t, v, secs = r["test"], r["val"], r["train_seconds"]
        sd = lambda s: "" if s["sd"] is None else f" ± {100 * s['sd']:.2f}"  # noqa: E731
        rows.append([r["title"], f"{r['trainable'][0]:,}" if len(r["trainable"]) == 1 else str(r["trainable"]),
                     len(r["seeds"]), f"{percent(v['mean'])}{sd(v)}", f"{percent(t['mean'])}{sd(t)}",
                     "-" if arm == PLAIN else _cell(r["vs_plain"]), minutes(secs["mean"])])
    wall = sum(r["wall_seconds"] or 0 for r in records)
    lines = ["# LoRA variants against plain LoRA (MiniLM stand-in)", "",
             f"- Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {sum(len(f) for f in found.values())} "
             f"finished runs" + (f" (finished between {records[0]['finished'][:16]} and {records[-1]['finished'][:16]} "
                                 f"UTC, wall time {minutes(wall)})" if records else "") + ".",
             f"- Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}. The machine was shared with other "
             "jobs, and a study that spans sessions may run on more than one CPU: training times are indicative. "
             "Accuracy does not depend on the load, but bf16 kernels differ between CPUs (plain LoRA at seed 42: "
             "90.57% on an Intel Xeon with AMX, 90.51% on an AMD EPYC with AVX-512 BF16), so each run's record "
             "names its machine.",
             f"- Commit: {args.commit} (each run's own is in its record, experiments/records/lora_variants). "
             f"Command: `python experiments/lora_variants.py {shlex.join(argv)}`.",
             f"- Every run: `configs/cpu-minilm.yaml` ({cfg.model.name}, LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} "
             f"on {', '.join(cfg.lora.target_modules)}, {cfg.model.head} head, lr {cfg.train.lr:g}, "
             f"{cfg.train.scheduler} schedule) with {cfg.data.max_train_rows:,} training rows and "
             f"{cfg.train.max_steps} optimizer steps of batch {cfg.train.batch_size}; validation at steps "
             f"{cfg.train.eval_every} and {cfg.train.max_steps}, the better checkpoint scored on all test rows. "
             f"LoRA+ ratio {args.loraplus_ratio:g}; data-driven inits read {cfg.lora.init_batches} training batches.",
             "",
             md_table(["Arm", "Trainable", "Seeds", "Val acc", "Test acc", "vs LoRA (paired)", "Train time"], rows,
                      align="lrrrrrr"), "",
             "Val and test accuracy: mean ± standard deviation over the seeds. vs LoRA (paired): the arm's test "
             "accuracy minus plain LoRA's, in points, over the seeds both have and the same 7,600 test rows, ± its "
             "standard error from both the seeds and the rows (`agnews_lora.seeds.paired_over_seeds`); "
             "**beyond 2 se** marks a difference larger than two standard errors. With one seed the error "
             "counts the rows only (how a second seed moves a run is not measured). \"paired across CPUs\": at that seed the "
             "arm and plain LoRA ran on different machines, so the pair also carries the CPUs' bf16 difference (0.06 "
             "points for plain LoRA at seed 42). Train time: optimizer steps "
             "only, mean over seeds.", ""]
    args.table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.table, "\n".join(lines))
    atomic_write_json(args.table.with_suffix(".json"),
                      {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": args.commit,
                       "machines": machines, "command": f"python experiments/lora_variants.py {shlex.join(argv)}",
                       "arms": {arm: {k: v for k, v in r.items()} for arm, r in results.items()}})
    return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "lora_variants"), help="folder of the runs")
    p.add_argument("--records", default=str(RECORDS), help="folder of the committed run records")
    p.add_argument("--table", default=str(ROOT / "docs" / "results" / "lora-variants.md"),
                   help="Markdown table to write; its JSON goes beside it")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default all: {','.join(ARMS)})")
    p.add_argument("--steps", type=int, default=625, help="optimizer steps of every run")
    p.add_argument("--rows", type=int, default=10_000, help="training rows of every run")
    p.add_argument("--loraplus-ratio", type=float, default=8.0, help="LoRA+'s B learning-rate ratio")
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
    if args.steps < 2 or args.rows < 1 or args.loraplus_ratio <= 0 or args.max_runs < 0:
        p.error("--steps must be >= 2, --rows >= 1, --loraplus-ratio > 0, --max-runs >= 0")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        p.error(f"--arms: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(ARMS)}")
    args.arms = arms
    args.out = Path(args.out).expanduser().resolve()
    args.table = Path(args.table).expanduser().resolve()
    args.records = Path(args.records).expanduser().resolve()
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    from agnews_lora.errors import ConfigError

    args.commit = study.commit(ROOT)
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
        print(f"{p.name:<20} {p.trainable:>9,} trainable  {p.status}")
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
