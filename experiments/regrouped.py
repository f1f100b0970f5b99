#!/usr/bin/env python3
"""A second dataset, read offline: AG News regrouped into three and into two classes with string
labels, under other column names, from parquet files and from `save_to_disk` folders. Trained with
the main job's recipe, then measured like AG News: test accuracy, the hidden file's labelled
generated rows (the shifted domain), and the robustness suite with the hidden file's signs of shift.

    python experiments/regrouped.py --prepare-only   # write the datasets (runs/regrouped/data)
    python experiments/regrouped.py                  # prepare, train both, measure; resumable
    python experiments/regrouped.py --table-only     # rewrite docs/results/regrouped.md

No other labelled text-classification dataset can be read here (no internet), so the second dataset
is built from the AG News rows in ../shared, which makes it a check of the reading, the class
handling and the tools on another shape, not a new benchmark:

- three: classes world, sports, business-tech (Business and Sci/Tech merged); parquet files with
  columns headline, summary, topic; preset configs/cpu-minilm-regrouped.yaml.
- two: classes sports and not sports (1:3); `datasets.Dataset.save_to_disk` folders with columns
  title, content, group (plain strings, no ClassLabel); the same preset with those overrides.

Every dataset keeps all offline train rows (the three train files) and the 7,600 test rows, and a
development file of the hidden file's 300 labelled generated rows, regrouped the same way. Each run
trains in a child process (agnews_lora.study: resumable); then `agnews-lora evaluate` scores the
generated rows and `agnews-lora robustness` runs the perturbation suite with the hidden file as
the unlabelled texts. Each step is skipped when its output exists.

Reference: plain LoRA on the four AG News classes with the same recipe, rows count, steps and seed
(the lora arm of experiments/lora_variants.py, when its run is there), its predictions merged into
the groups. Its training rows are another stratified draw (stratified by four classes, not by the
groups), so the paired difference compares recipes, not only label sets.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from agnews_lora import study
from agnews_lora.study import Row, percent

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PRESET = ROOT / "configs" / "cpu-minilm-regrouped.yaml"
AG = ("World", "Sports", "Business", "Sci/Tech")
DATASETS = {  # name -> (AG News class -> group, columns (text..., label), stored as)
    "three": ({"World": "world", "Sports": "sports", "Business": "business-tech", "Sci/Tech": "business-tech"},
              ("headline", "summary", "topic"), "parquet"),
    "two": ({"World": "not sports", "Sports": "sports", "Business": "not sports", "Sci/Tech": "not sports"},
            ("title", "content", "group"), "save_to_disk"),
}
ROW_FILE = "regrouped_row.json"
HIDDEN = SHARED / "data" / "hidden" / "test_unlabelled.csv.gz"
PRIORS = ("none", "match-shifted")  # predict --prior: as trained, and the robust preset's lever


def _ag_rows(path: Path) -> list[tuple[str, str, int]]:
    """(title, description, AG class id) of an AG News file: the headerless original keeps its two
    fields; the `label,text` file has the text as the title and an empty description."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    if rows[0] == ["label", "text"]:
        return [(text, "", int(label)) for label, text in rows[1:]]
    return [(title, desc, int(cls) - 1) for cls, title, desc in rows]


def _hidden_dev() -> list[tuple[str, str, int]]:
    """The hidden file's 300 labelled generated rows as (text, "", AG class id)."""
    from agnews_lora.data import read_file

    texts = read_file(SHARED / "data" / "hidden" / "test_unlabelled.csv.gz").texts
    with open(SHARED / "data" / "hidden" / "generated_dev_labels.csv", encoding="utf-8") as fh:
        return [(texts[int(r["id"])], "", int(r["label"])) for r in csv.DictReader(fh)]


