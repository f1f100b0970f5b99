"""Run folder -> report.md + PNG plots; several run folders -> one comparison table + plot.

Reads only what `train` writes (config.yaml, metrics.jsonl, train_log.jsonl, summary.json,
test_metrics.json; compare also test_predictions.npz), so a report can be rebuilt at any time
without loading a model.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from agnews_lora import runs
from agnews_lora.checkpoint import atomic_write_json, atomic_write_text
from agnews_lora.config import Config
from agnews_lora.errors import ConfigError
from agnews_lora.outputs import claim_file
from agnews_lora.methods import NAMES, PLACED, SIZE_KEYS, describe, size_of
from agnews_lora.precision import display_name
from agnews_lora.seeds import crossed_mean, group_by_recipe, paired_over_seeds, spread


@dataclass
class Run:
    """Everything a finished run folder holds, parsed."""

    path: Path
    cfg: Config
    evals: list[dict]  # metrics.jsonl: one record per evaluation
    train_log: list[dict]  # train_log.jsonl: one record per logging window
    summary: dict
    test: dict | None  # test_metrics.json (best checkpoint on the labelled test split)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def best_eval(self) -> dict | None:
        """The evaluation whose checkpoint is `best/` (the last one marked best)."""
        marked = [e for e in self.evals if e.get("best")]
        return marked[-1] if marked else None

    @property
    def label_names(self) -> list[str]:
        if self.test and self.test.get("per_class"):
            return list(self.test["per_class"])
        return runs.label_names(self.cfg.model.num_labels, names=self.cfg.data.labels)


def load_run(run_dir: str | Path) -> Run:
    """Parse a run folder written by `train`.

    Args:
        run_dir: the folder (holds config.yaml and, once training finished, summary.json).

    Returns:
        The parsed Run; raises ConfigError naming the folder when it is not a finished run.
    """
    path = Path(run_dir)
    for name in (runs.CONFIG, runs.SUMMARY):
        if not (path / name).is_file():
            raise ConfigError(f"{path}: no {name}; pass a run folder whose training finished "
                              "(train writes summary.json at the end)")
    return Run(path=path, cfg=runs.read_config(path), evals=runs.read_records(path / runs.METRICS),
               train_log=_dedupe_steps(runs.read_records(path / runs.TRAIN_LOG)),
               summary=runs.read_summary(path), test=runs.read_json(path / runs.TEST_METRICS))


def _dedupe_steps(records: list[dict]) -> list[dict]:
    # A resumed run logs again the steps after its last checkpoint: keep the latest record.
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


# ---------------------------------------------------------------- tables


# What would still act in Markdown after HTML-escaping: a backtick ends a code span, a bar splits a
# table cell, brackets make a link or an image.
_MARKDOWN = str.maketrans({"`": "&#96;", "|": "&#124;", "[": "&#91;", "]": "&#93;"})


def inert(value: object) -> str:
    """A user-controlled string (a run or folder name, a model name, a path, a file name, a config
    value) as text that stays text in the card: every run of whitespace, newlines included, one
    space (no injected headings or rows); HTML-escaped (no tags); backticks, bars and brackets as
    character references (no breaking out of code spans or table cells, no links)."""
    return html.escape(" ".join(str(value).split()), quote=False).translate(_MARKDOWN)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub Markdown table; `align` is one letter per column (l/r), default all right."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _f4(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def train_loss_at_evals(run: Run) -> list[float | None]:
    """Mean logged training loss over the steps since the previous evaluation, per evaluation."""
    out, prev = [], 0
    for e in run.evals:
        window = [r["loss"] for r in run.train_log if prev < r["step"] <= e["step"]]
        out.append(sum(window) / len(window) if window else None)
        prev = e["step"]
    return out


def eval_table(run: Run) -> str:
    """The paper's Table 1: one row per evaluation (training loss, validation loss and metrics)."""
    rows = []
    for e, loss in zip(run.evals, train_loss_at_evals(run)):
        rows.append([e["epoch"], e["step"], _f4(loss), _f4(e.get("val_loss")), _f4(e.get("val_accuracy")),
                     _f4(e.get("val_f1_macro")), _f4(e.get("val_precision_macro")),
                     _f4(e.get("val_recall_macro")), "yes" if e.get("best") else ""])
    return md_table(["Epoch", "Step", "Training loss", "Validation loss", "Accuracy", "F1 (macro)",
                     "Precision (macro)", "Recall (macro)", "Best"], rows, align="rrrrrrrrl")


