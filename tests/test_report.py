"""report and compare on tiny real runs: files, valid PNGs, and the runs' own numbers in the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agnews_lora.checkpoint import read_jsonl
from agnews_lora.cli import main
from agnews_lora.config import ConfigError, load_config
from agnews_lora.report import compare_runs, load_run, write_report
from agnews_lora.train import train
from agnews_lora.writeup import finish_run
from conftest import tiny_run_overrides

PLOTS = ("loss.png", "val_metrics.png", "confusion.png", "class_distribution.png", "trainable.png")


def _overrides(model_dir, files, cache, out) -> list[str]:
    # log every step so the loss curve has points
    return tiny_run_overrides(model_dir, files, cache, out) + ["train.log_every=1"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, ag_files, tmp_path_factory):
    """Two tiny real runs: r=4 on query,value with the RoBERTa head; r=2 on all modules, linear head."""
    base = tmp_path_factory.mktemp("runs")
    a = train(load_config(overrides=_overrides(tiny_model_dir, ag_files, base / "cache", base / "qv-r4")
                          + ["lora.r=4"]))
    b = train(load_config(overrides=_overrides(tiny_model_dir, ag_files, base / "cache", base / "all-r2-linear")
                          + ["lora.r=2", "lora.target_modules=[all]", "model.head=linear", "train.lr=5e-3"]))
    for run in (a, b):
        finish_run(run)  # as `agnews-lora train` does after training
    return a, b


def assert_png(path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 100, (path, image.size)


def _row(md: str, first_cells: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(first_cells))
    return [c.strip() for c in line.strip("|").split("|")]


def test_train_writes_report_with_the_runs_numbers(runs):
    run = runs[0]
    md = (run / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in md
        assert_png(run / name)
    evals = read_jsonl(run / "metrics.jsonl")
    log = read_jsonl(run / "train_log.jsonl")
    assert [e["step"] for e in evals] == [3, 6]
    prev = 0
    for e in evals:
        row = _row(md, f"| {e['epoch']} | {e['step']} |")
        window = [r["loss"] for r in log if prev < r["step"] <= e["step"]]
        assert row[2] == f"{sum(window) / len(window):.4f}"
        assert row[3:8] == [f"{e[k]:.4f}" for k in ("val_loss", "val_accuracy", "val_f1_macro",
                                                     "val_precision_macro", "val_recall_macro")]
        assert row[8] == ("yes" if e.get("best") else "")
        prev = e["step"]
    test = json.loads((run / "test_metrics.json").read_text())
    for name, gold_row in zip(test["per_class"], test["confusion"]):
        assert _row(md, f"| **{name}** |")[1:] == [str(v) for v in gold_row] + [str(sum(gold_row))]
    summary = json.loads((run / "summary.json").read_text())
    assert f"{test['accuracy']:.4f} on {test['n']:,} rows" in md
    t = summary["trainable"]
    assert _row(md, "| **total** |")[2] == f"{t['total']:,}"
    assert _row(md, "| **LoRA total** |")[2] == f"{t['lora']:,}"
    assert _row(md, "| **head total** |")[2] == f"{t['head']:,}"


def test_class_distribution_is_that_of_the_best_checkpoints_test_predictions(runs, ag_files):
    from agnews_lora.data import read_files
    from agnews_lora.predict import Classifier

    run = runs[0]
    clf = Classifier.load(run, precision="fp32")
    preds = clf.predict(read_files([str(ag_files["test"])], num_labels=4).texts)
    md = (run / "report.md").read_text()
    table = md.split("## Class distribution of test predictions")[1]
    for label, name in enumerate(clf.label_names):
        assert _row(table, f"| {name} |")[1] == str(preds.count(label))


def test_report_command_rebuilds_the_same_report(runs, capsys):
    run = runs[1]
    before = (run / "report.md").read_text()
    for name in PLOTS + ("report.md",):
        (run / name).unlink()
    main(["report", str(run)])
    assert str(run / "report.md") in capsys.readouterr().out
    assert (run / "report.md").read_text() == before
    for name in PLOTS:
        assert_png(run / name)
    assert "| head | `classifier.out_proj` |" in before  # the linear head has no dense layer


def test_compare_table_sorted_with_each_runs_numbers(runs, tmp_path, capsys):
    out = tmp_path / "cmp" / "table.md"
    main(["compare", str(runs[0]), str(runs[1]), "--output", str(out)])
    printed = capsys.readouterr().out
    md = out.read_text()
    assert_png(out.with_suffix(".png"))
    assert "](table.png)" in md
    summaries = {r.name: json.loads((r / "summary.json").read_text()) for r in runs}
    rows = [_row(md, f"| {name} |") for name in summaries]
    for row, (name, s) in zip(rows, summaries.items()):
        cfg = load_run(runs[0].parent / name).cfg
        assert row[1:5] == [Path(cfg.model.name).name, cfg.model.head, "LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha:g}"]
        assert row[9:12] == [f"{s['trainable']['total']:,}", f"{s['best_val_accuracy']:.4f}",
                             f"{s['test_accuracy']:.4f}"]
        assert row[12:15] == [{"no": "fp32"}.get(s["precision"], s["precision"]), str(cfg.train.seed),
                              f"{s['train_seconds']:.1f}"]
        assert "|".join(row) in printed.replace(" | ", "|")
    order = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith(("| qv-r4", "| all-r2"))]
    expected = sorted(summaries, key=lambda n: summaries[n]["test_accuracy"], reverse=True)
    assert order == expected


def test_unfinished_folder_is_a_clear_error(tmp_path, runs, capsys):
    half = tmp_path / "half"  # training started (config written) but never finished
    half.mkdir()
    (half / "config.yaml").write_text((runs[0] / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=f"{half}: no summary.json"):
        compare_runs([runs[0], half], tmp_path / "t.md")
    assert not (tmp_path / "t.md").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


def test_report_without_test_split_uses_validation(tiny_model_dir, ag_files, tmp_path):
    """No test split: the confusion matrix and class distribution come from the best validation."""
    run = train(load_config(overrides=_overrides(tiny_model_dir, ag_files, tmp_path / "cache", tmp_path / "run")
                            + ["data.test=[]", "train.max_steps=3"]))
    assert not (run / "test_metrics.json").exists()
    md = write_report(run).read_text()
    assert "## Confusion matrix (validation, best checkpoint)" in md
    assert "## Class distribution of validation predictions" in md and "test accuracy" not in md
    best = [e for e in read_jsonl(run / "metrics.jsonl") if e.get("best")][-1]
    assert _row(md, "| **World** |")[1:] == [str(v) for v in best["val_confusion"][0]] + [
        str(sum(best["val_confusion"][0]))]
    for name in PLOTS:
        assert_png(run / name)


@pytest.mark.parametrize("method, overrides, size", [
    ("bitfit", [], "-"), ("ia3", [], "-"), ("vera", ["peft.vera.r=64"], "r=64"),
    ("prompt", ["peft.prompt.num_virtual_tokens=12"], "num_virtual_tokens=12"),
    ("adalora", ["peft.adalora.init_r=12"], "init_r=12"), ("dora", ["lora.r=3", "lora.alpha=6"], "r=3, alpha=6")])
def test_compare_table_names_each_method_and_its_own_size(runs, method, overrides, size):
    """A run of another PEFT method shows its method and size option, not LoRA's r/alpha; methods
    without a placement (prompt, bitfit) show no modules/layers."""
    from dataclasses import replace

    from agnews_lora.report import compare_table

    run = load_run(runs[0])
    cfg = load_config(overrides=[f"peft.method={method}", *overrides])
    other = replace(run, path=run.path.with_name(f"{method}-run"), cfg=replace(run.cfg, peft=cfg.peft, lora=cfg.lora))
    row = _row(compare_table([other]), f"| {method}-run |")
    from agnews_lora.methods import NAMES, PLACED

    assert row[3:5] == [NAMES[method], size]
    assert (row[5] == "-") == (method not in PLACED)