def prepare(data_dir: Path) -> dict[str, dict[str, Path]]:
    """Write both datasets (train, test, dev) under `data_dir`; files already there are kept."""
    import datasets

    datasets.disable_progress_bars()  # this script's own process
    ag = SHARED / "data" / "ag_news"
    sources = {"train": [ag / f for f in study.AG_NEWS_TRAIN], "test": [ag / study.AG_NEWS_TEST], "dev": None}
    out: dict[str, dict[str, Path]] = {}
    for name, (groups, (title, body, label), kind) in DATASETS.items():
        out[name] = {}
        for split, files in sources.items():
            dest = data_dir / name / (f"{split}.parquet" if kind == "parquet" else split)
            out[name][split] = dest
            if dest.exists():
                continue
            rows = _hidden_dev() if files is None else [r for f in files for r in _ag_rows(f)]
            ds = datasets.Dataset.from_dict({title: [r[0] for r in rows], body: [r[1] for r in rows],
                                             label: [groups[AG[r[2]]] for r in rows]})
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(dest.name + ".partial")
            ds.to_parquet(str(tmp)) if kind == "parquet" else ds.save_to_disk(str(tmp))
            tmp.rename(dest)
    return out


def rows(args: argparse.Namespace, files: dict[str, dict[str, Path]]) -> list[Row]:
    out = []
    for name, (_, (title, body, label), _) in DATASETS.items():
        f = files[name]
        out.append(Row(name=name, config=str(PRESET), title=name,
                       overrides=(f"data.train=[{f['train']}]", f"data.test=[{f['test']}]",
                                  f"data.text_fields=[{title},{body}]", f"data.label_field={label}",
                                  "train.progress=false", f"out_dir={args.out / name}",
                                  f"name=regrouped-{name}", *args.set)))
    return out


def _cli(*argv: object) -> None:
    study.run_child([sys.executable, "-m", "agnews_lora.cli", *map(str, argv)], what=f"agnews-lora {argv[0]}")


def measure(run: Path, out: Path, dev: Path, max_rows: int) -> None:
    """The generated rows' accuracy (evaluate) and the robustness suite, each once, into `out`
    (beside the run folder: the tool writes nothing of its own inside a run)."""
    if not (out / "generated_dev_eval.json").is_file():
        _cli("evaluate", run, "--data", dev, "--output", out / "generated_dev_eval.json",
             "--predictions", out / "generated_dev_predictions.npz")
    if not (out / "robustness" / "robustness.json").is_file():
        _cli("robustness", run, "--unlabelled", HIDDEN, "--max-rows", max_rows, "--output", out / "robustness")
    for prior in PRIORS:  # the shift lever: the whole hidden file, as a submission
        if not (out / f"hidden_{prior}.csv").is_file():
            _cli("predict", run, "--input", HIDDEN, "--output", out / f"hidden_{prior}.csv", "--prior", prior)


def hidden_scores(name: str, classes: list[str], out: Path) -> dict:
    """Accuracy of each `predict --prior` on the hidden file's two halves: the 300 labelled generated
    rows and the AG News test rows in it (their test labels found by text, for measuring only),
    both regrouped."""
    from agnews_lora.data import read_file

    groups, _, _ = DATASETS[name]
    texts = read_file(HIDDEN).texts
    with open(SHARED / "data" / "hidden" / "generated_dev_labels.csv", encoding="utf-8") as fh:
        dev = {int(r["id"]): classes.index(groups[AG[int(r["label"])]]) for r in csv.DictReader(fh)}
    test = read_file(SHARED / "data" / "ag_news" / study.AG_NEWS_TEST)
    by_text = {t: classes.index(groups[AG[y]]) for t, y in zip(test.texts, test.labels)}
    ag = {i: by_text[t] for i, t in enumerate(texts) if t in by_text}
    scores = {}
    for prior in PRIORS:
        with open(out / f"hidden_{prior}.csv", encoding="utf-8") as fh:
            label = {int(r["ID"]): int(r["Label"]) for r in csv.DictReader(fh)}
        scores[prior] = {half: sum(label[i] == y for i, y in rows.items()) / len(rows)
                         for half, rows in (("generated", dev), ("ag_news", ag))}
    scores["rows"] = {"generated": len(dev), "ag_news": len(ag)}
    return scores


