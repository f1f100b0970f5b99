#!/usr/bin/env python3
"""The paper's Table 2 on MPNet-base at the real 1,000,000-parameter budget, plus rows of our own.

One resumable command trains and tests every row under the same conditions and writes
docs/results/generated/paper_table.md (the table) and .png beside it (accuracy vs trainable parameters):

    python experiments/paper_table.py              # all rows -> runs/paper_table/<row>/, docs/results/generated/paper_table.*
    python experiments/paper_table.py --dry-run    # the plan: rows, exact trainable counts, time left
    python experiments/paper_table.py --rows 1,5   # a subset (the teacher comes along for KD rows)
    python experiments/paper_table.py --seeds 3    # every row with seeds 42, 43, 44 (runs/paper_table/<row>.seedS/)

MPNet-base (sentence-transformers/all-mpnet-base-v2, assembled by ../shared/tools/get-mpnet-base.sh)
has roberta-base's depth, widths and head, so every count equals the paper's; model.py maps the
module names (query -> attention.attn.q, ...). Each row starts from a preset in configs/:

  1 LoRA only          paper-lora-only.yaml: r=8, alpha=32, query+value, all layers, RoBERTa head: 888,580
  2 LoRA + KD          row 1's student distilled from the teacher (KD T=2, weight 0.5: paper-distill.yaml)
  3 LoRA + KD reduced  the same with a smaller student: r=4, alpha=16 (row 1's alpha/r): 741,124
  4 LoRA + KD tuned    paper-distill.yaml, the paper's best KD setup: student r=16, alpha=8 on query+value;
                       with the RoBERTa head that is 1,183,492 > 1M, so (as the preset) the linear head: 592,900
  5 targeted           paper-targeted.yaml: r=12, alpha=32, query+key of layers 0,1,5,10,11, LoRA dropout 0.05,
                       RoBERTa head with pooled dropout 0.2: 777,988
  6 ours               linear head (3,076) and the freed budget to LoRA on all six projections of every layer,
                       at the budget planner's largest rank (r=6: 998,404); alpha = 4r (row 1's scale)
  7 ours               linear head, LoRA on query, key, value, attn_out of every layer at the planner's largest
                       rank (r=13: 961,540); alpha = 4r
  teacher              row 1's configuration trained for twice the steps on twice the rows (one pass, a
                       separate stratified draw; the validation rows are excluded as for every row). Not a
                       table row: its training time plus the time for its logits is rows 2-4's teacher time.

Common conditions (chosen so the whole table fits under 2 hours of a 2-core CPU: 114 min measured; see --dry-run):
  - data: the three offline train files of ../shared/data/ag_news (never test). 640 validation rows are
    carved out first (stratified, seed 42), then a stratified seeded draw of steps x batch rows (6,400 at
    the defaults) is the training set: one pass, the same rows in the same batches for every row.
  - 400 optimizer steps of batch 16, max_length 96 (AG News p95 is ~90 tokens), AdamW lr 5e-4, cosine
    schedule with 6% warmup, weight decay 0.01, bf16 autocast where the CPU has it, seed 42.
  - validation at the half-way step and at the end; the better checkpoint is scored on all 7,600 test rows.
  The paper's per-row recipes (e.g. lr 3e-5 for 5 epochs with grad_accum 2 for the targeted row) were made
  for full epochs on a GPU; at a few hundred steps they would compare schedules rather than placements. So
  one schedule is shared, and rows differ only in what Table 2 varies: LoRA rank/alpha/dropout/placement,
  head, distillation.

Each row is `agnews-lora train|distill` in a child process (agnews_lora.study), the command --dry-run
prints. Resumable: a row whose folder holds summary.json is not rerun; a row interrupted after a checkpoint
resumes from it (train.resume=true), one interrupted before its first checkpoint restarts cleanly;
teacher logits are cached (distill.py). A finished row trained with other settings is an error, not
silently mixed into the table. The table is rewritten after every row, from the finished run folders.

--set KEY=VALUE (any config key, every row) and the size options let the same script run end to end in
seconds on a tiny model (tests/test_paper_table.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from agnews_lora import study
from agnews_lora.study import Planned, Row, minutes, percent

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ROW_FILE = "paper_table_row.json"  # per run folder: wall time of the call that finished it
# Time model for --dry-run, MPNet-base on this 2-core CPU (../shared/README.md): batch 16 under bf16
# autocast at AG News' ~55 tokens; a forward pass costs about a third of a training step.
SECONDS_PER_STEP = 1.3  # measured 2026-11-29: 1.1-1.9 s/step over the 8 runs (more LoRA modules, slower)
SECONDS_PER_SCORED_ROW = 0.016
SECONDS_PER_RUN = 30  # load weights, read and tokenize the data, write the report
TEST_ROWS = study.AG_NEWS_TEST_ROWS
OURS, PLAN_RANK = "ours", "plan_rank"  # row tags: a row of our own; lora.r = the planner's largest, alpha = 4 r

# name: run folder under --out (--rows takes it or its number); config: file in configs/.
ROWS = (
    Row("1-lora-only", config="paper-lora-only.yaml", title="LoRA only"),
    Row("2-distill", ("model.head=roberta", "lora.r=8", "lora.alpha=32"), config="paper-distill.yaml",
        command="distill", title="LoRA + distillation"),
    Row("3-distill-reduced", ("model.head=roberta", "lora.r=4", "lora.alpha=16"), config="paper-distill.yaml",
        command="distill", title="LoRA + distillation (reduced)"),
    Row("4-distill-tuned", config="paper-distill.yaml", command="distill", title="LoRA + distillation (tuned)"),
    Row("5-targeted", config="paper-targeted.yaml", title="Targeted LoRA modules"),
    Row("6-linear-all", ("model.head=linear", "lora.target_modules=[all]"), config="paper-lora-only.yaml",
        title="Ours: linear head, LoRA on every projection", tags={OURS, PLAN_RANK}),
    Row("7-linear-attention", ("model.head=linear", "lora.target_modules=[attention]"),
        config="paper-lora-only.yaml", title="Ours: linear head, LoRA on all attention projections",
        tags={OURS, PLAN_RANK}),
)
TEACHER = Row("teacher", config="paper-lora-only.yaml",
              title="Teacher (row 1's configuration, twice the steps and rows)")


# ---------------------------------------------------------------- the plan


def select_rows(spec: str | None) -> list[Row]:
    """Rows named by --rows (names or their numbers; all when None), the teacher first if KD needs it."""
    from agnews_lora.errors import ConfigError

    if spec is None:
        chosen = list(ROWS)
    else:
        by_key = {r.name: r for r in (TEACHER, *ROWS)} | {r.name.split("-")[0]: r for r in ROWS}
        unknown = [k for k in spec.split(",") if k.strip() and k.strip() not in by_key]
        if unknown:
            raise ConfigError(f"--rows: unknown {', '.join(unknown)}; choose from teacher, "
                              + ", ".join(r.name for r in ROWS) + " (or their numbers)")
        keys = {by_key[k.strip()].name for k in spec.split(",") if k.strip()}
        chosen = [r for r in (TEACHER, *ROWS) if r.name in keys]
    if any(r.command == "distill" for r in chosen) and TEACHER not in chosen:
        chosen.insert(0, TEACHER)
    return chosen


def common_overrides(args: argparse.Namespace, name: str, steps: int) -> list[str]:
    """The conditions every row shares (dotted overrides applied after the row's preset)."""
    data = Path(args.data_dir)
    return [f"name={name}", f"out_dir={args.out / name}", f"model.name={args.model_dir}",
            "data.train=" + ",".join(str(data / f) for f in study.AG_NEWS_TRAIN),
            f"data.test={data / study.AG_NEWS_TEST}",
            f"data.val_size={args.val_size}", f"data.max_train_rows={steps * args.batch_size}",
            f"data.max_length={args.max_length}", f"train.max_steps={steps}",
            f"train.batch_size={args.batch_size}", "train.grad_accum=1", f"train.eval_every={max(1, steps // 2)}",
            f"train.lr={args.lr}", "train.scheduler=cosine", "train.warmup_ratio=0.06",
            "train.weight_decay=0.01", "train.precision=auto", "train.seed=42"]


def full_row(row: Row, args: argparse.Namespace) -> Row:
    """The row as it trains: its preset's path, the common conditions, its own settings, the
    teacher (KD rows), the planner's rank (PLAN_RANK rows) and --set, in that order.

    Args:
        row: a row of ROWS (or TEACHER).
        args: parsed command line (sizes, paths, --set).

    Returns:
        The row with `config` and `overrides` complete.
    """
    from agnews_lora.config import load_config
    from agnews_lora.errors import ConfigError
    from agnews_lora.plan import plan_one

    steps = args.teacher_steps if row is TEACHER else args.steps
    overrides = common_overrides(args, row.name, steps) + list(row.overrides)
    if row.command == "distill":
        overrides.append(f"distill.teacher={args.out / TEACHER.name}")
    preset = str(ROOT / "configs" / row.config)
    if PLAN_RANK in row.tags:
        cfg = load_config(preset, overrides + args.set)
        r, _, _ = plan_one(cfg, modules=cfg.lora.target_modules, layers=cfg.lora.layers, head=cfg.model.head)
        if r is None:
            raise ConfigError(f"row {row.name}: even r=1 on {cfg.lora.target_modules} exceeds "
                              f"budget.max_trainable={cfg.budget.max_trainable:,}")
        overrides += [f"lora.r={r}", f"lora.alpha={4 * r}"]
    return replace(row, config=preset, overrides=tuple(overrides + args.set))


def row_label(cfg, distilled: bool) -> str:
    """What a row trains, from its resolved config: the method's own line (methods.describe),
    the head and, for a distilled row, the KD settings."""
    from agnews_lora.methods import describe

    head = {"roberta": "RoBERTa head", "linear": "linear head"}.get(cfg.model.head, cfg.model.head)
    text = f"{describe(cfg)}, {head} (pooled dropout {cfg.model.pooled_dropout:g})"
    if distilled:
        text += f", KD T={cfg.distill.temperature:g} weight {cfg.distill.alpha:g}"
    return text


def print_plan(planned: list[Planned], args: argparse.Namespace) -> None:
    measured = study.seconds_per_step(args.out / r.name for r in (TEACHER, *ROWS))
    per_step = measured or SECONDS_PER_STEP
    print(f"plan: {len(planned)} runs in {args.out} on {args.model_dir}")
    print(f"  {'row':<20} {'trainable':>10}  {'status':<8} {'est. min':>8}  configuration")
    # A finished KD row means the teacher's logits are cached; otherwise the first KD row pays for them.
    distilled = [p.row.command == "distill" for p in planned]
    total, logits_pending = 0.0, not any(d and p.status == "done" for d, p in zip(distilled, planned))
    for p, kd in zip(planned, distilled):
        logits = p.cfg.data.max_train_rows + p.cfg.data.val_size if kd and logits_pending else 0
        seconds = study.seconds_left(p, per_step=per_step, per_scored_row=SECONDS_PER_SCORED_ROW,
                                     per_run=SECONDS_PER_RUN, test_rows=TEST_ROWS, extra_rows=logits)
        logits_pending = logits_pending and not kd
        total += seconds
        print(f"  {p.name:<20} {p.trainable:>10,}  {p.status:<8} {seconds / 60:>8.1f}  "
              f"{p.row.title}: {row_label(p.cfg, kd)}")
        if args.dry_run:
            print(f"      agnews-lora {p.row.command} --config {Path(p.row.config).relative_to(ROOT)} "
                  f"{shlex.join(p.row.overrides)}")
    basis = (f"{measured:.2f} s/step measured on the finished rows" if measured else
             f"{SECONDS_PER_STEP} s/step, MPNet-base on 2 CPU cores")
    print(f"estimated time left: {total / 60:.0f} min ({basis}; {SECONDS_PER_SCORED_ROW} s per scored row)")


# ---------------------------------------------------------------- the table


def teacher_seconds(run_dir: Path) -> tuple[float | None, float] | None:
    """(teacher training seconds, seconds for its logits) of a distilled run; None when not distilled.
    The training part is None when the teacher's run folder is gone."""
    from agnews_lora.runs import TEACHER as TEACHER_RECORD
    from agnews_lora.runs import RunFolder, read_json

    record = read_json(RunFolder(run_dir) / TEACHER_RECORD)
    if record is None:
        return None
    summary = RunFolder(record["source"]).summary()
    trained = summary["train_seconds"] if summary is not None else None
    return trained, record["logits_computed_seconds"]


def conditions_line(run) -> str:
    """The shared training conditions, read back from a finished row's own config and summary."""
    cfg, s = run.cfg, run.summary
    rows = f"{cfg.data.max_train_rows:,}" if cfg.data.max_train_rows else "all"
    files = ", ".join(Path(f).name for f in cfg.data.train)
    precision = "fp32" if s.get("precision") == "no" else f"{s.get('precision')} autocast"
    return (f"{cfg.train.max_steps} optimizer steps of batch {cfg.train.batch_size} over {rows} training rows "
            f"(a stratified seeded draw from {files}, after {cfg.data.val_size} stratified validation rows "
            f"were set aside); max length {cfg.data.max_length}; AdamW lr {cfg.train.lr:g}, {cfg.train.scheduler} "
            f"schedule with {cfg.train.warmup_ratio:.0%} warmup, weight decay {cfg.train.weight_decay:g}; "
            f"{precision} on {s.get('device')}; seed {cfg.train.seed}; validation every {cfg.train.eval_every} "
            f"steps, the better checkpoint scored on all {run.test['n'] if run.test else '?':,} test rows.")


def table_rows(runs: dict, seeded: dict | None = None) -> list[list[str]]:
    """One line per finished row; with `seeded` (row name -> `study.over_seeds`), a column of test
    accuracy over the row's seeds."""
    rows = []
    for number, row in enumerate(ROWS, 1):
        run = runs.get(row.name)
        if run is None:
            continue
        teacher = teacher_seconds(run.path)
        s = run.summary
        rows.append([number, f"**{row.title}**: {row_label(run.cfg, teacher is not None)}",
                     f"{s['trainable']['total']:,}", percent(s.get("best_val_accuracy")),
                     percent(s.get("test_accuracy")), minutes(s["train_seconds"]),
                     _teacher_cell(teacher)] + ([study.seeds_cell(seeded.get(row.name))] if seeded else []))
    return rows


def _teacher_cell(teacher: tuple[float | None, float] | None) -> str:
    if teacher is None:
        return "-"
    trained, logits = teacher
    return f"? + {minutes(logits)} (teacher run missing)" if trained is None else minutes(trained + logits)


def verdict_lines(runs: dict) -> list[str]:
    """Best row of ours against the paper's targeted row, on test accuracy."""
    from agnews_lora.evaluate import accuracy_se

    ours = [runs[r.name] for r in ROWS if OURS in r.tags and r.name in runs]
    targeted = runs.get("5-targeted")
    if not ours or targeted is None or targeted.summary.get("test_accuracy") is None:
        return []
    best = max(ours, key=lambda run: run.summary.get("test_accuracy") or 0.0)
    a, b = best.summary["test_accuracy"], targeted.summary["test_accuracy"]
    n = targeted.test["n"] if targeted.test else TEST_ROWS
    se = accuracy_se(b, n)
    word = "beats" if a > b else "does not beat"
    return [f"Best row of ours ({best.name}, {best.summary['trainable']['total']:,} trainable) {word} the paper's "
            f"targeted row on test accuracy: {percent(a)} vs {percent(b)} ({100 * (a - b):+.2f} points; one "
            f"standard error of a test accuracy on {n:,} rows is about {100 * se:.2f} points)."]


def teacher_lines(out: Path, runs: dict) -> list[str]:
    from agnews_lora.report import load_run
    from agnews_lora.runs import RunFolder

    teacher = out / TEACHER.name
    distilled = [run for run in runs.values() if teacher_seconds(run.path)]
    if not distilled or RunFolder(teacher).status != "done":
        return []

    t = load_run(teacher)
    trained, logits = t.summary["train_seconds"], teacher_seconds(distilled[0].path)[1]
    numbers = ", ".join(r.name.split("-")[0] for r in distilled)
    return [f"Teacher time (row{'s' if len(distilled) > 1 else ''} {numbers}; one teacher, paid once): "
            f"training {minutes(trained)} ({t.cfg.train.max_steps} steps over {t.cfg.data.max_train_rows:,} rows, "
            f"{row_label(t.cfg, False)}; {t.summary['trainable']['total']:,} trainable, not counted against the "
            f"students' budget) + {minutes(logits)} for its logits on the students' training and validation rows. "
            f"Teacher validation accuracy {percent(t.summary.get('best_val_accuracy'))}, test accuracy "
            f"{percent(t.summary.get('test_accuracy'))}."]


def command_line(argv: list[str]) -> str:
    return f"python experiments/paper_table.py {shlex.join(argv)}".strip()


def provenance_lines(out: Path, argv: list[str]) -> list[str]:
    """Header lines: the command(s) that trained the rows, when, and the wall time they took."""
    records = study.read_records((f for r in (TEACHER, *ROWS) for f in (out / r.name, *out.glob(f"{r.name}.seed*"))),
                                 ROW_FILE)
    commands = list(dict.fromkeys(r["command"] for r in records if "command" in r)) or [command_line(argv)]
    lines = [f"- Command{'s' if len(commands) > 1 else ''}: " + "; ".join(f"`{c}`" for c in commands)]
    written = f"- Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC."
    if records:
        when = [datetime.fromisoformat(r["finished"]).strftime("%Y-%m-%d %H:%M") for r in (records[0], records[-1])]
        resumed = " (for resumed runs: the final call only)" if any(r["resumed"] for r in records) else ""
        wall = sum(r["wall_seconds"] for r in records)
        written += (f" Runs finished between {when[0]} and {when[1]} UTC; wall time of the {len(records)} runs, "
                    f"teacher included: {minutes(wall)}{resumed}.")
    return lines + [written]


def plot_table(runs: dict, path: Path, budget: int) -> None:
    """Test (filled) and validation (hollow) accuracy against trainable parameters, points numbered
    as the table's rows; the paper's rows and ours in two colours."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    labels: dict[tuple[int, float], list[str]] = {}
    for ours, colour, who in ((False, "tab:blue", "paper"), (True, "tab:orange", "ours")):
        points = [(n, runs[r.name].summary) for n, r in enumerate(ROWS, 1)
                  if (OURS in r.tags) == ours and r.name in runs]
        for key, label, style in (("test_accuracy", "test", {"color": colour}),
                                  ("best_val_accuracy", "validation", {"facecolors": "none", "edgecolors": colour})):
            shown = [(n, s["trainable"]["total"], s[key]) for n, s in points if s.get(key) is not None]
            if shown:
                ax.scatter([x for _, x, _ in shown], [y for _, _, y in shown], marker="o" if key[0] == "t" else "s",
                           label=f"{who}: {label}", **style)
            for n, x, y in shown if key == "test_accuracy" else []:
                labels.setdefault((x, y), []).append(str(n))
    for (x, y), numbers in labels.items():  # rows on the same spot share one label
        ax.annotate(",".join(numbers), (x, y), xytext=(5, 2), textcoords="offset points", fontsize=9)
    ax.axvline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:,}")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}K"))
    ax.set(xlabel="trainable parameters", ylabel="accuracy",
           title="Accuracy vs trainable parameters (numbers: table rows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def write_table(out: Path, table: Path, argv: list[str]) -> bool:
    """Write the Markdown table and, beside it, the plot, from the finished rows in `out`.

    Args:
        out: the folder of the row runs.
        table: the Markdown file; the plot is the same path with .png.
        argv: this invocation's arguments (the command shown when no row recorded its own).

    Returns:
        False when no row has finished (nothing written), else True.
    """
    from agnews_lora.checkpoint import atomic_write_text
    from agnews_lora.report import load_run, md_table
    from agnews_lora.runs import SUMMARY, RunFolder

    runs = {r.name: load_run(out / r.name) for r in ROWS if RunFolder(out / r.name).status == "done"}
    if not runs:
        return False
    first = next(iter(runs.values()))
    plot, budget = table.with_suffix(".png"), first.cfg.budget.max_trainable
    table.parent.mkdir(parents=True, exist_ok=True)
    plot_table(runs, plot, budget)
    missing = [r.name for r in ROWS if r.name not in runs]
    seeded = {name: study.over_seeds(out / name) for name in runs}
    seeded = seeded if any(v and len(v["seeds"]) > 1 for v in seeded.values()) else None
    model = first.cfg.model.name
    lines = [f"# The paper's Table 2 at its real budget on {Path(model).name}, plus rows of our own", "",
             *provenance_lines(out, argv), f"- Machine: {study.machine()}",
             f"- Backbone: `{model}` ({_backbone(first)}; model.init={first.cfg.model.init}); LoRA module names "
             "mapped by model.py.",
             f"- Every row: {conditions_line(first)}", "",
             md_table(["#", "Configuration", "Trainable params", "Val acc", "Test acc", "Train time", "Teacher time"]
                      + (["Test acc over seeds"] if seeded else []), table_rows(runs, seeded),
                      align="llrrrrr" + ("r" if seeded else "")), "",
             f"Train time: optimizer steps only ({SUMMARY} `train_seconds`; evaluation and loading excluded). "
             f"Trainable params: the exact count of the run (`model.count_trainable`), each within "
             f"budget.max_trainable = {budget:,}.", ""]
    if seeded:
        lines += ["Val acc, Test acc, Train time: the row's own seed (the one in the conditions). Test acc over "
                  "seeds: mean ± standard deviation over the row's finished seeds (`--seeds`; same rows, steps "
                  "and settings, train.seed from the row's own upwards; train.seed also draws the validation "
                  "and training rows). The teacher is trained once, with the row's own seed. Paired differences "
                  "over seeds and rows: `agnews-lora compare` on the seed folders.", ""]
    lines += [f"{line}\n" for line in teacher_lines(out, runs) + verdict_lines(runs)]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    lines += [f"![accuracy vs trainable parameters]({plot.name})", ""]
    atomic_write_text(table, "\n".join(lines))
    return True


def _backbone(run) -> str:
    from agnews_lora.model import load_backbone_config

    c = load_backbone_config(run.cfg.model.name, run.cfg.model.num_labels)
    return f"{c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}"


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "paper_table"), help="folder of the row runs")
    p.add_argument("--table", default=str(ROOT / "docs" / "results" / "generated" / "paper_table.md"),
                   help="Markdown table to write; the plot goes beside it as .png")
    p.add_argument("--rows", help="comma-separated row names or numbers (default: all), e.g. 1,5,6")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every row")
    p.add_argument("--teacher-steps", type=int, help="optimizer steps of the teacher (default: 2 x --steps)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--val-size", type=int, default=640)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--model-dir", help="backbone folder (default: MPNet-base from ../shared/tools/get-mpnet-base.sh)")
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
    args.teacher_steps = args.teacher_steps or 2 * args.steps
    args.out = Path(args.out).expanduser().resolve()
    args.table = Path(args.table).expanduser().resolve()
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    from agnews_lora.errors import ConfigError

    if args.table_only:
        if not write_table(args.out, args.table, argv):
            raise ConfigError(f"--table-only: no finished row in {args.out}")
        print(f"wrote {args.table} and {args.table.with_suffix('.png')}")
        return
    args.model_dir = study.resolve_model_dir(args.model_dir, SHARED / "tools" / "get-mpnet-base.sh")
    planned = study.plan(study.with_seeds([full_row(row, args) for row in select_rows(args.rows)], args.seeds,
                                          keep=[TEACHER.name]))
    print_plan(planned, args)
    if args.dry_run:
        return
    for index, p in enumerate(planned, 1):
        study.run_row(p, index=index, count=len(planned), command=command_line(argv), record=ROW_FILE)
        if write_table(args.out, args.table, argv):  # after every row: an interrupted table is still current
            print(f"wrote {args.table} and {args.table.with_suffix('.png')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, printed as one line)."""
    return study.run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
