"""The CLI end to end on a tiny setting: train -> evaluate -> predict -> reload, the same
predictions; plain-peft reload parity; `budget`; bad input gives one `error:` line, exit 2."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agnews_lora import runs
from agnews_lora.errors import RunDamaged
from agnews_lora.checkpoint import read_jsonl
from agnews_lora.cli import main
from agnews_lora.config import ConfigError
from agnews_lora.data import read_file
from conftest import tiny_run_overrides

CLI = Path(sys.executable).parent / "agnews-lora"  # the console script pip installed beside python
METRIC_KEYS = [f"val_{m}_{avg}" for m in ("precision", "recall", "f1") for avg in ("weighted", "macro")]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """cli.main in-process; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_subprocess(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def train_overrides(tiny_model_dir, ag_files, out: Path) -> list[str]:
    return tiny_run_overrides(tiny_model_dir, ag_files, out.parent / "cache", out)


@pytest.fixture(scope="module")
def run(tiny_model_dir, ag_files, tmp_path_factory) -> Path:
    """One tiny training run through `agnews-lora train`, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    main(["train", *train_overrides(tiny_model_dir, ag_files, out)])
    return out


def test_train_writes_the_run_folder(run, tiny_model_dir, ag_files):
    from agnews_lora.config import load_config
    from agnews_lora.data import resolve_labels

    # The resolved config in the run folder is the config the command line asked for, with the
    # classes the data told (the command line left them open).
    asked = load_config(overrides=train_overrides(tiny_model_dir, ag_files, run))
    assert load_config(run / "config.yaml") == resolve_labels(asked) != asked
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lora"]["r"] == 4 and cfg["train"]["max_steps"] == 6 and cfg["out_dir"] == str(run)

    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [3, 6]
    for m in metrics:
        assert 0 <= m["val_accuracy"] <= 1 and m["val_n"] == 40 and math.isfinite(m["val_loss"])
        assert all(0 <= m[k] <= 1 for k in METRIC_KEYS)
        confusion = np.array(m["val_confusion"])
        assert confusion.sum() == 40 and np.trace(confusion) / 40 == pytest.approx(m["val_accuracy"])

    log = read_jsonl(run / "train_log.jsonl")
    assert log[-1]["step"] == 6 and math.isfinite(log[-1]["loss"]) and log[-1]["examples"] == 6 * 8

    assert (run / "best" / "adapter_model.safetensors").is_file()
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"

    summary = json.loads((run / "summary.json").read_text())
    test = json.loads((run / "test_metrics.json").read_text())
    best = max(metrics, key=lambda m: (m["val_accuracy"], -m["step"]))  # the first of equals is kept
    assert summary["steps"] == 6 and summary["best_step"] == best["step"]
    assert summary["best_val_accuracy"] == best["val_accuracy"]
    assert summary["test_accuracy"] == test["accuracy"]
    from agnews_lora.model import budget_breakdown

    assert summary["trainable"]["total"] == budget_breakdown(load_config(run / "config.yaml")).total
    assert test["n"] == 120 and np.trace(test["confusion"]) / 120 == pytest.approx(test["accuracy"])
    assert set(test["per_class"]) == {"World", "Sports", "Business", "Sci/Tech"}
    assert [p.name for p in run.rglob(".*")] == [runs.MARKER]  # the marker; no temporary files or folders left


def test_evaluate_matches_the_training_runs_test_metrics(run, capsys):
    code, out, _ = run_cli(["evaluate", run], capsys)
    assert code == 0 and "accuracy" in out and "confusion" in out
    evaluated = json.loads((run / "eval.json").read_text())
    test = json.loads((run / "test_metrics.json").read_text())
    assert evaluated["accuracy"] == test["accuracy"] and evaluated["confusion"] == test["confusion"]
    for key in ("precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        assert evaluated[key] == pytest.approx(test[key])


def test_train_writes_test_predictions_and_evaluate_writes_the_same(run, ag_files, tmp_path, capsys):
    """RUN/test_predictions.npz: per test row the gold label and best/'s logits, in file order;
    `evaluate --predictions` on the same rows gives the same labels and predictions."""
    from agnews_lora import runs

    saved = runs.read_predictions(run / runs.TEST_PREDICTIONS)
    test = json.loads((run / "test_metrics.json").read_text())
    assert saved["labels"].tolist() == read_file(ag_files["test"]).labels and saved["logits"].shape == (120, 4)
    assert (saved["preds"] == saved["labels"]).mean() == pytest.approx(test["accuracy"])
    assert saved["source"] == test["data"]
    code, out, _ = run_cli(["evaluate", run, "--output", tmp_path / "e.json", "--predictions", tmp_path / "p.npz"],
                           capsys)
    assert code == 0 and f"and {tmp_path / 'p.npz'}" in out
    again = runs.read_predictions(tmp_path / "p.npz")
    assert again["labels"].tolist() == saved["labels"].tolist() and again["preds"].tolist() == saved["preds"].tolist()
    np.testing.assert_allclose(again["logits"], saved["logits"], atol=1e-4)


def test_evaluate_predictions_are_refused_where_they_would_mislead(run, ag_files, tmp_path, capsys):
    """Other rows' predictions never go inside the run folder (its test_predictions.npz means its
    test rows); the metrics file is not also the predictions file; a damaged file is named."""
    from agnews_lora import runs

    code, _, err = run_cli(["evaluate", run, "--data", ag_files["test"], "--output", tmp_path / "e.json",
                            "--predictions", run / "other.npz"], capsys)
    assert code == 2 and "lies inside the run folder" in err and not (run / "other.npz").exists()
    code, _, err = run_cli(["evaluate", run, "--output", tmp_path / "e.json", "--predictions", tmp_path / "e.json"],
                           capsys)
    assert code == 2 and "is also the metrics file" in err
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(RunDamaged, match="bad.npz: damaged predictions file"):
        runs.read_predictions(tmp_path / "bad.npz")
    assert runs.read_predictions(tmp_path / "absent.npz") is None


def test_paired_difference_by_hand():
    from agnews_lora.evaluate import paired_difference

    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    a = [0, 1, 2, 3, 0, 1, 0, 0]  # 6 right
    b = [0, 1, 2, 0, 0, 0, 2, 0]  # 5 right; a only: rows 3 and 5, b only: row 6
    d = paired_difference(labels, a, b)
    diffs = np.array([0, 0, 0, 1, 0, 1, -1, 0], dtype=float)
    assert d["difference"] == pytest.approx(1 / 8) and (d["a_only"], d["b_only"], d["n"]) == (2, 1, 8)
    assert d["se"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(8))
    assert paired_difference(labels, a, a) == {"difference": 0.0, "se": 0.0, "a_only": 0, "b_only": 0, "n": 8}
    with pytest.raises(ValueError, match="8 labels, 8 and 7 predictions"):
        paired_difference(labels, a, b[:7])
    from agnews_lora.evaluate import accuracy_se

    assert accuracy_se(0.9, 100) == pytest.approx(0.03) and accuracy_se(0.5, 0) == 0.0


def test_predict_via_console_script_and_reload_parity(run, ag_files, tmp_path):
    from agnews_lora.predict import Classifier

    out = tmp_path / "out.csv"
    proc = run_subprocess(["predict", run, "--input", ag_files["test"], "--output", out])
    assert proc.returncode == 0, proc.stderr
    assert "wrote 120 predictions" in proc.stdout
    test = json.loads((run / "test_metrics.json").read_text())
    assert f"accuracy {test['accuracy']:.4f}" in proc.stdout  # labelled input: scored too
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ID", "Label"] and len(rows) == 121
    assert [int(r[0]) for r in rows[1:]] == list(range(120))
    labels = [int(r[1]) for r in rows[1:]]
    assert set(labels) <= {0, 1, 2, 3}

    texts = read_file(ag_files["test"]).texts
    assert Classifier.load(run).predict(texts) == labels


def test_predict_unlabelled_pickle(run, tmp_path, capsys):
    import datasets

    texts = ["Stocks rally as oil falls", "Federer wins in Paris", "New chip doubles speed"]
    with open(tmp_path / "test.pkl", "wb") as fh:
        pickle.dump(datasets.Dataset.from_dict({"text": texts}), fh)
    code, out, err = run_cli(["predict", run, "--input", tmp_path / "test.pkl", "--output", tmp_path / "p.csv"],
                             capsys)
    assert code == 0, err
    assert "accuracy" not in out  # nothing to score without labels
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "ID,Label" and len(lines) == 4
    from agnews_lora.predict import Classifier

    assert [int(line.split(",")[1]) for line in lines[1:]] == Classifier.load(run).predict(texts)


def test_plain_peft_reload_gives_the_same_logits(run, tiny_model_dir, ag_files):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from agnews_lora.predict import Classifier

    texts = read_file(ag_files["test"]).texts[:32]
    clf = Classifier.load(run, precision="fp32")
    ours = clf.predict_logits(texts)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=4)
    plain = PeftModel.from_pretrained(base, run / "best").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.inference_mode():
        theirs = plain(**batch).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def test_budget_prints_the_breakdown_and_exit_code(tiny_model_dir, capsys):
    args = ["budget", f"model.name={tiny_model_dir}", "lora.r=4"]
    code, out, _ = run_cli(args, capsys)
    total = 2 * 2 * 4 * (32 + 32) + (32 * 32 + 32) + (32 * 4 + 4)  # LoRA q+v in 2 layers + RoBERTa head
    assert code == 0
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("Total trainable")] == [f"{total:,}"]
    assert "attention.self.query" in out and "layer 1" in out and "-> fits" in out
    code, out, _ = run_cli([*args, "budget.max_trainable=1000"], capsys)
    assert code == 1 and f"EXCEEDS by {total - 1000:,}" in out
    code, out, _ = run_cli([*args, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["total"] == total and data["fits"] is True and data["head"] == 1188


@pytest.mark.parametrize("args, message", [
    (["train", "lora.rr=1"], "error: unknown config key 'lora.rr'"),
    (["budget", "train.lr=fast"], "error: train.lr: expected a number, got 'fast'"),
    (["train", "--config", "no-such.yaml"], "error: config file no-such.yaml does not exist"),
    (["evaluate", "no-such-run"], "error: no-such-run: no such folder"),
])
def test_bad_input_prints_one_error_line_and_exits_2(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(message)


def test_hub_id_offline_through_the_cli(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["budget", "model.name=agnews-lora-tests/not-a-cached-model"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: cannot download model 'agnews-lora-tests/not-a-cached-model'")
    assert "set model.name to a local model folder" in err


def test_bad_data_through_the_cli(run, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text('"3","a","b"\n"7","c","d"\n')
    code, _, err = run_cli(["predict", run, "--input", bad, "--output", tmp_path / "o.csv"], capsys)
    assert code == 2 and err.strip() == f"error: {bad}: row 2: label 7 is out of range 1..4 (classes: World, Sports, " \
        "Business, Sci/Tech)"
    assert not (tmp_path / "o.csv").exists()
    code, _, err = run_cli(["train", f"model.name={tiny_model_dir}", f"data.train={tmp_path / 'missing.csv'}",
                            f"out_dir={tmp_path / 'r'}", "lora.r=4"], capsys)
    assert code == 2 and err.strip().startswith(f"error: {tmp_path / 'missing.csv'}: no such file")
    code, _, err = run_cli(["train", f"model.name={tiny_model_dir}", "budget.max_trainable=10",
                            f"out_dir={tmp_path / 'r2'}"], capsys)
    assert code == 2 and err.startswith("error: ") and "exceed budget.max_trainable=10" in err
    assert "Total trainable" in err and "Traceback" not in err  # the breakdown, not a traceback


def test_console_script_error_has_no_traceback():
    proc = run_subprocess(["train", "lora.r=abc"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: lora.r: expected an integer, got 'abc'"