def reference(args: argparse.Namespace, name: str) -> dict | None:
    """Four-class plain LoRA (lora_variants' lora arm, seed 42) merged into `name`'s groups:
    its test predictions (and the generated rows', scored once here) against the regrouped run's,
    paired on the same rows."""
    import numpy as np

    from agnews_lora.evaluate import paired_difference
    from agnews_lora.runs import RunFolder

    four, run, measured = args.reference, args.out / name, args.out / "measured" / name
    if not (four / "test_predictions.npz").is_file() or not (run / "test_predictions.npz").is_file():
        return None
    groups, _, _ = DATASETS[name]
    mine = RunFolder(run)
    classes = mine.config().data.labels
    merge = np.array([classes.index(groups[c]) for c in AG])
    out = {}
    for split, four_file, own_file in (("test", four / "test_predictions.npz", run / "test_predictions.npz"),
                                       ("dev", measured.parent / "reference_dev.npz", measured / "generated_dev_predictions.npz")):
        if split == "dev" and not four_file.is_file():
            ag_dev = args.data / "four_dev.csv"
            if not ag_dev.is_file():
                ag_dev.parent.mkdir(parents=True, exist_ok=True)
                with open(ag_dev, "w", encoding="utf-8", newline="") as fh:
                    csv.writer(fh).writerows([("text", "label"), *((t, y) for t, _, y in _hidden_dev())])
            _cli("evaluate", four, "--data", ag_dev, "--output", measured.parent / "reference_dev.json",
                 "--predictions", four_file)
        ref, own = np.load(four_file), np.load(own_file)
        labels = own["labels"]
        ref_preds = merge[ref["logits"].argmax(-1)]
        assert np.array_equal(merge[ref["labels"]], labels), f"{split}: the reference scored other rows"
        diff = paired_difference(labels, own["logits"].argmax(-1), ref_preds)
        out[split] = {"accuracy": float((ref_preds == labels).mean()), "own_minus_reference": diff}
    return out