def confusion_source(run: Run) -> tuple[str, list[list[int]]] | None:
    """(which split, confusion matrix) of the best checkpoint: the test split when scored."""
    if run.test is not None:
        return "test", run.test["confusion"]
    best = run.best_eval
    if best is not None and "val_confusion" in best:
        return "validation", best["val_confusion"]
    return None


def _confusion_table(names: list[str], matrix: list[list[int]]) -> str:
    rows = [[f"**{n}**", *row, sum(row)] for n, row in zip(names, matrix)]
    rows.append(["**predicted**", *(sum(col) for col in zip(*matrix)), sum(map(sum, matrix))])
    return md_table(["gold \\ predicted", *names, "total"], rows)


def _class_table(names: list[str], matrix: list[list[int]]) -> str:
    gold = [sum(row) for row in matrix]
    pred = [sum(col) for col in zip(*matrix)]
    n = max(sum(gold), 1)
    rows = [[n_, p, f"{p / n:.1%}", g, f"{g / n:.1%}"] for n_, p, g in zip(names, pred, gold)]
    return md_table(["Class", "Predicted", "Predicted %", "Gold", "Gold %"], rows)


def _per_class_table(test: dict) -> str:
    rows = [[name, _f4(c["precision"]), _f4(c["recall"]), _f4(c["f1"]), c["support"]]
            for name, c in test["per_class"].items()]
    return md_table(["Class", "Precision", "Recall", "F1", "Support"], rows)


def trainable_rows(run: Run) -> list[tuple[str, str, int]]:
    """(part, module, parameters) for every trainable group: the adapters (named after the method),
    virtual tokens, biases, then the head."""
    t = run.summary["trainable"]
    name = NAMES.get(t.get("method", "lora"), "LoRA")  # summaries before peft.method: LoRA
    rows = [(name, k, v) for k, v in sorted(t["lora_by_module"].items())]
    rows += [("virtual tokens", k, v) for k, v in t.get("prompt_by_module", {}).items()]
    rows += [("biases", k, v) for k, v in sorted(t.get("bias_by_module", {}).items())]
    rows += [("head", k, v) for k, v in t["head_by_module"].items()]
    rows += [("other", k, v) for k, v in t.get("other", {}).items()]
    return rows


def _trainable_table(run: Run) -> str:
    t, budget = run.summary["trainable"], run.cfg.budget.max_trainable
    rows = [[part, f"`{module}`", f"{n:,}", f"{n / t['total']:.1%}"] for part, module, n in trainable_rows(run)]
    parts = [(NAMES.get(t.get("method", "lora"), "LoRA"), t["lora"]), ("virtual tokens", t.get("prompt", 0)),
             ("biases", t.get("bias", 0))]
    rows += [[f"**{label} total**", "", f"{n:,}", f"{n / t['total']:.1%}"] for label, n in parts if n]
    rows += [["**head total**", "", f"{t['head']:,}", f"{t['head'] / t['total']:.1%}"],
             ["**total**", "", f"{t['total']:,}", f"{t['total'] / budget:.1%} of the {budget:,} budget"]]
    return md_table(["Part", "Module", "Parameters", "Share"], rows, align="llrr")


# ---------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    # Figure (not pyplot) needs no GUI backend and keeps no global state between runs.
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _mark_epochs(ax, run: Run) -> None:
    for e in run.evals:
        if e.get("epoch_end"):
            ax.axvline(e["step"], color="0.8", linestyle=":", linewidth=1)