def write_table(args: argparse.Namespace, argv: list[str]) -> bool:
    from agnews_lora.checkpoint import atomic_write_json, atomic_write_text
    from agnews_lora.report import md_table
    from agnews_lora.runs import RunFolder

    found = {n: RunFolder(args.out / n) for n in DATASETS
             if (args.out / "measured" / n / f"hidden_{PRIORS[-1]}.csv").is_file()}
    if not found:
        return False
    table, shift, results = [], [], {}
    for name, run in found.items():
        cfg, summary = run.config(), run.summary()
        measured = args.out / "measured" / name
        dev = json.loads((measured / "generated_dev_eval.json").read_text())
        robust = json.loads((measured / "robustness" / "robustness.json").read_text())
        ref = reference(args, name)
        record = study.read_record(run.path, ROW_FILE) or {}
        results[name] = {"classes": cfg.data.labels, "trainable": summary["trainable"]["total"],
                         "test_accuracy": summary.get("test_accuracy"), "test_f1_macro": summary.get("test_f1_macro"),
                         "generated_dev": {k: dev.get(k) for k in ("accuracy", "f1_macro", "n")},
                         "robustness": {"clean_accuracy": robust["clean"]["accuracy"], "rows": robust["clean"]["n"],
                                        "suite_mean_accuracy": robust["suite_mean_accuracy"],
                                        "suite_mean_drop": robust["suite_mean_drop"],
                                        "hidden_mean_confidence": robust["unlabelled"]["mean_confidence"],
                                        "hidden_low_confidence_share": robust["unlabelled"]["low_confidence_share"],
                                        "hidden_predicted_share": robust["unlabelled"]["predicted_share"],
                                        "train_prior": robust["unlabelled"]["train_prior"]},
                         "hidden": hidden_scores(name, cfg.data.labels, measured),
                         "reference": ref, "train_seconds": summary.get("train_seconds"), "record": record}
        gen = results[name]["generated_dev"]
        r = results[name]
        table.append([name, ", ".join(cfg.data.labels), f"{r['trainable']:,}",
                      percent(summary.get("test_accuracy")), percent(summary.get("test_f1_macro")),
                      f"{percent(gen.get('accuracy'))} ({gen.get('n')})",
                      "-" if ref is None else f"{percent(ref['test']['accuracy'])} / {percent(ref['dev']['accuracy'])}",
                      "-" if ref is None else study.paired_cell(ref["test"]["own_minus_reference"])])
        h = r["hidden"]
        shift.append([name, f"{percent(r['robustness']['suite_mean_accuracy'])} "
                            f"(clean {percent(r['robustness']['clean_accuracy'])}, {r['robustness']['rows']:,} rows)",
                      percent(r["robustness"]["hidden_low_confidence_share"]),
                      f"{percent(h['none']['generated'])} → {percent(h['match-shifted']['generated'])}",
                      f"{percent(h['none']['ag_news'])} → {percent(h['match-shifted']['ag_news'])}"])
    machine = study.machine()
    command = f"python experiments/regrouped.py {shlex.join(argv)}".strip()
    rows_note = next(iter(results.values()))["hidden"]["rows"]
    lines = [md_table(["dataset", "classes (id order)", "trainable", "test acc (7,600)", "test F1 (macro)",
                       "generated rows acc (n)", "4-class LoRA merged: test / generated",
                       "regrouped − merged, test (paired)"], table, align="lllrrrrr"), "",
             md_table(["dataset", "perturbed acc: suite mean (clean)", "hidden file: low-confidence share",
                       f"generated rows ({rows_note['generated']}): prior none → match-shifted",
                       f"AG News rows of the hidden file ({rows_note['ag_news']:,}): none → match-shifted"],
                      shift, align="lrrrr"), "",
             f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on commit {study.commit(ROOT)} by `{command}`; "
             f"machine: {machine}.", ""]
    args.table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.table, "\n".join(lines))
    atomic_write_json(args.table.with_suffix(".json"), {"written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                                        "commit": study.commit(ROOT), "machine": str(machine),
                                                        "command": command, "datasets": results})
    return True


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "regrouped"), help="folder of the runs")
    p.add_argument("--data", default=str(ROOT / "runs" / "regrouped" / "data"), help="folder of the datasets")
    p.add_argument("--reference", default=str(ROOT / "runs" / "lora_variants" / "lora"),
                   help="a four-class run of the same recipe to merge into the groups (skipped when absent)")
    p.add_argument("--table", default=str(ROOT / "docs" / "results" / "generated" / "regrouped.md"))
    p.add_argument("--max-rows", type=int, default=1000, help="labelled rows of the robustness suite")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another override for every run")
    p.add_argument("--prepare-only", action="store_true", help="write the datasets; train nothing")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from finished runs")
    args = p.parse_args(argv)
    for key in ("out", "data", "reference", "table"):
        setattr(args, key, Path(getattr(args, key)).expanduser().resolve())
    return args


def run(args: argparse.Namespace, argv: list[str]) -> None:
    from agnews_lora.errors import ConfigError

    if not SHARED.is_dir():
        raise ConfigError(f"{SHARED}: the offline AG News rows are not here; run beside ../shared")
    files = prepare(args.data)
    if args.prepare_only:
        print(f"wrote {args.data}")
        return
    if not args.table_only:
        planned = study.plan(rows(args, files))
        for index, p in enumerate(planned, 1):
            study.run_row(p, index=index, count=len(planned), command=f"python experiments/regrouped.py "
                          f"{shlex.join(argv)}".strip(), record=ROW_FILE)
            measure(p.run_dir, args.out / "measured" / p.name, files[p.name]["dev"], args.max_rows)
    if write_table(args, argv):
        print(f"wrote {args.table}")


def main(argv: list[str] | None = None) -> int:
    return study.run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