def plot_loss(run: Run, path: Path) -> None:
    """Training loss per logged step and validation loss per evaluation, against the step."""
    fig, ax = _figure()
    ax.plot([r["step"] for r in run.train_log], [r["loss"] for r in run.train_log], label="training loss")
    val = [e for e in run.evals if "val_loss" in e]
    ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="validation loss")
    _mark_epochs(ax, run)
    ax.set(xlabel="optimizer step (dotted: epoch ends)", ylabel="cross-entropy", title=f"Loss: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_val_metrics(run: Run, path: Path) -> None:
    """Validation accuracy and macro F1/precision/recall per evaluation."""
    fig, ax = _figure()
    val = [e for e in run.evals if "val_accuracy" in e]
    steps = [e["step"] for e in val]
    keys = (("val_accuracy", "accuracy"), ("val_f1_macro", "F1 (macro)"),
            ("val_precision_macro", "precision (macro)"), ("val_recall_macro", "recall (macro)"))
    for key, label in keys:
        ax.plot(steps, [e[key] for e in val], "o-", label=label, markersize=4)
    values = [e[key] for e in val for key, _ in keys]
    pad = max(0.01, 0.15 * (max(values) - min(values)))  # zoom in: late epochs differ by tenths of a point
    ax.set_ylim(max(0.0, min(values) - pad), min(1.0, max(values) + pad) + 0.005)
    best = run.best_eval
    if best is not None and "val_accuracy" in best:
        ax.plot([best["step"]], [best["val_accuracy"]], "k*", markersize=12, label="best checkpoint")
    _mark_epochs(ax, run)
    ax.set(xlabel="optimizer step", ylabel="score", title=f"Validation metrics: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_confusion(names: list[str], matrix: list[list[int]], split: str, path: Path) -> None:
    """Counts in each cell; colour = share of the gold row, so classes of any size compare."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = _figure(5.5, 4.8)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="gold", title=f"Confusion matrix ({split}, best checkpoint)")
    fig.colorbar(image, ax=ax, label="share of gold class")
    _save(fig, path)


def plot_class_distribution(names: list[str], matrix: list[list[int]], split: str, path: Path) -> None:
    """Predicted vs gold class counts (column and row sums of the confusion matrix)."""
    import numpy as np

    x = np.arange(len(names))
    fig, ax = _figure(6, 3.8)
    ax.bar(x - 0.2, [sum(col) for col in zip(*matrix)], width=0.4, label="predicted")
    ax.bar(x + 0.2, [sum(row) for row in matrix], width=0.4, label="gold", alpha=0.6)
    ax.set_xticks(x, names)
    ax.set(ylabel="rows", title=f"Class distribution of {split} predictions")
    ax.legend()
    _save(fig, path)


def plot_trainable(run: Run, path: Path) -> None:
    """One stacked bar per part (LoRA, head), a segment per module, against the budget."""
    fig, ax = _figure(7, 2.8)
    lefts: dict[str, int] = {}
    for part, module, n in trainable_rows(run):
        ax.barh(part, n, left=lefts.get(part, 0), edgecolor="white", label=f"{part}: {module} ({n:,})")
        lefts[part] = lefts.get(part, 0) + n
    budget, total = run.cfg.budget.max_trainable, run.summary["trainable"]["total"]
    if total >= budget / 10:  # far below the budget the line would squash the bars to nothing
        ax.axvline(budget, color="red", linestyle="--", label=f"budget {budget:,}")
    ax.set(xlabel="trainable parameters", title=f"Trainable parameters: {total:,} of {budget:,}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


# ---------------------------------------------------------------- report


def _layers(cfg: Config) -> str:
    return "all" if cfg.lora.layers is None else ",".join(map(str, cfg.lora.layers))


def _parts(t: dict) -> str:
    if t.get("prompt"):
        return f"virtual tokens {t['prompt']:,}"
    if t.get("bias"):
        return f"biases {t['bias']:,}"
    return f"{NAMES.get(t.get('method', 'lora'), 'LoRA')} {t['lora']:,}"


def _method_columns(cfg: Config) -> tuple[str, str, bool]:
    """The method's display name, its size ("r=8, alpha=16" for LoRA/DoRA, "-" without a size option),
    and whether it is placed on target_modules/layers."""
    method, key = cfg.peft.method, SIZE_KEYS[cfg.peft.method]
    if method in ("lora", "dora"):
        size = f"r={cfg.lora.r}, alpha={cfg.lora.alpha:g}"
    else:
        size = "-" if key is None else f"{key.rsplit('.', 1)[1]}={size_of(cfg)}"
    return NAMES[method], size, method in PLACED


def _describe_method(cfg: Config) -> str:
    return describe(cfg)


def _precision(summary: dict) -> str:
    return display_name(summary.get("precision"))


def _overview(run: Run) -> str:
    cfg, s = run.cfg, run.summary
    best = run.best_eval or {}
    rows = [["model", f"`{cfg.model.name}` ({cfg.model.init})"], ["head", cfg.model.head],
            ["LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, dropout={cfg.lora.dropout:g}, "
                     f"modules={','.join(cfg.lora.target_modules)}, layers={_layers(cfg)}"]
            if cfg.peft.method == "lora" else ["PEFT method", _describe_method(cfg)],
            ["training", f"{s['steps']} steps ({s['epochs_completed']} epochs completed), batch "
                         f"{cfg.train.batch_size}x{cfg.train.grad_accum}, lr {cfg.train.lr:g} "
                         f"({cfg.train.scheduler}), {_precision(s)} on {s['device']}"],
            ["training time", f"{s['train_seconds']:.1f} s ({s['train_examples_per_s']:.1f} examples/s)"],
            ["trainable parameters", f"{s['trainable']['total']:,} ({_parts(s['trainable'])}, head "
                                     f"{s['trainable']['head']:,}; budget {cfg.budget.max_trainable:,})"],
            ["best validation accuracy", f"{_f4(s.get('best_val_accuracy'))} (step {s['best_step']})"]]
    if "val_f1_macro" in best:
        rows.append(["best validation F1 (macro)", _f4(best["val_f1_macro"])])
    if run.test is not None:
        rows.append(["test accuracy (best checkpoint)", f"{_f4(run.test['accuracy'])} on {run.test['n']:,} rows"])
        rows.append(["test F1 (macro)", _f4(run.test["f1_macro"])])
    return md_table(["", ""], rows, align="ll")


def console_summary(run_dir: str | Path) -> str:
    """The few lines a finished `train`/`distill` prints: where the run is, what it trained, how it
    scored, and which files hold the rest (summary.json has every figure)."""
    run = load_run(run_dir)
    s, t = run.summary, run.summary["trainable"]
    lines = [f"run folder: {run.path}",
             f"trainable parameters: {t['total']:,} of {run.cfg.budget.max_trainable:,} "
             f"(adapter {t['lora']:,}, head {t['head']:,})",
             f"trained {s['steps']:,} steps in {s['train_seconds']:.1f} s ({s['train_examples_per_s']:.1f} "
             f"examples/s, {_precision(s)} on {s['device']}" + (f", {s['processes']} processes" if s.get("processes", 1) > 1
                                                                else "") + ")"]
    if s.get("best_val_accuracy") is not None:
        lines.append(f"best validation accuracy: {s['best_val_accuracy']:.4f} (step {s['best_step']}; best/ holds it)")
    if run.test is not None:
        lines.append(f"test accuracy: {run.test['accuracy']:.4f}, F1 (macro) {run.test['f1_macro']:.4f} "
                     f"on {run.test['n']:,} rows")
    temperature = (s.get("calibration") or {}).get("temperature")
    if temperature is not None and "fitted_on" in s.get("calibration", {}):
        lines.append(f"calibration: temperature {temperature:.3f} (fitted on validation; used for probabilities)")
    lines.append(f"wrote {run.path / 'summary.json'}, {run.path / 'report.md'} and a model card in "
                 f"{run.path / 'best' / 'README.md'}")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and its PNG plots into the run folder.

    Args:
        run_dir: a finished run folder.

    Returns:
        The path of report.md.
    """
    claim_file(Path(run_dir) / runs.REPORT, kind="markdown", label="report", owner=run_dir,
               owned=(runs.REPORT, "*.png"))
    run = load_run(run_dir)
    names = run.label_names
    parts = [f"# Run report: {inert(run.name)}", "", _overview(run), "",
             "## Loss", "", "![loss](loss.png)", ""]
    plot_loss(run, run.path / "loss.png")
    if any("val_accuracy" in e for e in run.evals):
        plot_val_metrics(run, run.path / "val_metrics.png")
        parts += ["## Validation metrics per evaluation", "",
                  "Training loss: mean of the logged losses since the previous evaluation.", "",
                  eval_table(run), "", "![validation metrics](val_metrics.png)", ""]
    source = confusion_source(run)
    if source is not None:
        split, matrix = source
        plot_confusion(names, matrix, split, run.path / "confusion.png")
        plot_class_distribution(names, matrix, split, run.path / "class_distribution.png")
        parts += [f"## Confusion matrix ({split}, best checkpoint)", "", _confusion_table(names, matrix), "",
                  "![confusion matrix](confusion.png)", ""]
        if split == "test":
            parts += ["## Test metrics per class", "", _per_class_table(run.test), ""]
        parts += [f"## Class distribution of {split} predictions", "", _class_table(names, matrix), "",
                  "![class distribution](class_distribution.png)", ""]
    plot_trainable(run, run.path / "trainable.png")
    parts += ["## Trainable parameters", "", _trainable_table(run), "", "![trainable parameters](trainable.png)", ""]
    out = run.path / runs.REPORT
    atomic_write_text(out, "\n".join(parts))
    return out


# ---------------------------------------------------------------- comparison


def _short_model(name: str) -> str:
    if name.startswith("pkg:"):
        return name[4:].split("/")[0]
    return Path(name).name or name


def sort_key(run: Run) -> float:
    """Test accuracy when the run scored a test split, else best validation accuracy."""
    value = run.summary.get("test_accuracy")
    if value is None:
        value = run.summary.get("best_val_accuracy")
    return -1.0 if value is None else value


def compare_table(loaded: Sequence[Run]) -> str:
    """The paper's Table 2: one row per run, best first."""
    rows = []
    for run in sorted(loaded, key=sort_key, reverse=True):
        cfg, s = run.cfg, run.summary
        method, size, placed = _method_columns(cfg)
        rows.append([inert(run.name), inert(_short_model(cfg.model.name)), cfg.model.head, method, size,
                     ",".join(cfg.lora.target_modules) if placed else "-", _layers(cfg) if placed else "-",
                     f"{cfg.train.lr:g}", s["steps"],
                     f"{s['trainable']['total']:,}", _f4(s.get("best_val_accuracy")), _f4(s.get("test_accuracy")),
                     _precision(s), cfg.train.seed, f"{s['train_seconds']:.1f}"])
    return md_table(["Run", "Model", "Head", "Method", "Size", "Modules", "Layers", "LR", "Steps", "Trainable",
                     "Val acc", "Test acc", "Precision", "Seed", "Train s"], rows, align="lllrrllrrrrrlrr")


def plot_accuracy_vs_params(loaded: Sequence[Run], path: Path) -> None:
    """Accuracy (test and validation) against trainable parameters; points named by run."""
    fig, ax = _figure(7, 4.5)
    has_test = any(r.summary.get("test_accuracy") is not None for r in loaded)
    for key, label, marker in (("test_accuracy", "test", "o"), ("best_val_accuracy", "validation", "s")):
        pts = [(r.summary["trainable"]["total"], r.summary[key], r.name) for r in loaded
               if r.summary.get(key) is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{label} accuracy")
        if key == ("test_accuracy" if has_test else "best_val_accuracy"):  # name each run once
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for budget in sorted({r.cfg.budget.max_trainable for r in loaded}):
        ax.axvline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:,}")
    ax.set(xlabel="trainable parameters", ylabel="accuracy", title="Accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _recipe_name(members: Sequence[Run]) -> str:
    """A recipe's display name: its lowest seed's run name without a ".seedS" suffix (`study.with_seeds`
    names further seeds so); which runs form a recipe is decided from their configs, not names."""
    name = members[0].name
    head, sep, tail = name.rpartition(".seed")
    return head if sep and tail.isdigit() else name


def seed_groups(loaded: Sequence[Run]) -> dict:
    """Runs that differ only in train.seed grouped into recipes (`seeds.group_by_recipe`, from
    their resolved configs): per recipe the mean and standard deviation over seeds of validation
    and test accuracy, the test accuracy over seeds and rows with its standard error
    (`seeds.crossed_mean`), and every other recipe against the best one (highest mean test
    accuracy) over the seeds both have and the same test rows (`seeds.paired_over_seeds`).

    Args:
        loaded: finished runs.

    Returns:
        {"recipes": [{"name", "runs", "seeds", "val", "test" (`spread`), "test_over_seeds_and_rows"
        (None without every run's test_predictions.npz on the same rows), "vs_best" (None for the
        best, or without predictions)}], "best": the best recipe's name or None, "rows": test rows}.
    """
    try:
        groups = group_by_recipe([r.cfg for r in loaded])
    except ValueError:
        raise ConfigError("compare: two of the runs have the same settings and seed (the same run twice?); "
                          "pass each run once") from None
    preds = [runs.RunFolder(r.path).test_predictions() for r in loaded]
    recipes = []
    for members in groups:
        runs_ = [loaded[i] for i in members]
        by_seed = {loaded[i].cfg.train.seed: preds[i] for i in members}
        recipes.append({"name": _recipe_name(runs_), "runs": [r.name for r in runs_],
                        "seeds": [r.cfg.train.seed for r in runs_],
                        "val": spread([r.summary.get("best_val_accuracy") for r in runs_]),
                        "test": spread([r.summary.get("test_accuracy") for r in runs_]), "_preds": by_seed})
    labels = _common_labels([p for p in preds if p is not None]) if all(p is not None for p in preds) else None
    for r in recipes:
        r["test_over_seeds_and_rows"] = None if labels is None else crossed_mean(np.stack(
            [(p["preds"] == labels).astype(np.float64) for p in r["_preds"].values()]))
    scored = [r for r in recipes if r["test"]["mean"] is not None]
    best = max(scored, key=lambda r: r["test"]["mean"]) if scored else None
    for r in recipes:
        r["vs_best"] = None if r is best or best is None or labels is None else paired_over_seeds(
            labels, {s: p["preds"] for s, p in r["_preds"].items()}, {s: p["preds"] for s, p in best["_preds"].items()})
    for r in recipes:
        del r["_preds"]
    return {"recipes": recipes, "best": best["name"] if best else None,
            "rows": None if labels is None else int(len(labels))}


def _common_labels(preds: list[dict]):
    """The gold labels every run's predictions share (same rows, same order), else None."""
    if not preds:
        return None
    first = preds[0]["labels"]
    same = all(len(p["labels"]) == len(first) and (p["labels"] == first).all() for p in preds)
    return first if same and len(first) >= 2 else None


def _pm(x: dict | None, key: str = "sd") -> str:
    if x is None or x.get("mean") is None:
        return "-"
    spread_ = x.get(key)
    return f"{100 * x['mean']:.2f}%" + ("" if spread_ is None else f" ± {100 * spread_:.2f}")


def seed_table(groups: dict) -> str:
    """The "over seeds" table of `seed_groups`, best recipe first, and what its columns mean."""
    order = sorted(groups["recipes"], key=lambda r: -(r["test"]["mean"] or -1.0))
    rows = []
    for r in order:
        both = r["test_over_seeds_and_rows"]
        d = r["vs_best"]
        vs = "-" if r["name"] == groups["best"] else "n/a" if d is None else (
            f"{100 * d['difference']:+.2f} ± {100 * d['se']:.2f} ({len(d['paired_seeds'])} seeds)")
        rows.append([inert(r["name"]), len(r["seeds"]), ", ".join(map(str, r["seeds"])), _pm(r["val"]),
                     _pm(r["test"]), "-" if both is None else f"{100 * both['se']:.2f}", vs])
    table = md_table(["Recipe", "Runs", "Seeds", "Val acc (mean ± sd)", "Test acc (mean ± sd)", "SE of mean test acc",
                      "vs best (paired over seeds and rows)"], rows, align="lrlrrrr")
    return (f"{table}\n\nRuns are one recipe when their resolved configs differ only in `train.seed` (and name and "
            "folder). ± sd: the standard deviation over seeds. SE of mean test acc (points): the standard error of "
            "the mean over seeds and test rows, counting both the seed-to-seed spread and the rows "
            "(`seeds.crossed_mean`: two-way ANOVA with seeds and rows as random effects). vs best: mean test "
            "accuracy minus the best recipe's over the seeds both have, paired by seed and by row, ± the standard "
            "error of that difference from the same estimator (with one seed: the paired standard error over rows "
            "only, which says nothing about the seed).")


def compare_runs(run_dirs: Sequence[str | Path], output: str | Path,
                 owner: str | Path | None = None, json_output: str | Path | None = None) -> tuple[str, Path]:
    """Write the comparison table to `output` and the accuracy-vs-parameters PNG beside it; runs
    that differ only in their seed are grouped into recipes with their figures over seeds
    (`seed_groups`), in a second table when a recipe has several seeds.

    Args:
        run_dirs: finished run folders.
        output: the Markdown file to write; the plot is OUTPUT_STEM.png next to it.
        owner: the tool's folder `output` may lie in as its own file (a sweep's comparison.md).
        json_output: also write every figure (runs and recipes) to this JSON file.

    Returns:
        (the Markdown table(s), the plot's path).
    """
    if not run_dirs:
        raise ConfigError("compare: pass at least one run folder")
    owned = (Path(output).name, Path(output).with_suffix(".png").name) if owner is not None else ()
    output = claim_file(output, kind="markdown", label="--output", inputs=run_dirs, owner=owner, owned=owned)
    plot = claim_file(output.with_suffix(".png"), kind="png", label="--output (its plot)", inputs=run_dirs,
                      owner=owner, owned=owned)
    if json_output is not None:
        json_output = claim_file(json_output, kind="json", label="--json", inputs=run_dirs)
        if json_output.resolve() in (output.resolve(), plot.resolve()):
            raise ConfigError(f"--json {json_output}: is the Markdown or plot output; name another file")
    loaded = [load_run(d) for d in run_dirs]
    groups = seed_groups(loaded)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_accuracy_vs_params(loaded, plot)
    table = compare_table(loaded)
    if any(len(r["seeds"]) > 1 for r in groups["recipes"]):
        table += "\n\n## Over seeds\n\n" + seed_table(groups)
    atomic_write_text(output, f"# Run comparison\n\nSorted by test accuracy (validation when a run has no test "
                              f"score).\n\n{table}\n\n![accuracy vs trainable parameters]({plot.name})\n")
    if json_output is not None:
        json_output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_output, {"runs": [_run_record(r) for r in loaded], **groups})
    return table, plot


def _run_record(run: Run) -> dict:
    s = run.summary
    return {"name": run.name, "path": str(run.path), "seed": run.cfg.train.seed, "steps": s.get("steps"),
            "trainable": s["trainable"]["total"], "val_accuracy": s.get("best_val_accuracy"),
            "test_accuracy": s.get("test_accuracy"), "train_seconds": s.get("train_seconds")}
