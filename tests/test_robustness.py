"""`agnews-lora robustness` end to end on a tiny real run: the files it writes, and numbers that
agree with the Classifier, the run's own splits and each other; bad inputs are one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from agnews_lora.calibration import fit_temperature, nll
from agnews_lora.cli import main
from agnews_lora.config import ConfigError, load_config
from agnews_lora.data import load_splits, read_file, stratified_indices
from agnews_lora.perturb import SUITE, Spec, perturb_texts
from agnews_lora.predict import Classifier
from agnews_lora.robustness import PLOTS, resolve_suite
from agnews_lora.train import train
from conftest import tiny_run_overrides
from test_report import assert_png

MAX_ROWS, SEED = 60, 1


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, ag_files, tmp_path_factory):
    """A tiny run trained on all four classes (the shared small train file holds two); that its
    rows overlap the scored test rows does not matter: these tests check consistency, not accuracy."""
    base = tmp_path_factory.mktemp("robustness")
    test = read_file(ag_files["test"])
    train_file = write_csv(base / "train.csv", ["label", "text"], zip(test.labels[:100], test.texts[:100]))
    files = {"train": train_file, "test": ag_files["test"]}
    return train(load_config(overrides=tiny_run_overrides(tiny_model_dir, files, base / "cache", base / "run")))


@pytest.fixture(scope="module")
def unlabelled(ag_files, tmp_path_factory):
    """The same 30 texts twice: with a text column only, and with labels too."""
    split = read_file(ag_files["train"])
    texts, labels = split.texts[-30:], split.labels[-30:]
    base = tmp_path_factory.mktemp("unlabelled")
    return {"plain": write_csv(base / "plain.csv", ["text"], [[t] for t in texts]),
            "labelled": write_csv(base / "labelled.csv", ["label", "text"], zip(labels, texts)), "texts": texts}


@pytest.fixture(scope="module")
def report(run, unlabelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    main(["robustness", str(run), "--unlabelled", str(unlabelled["plain"]), "--max-rows", str(MAX_ROWS),
          "--seed", str(SEED), "--output", str(out)])
    return out, json.loads((out / "robustness.json").read_text())


@pytest.fixture(scope="module")
def clf(run):
    return Classifier.load(run)


@pytest.fixture(scope="module")
def rows(run, clf):
    """The labelled rows the report scored: a stratified subset of the run's test file."""
    test = read_file(clf.cfg.data.test[0])
    _, idx = stratified_indices(test.labels, size=MAX_ROWS, seed=SEED)
    return test.subset(idx), idx


def test_writes_markdown_json_and_valid_pngs(report):
    out, result = report
    md = (out / "robustness.md").read_text()
    assert set(result["plots"].values()) == set(PLOTS.values())
    for name in PLOTS.values():
        assert f"]({name})" in md
        assert_png(out / name)
    assert [p["label"] for p in result["perturbations"]] == [s.label for s in SUITE]
    for p in result["perturbations"]:  # one row per perturbation, with its numbers
        line = next(line for line in md.splitlines() if line.startswith(f"| `{p['label']}` |"))
        assert f"| {p['accuracy']:.4f} | {100 * p['drop']:+.2f} |" in line
    assert f"| clean |  | - | {result['clean']['accuracy']:.4f} |" in md
    assert f"{result['calibration']['temperature']:.4f}" in md
    assert f"{result['unlabelled']['low_confidence_share']:.1%}" in md
    assert json.loads(json.dumps(result, allow_nan=False)) == result  # strict JSON: no NaN


def test_clean_and_perturbed_accuracy_match_the_classifier(report, clf, rows):
    _, result = report
    split, idx = rows
    assert result["data"] == {"source": str(clf.cfg.data.test[0]), "rows": MAX_ROWS, "rows_in_file": 120,
                              "max_rows": MAX_ROWS, "seed": SEED}
    labels = np.asarray(split.labels)
    assert result["clean"]["n"] == MAX_ROWS
    assert result["clean"]["accuracy"] == pytest.approx((np.asarray(clf.predict(split.texts)) == labels).mean())
    for spec, p in zip(SUITE, result["perturbations"]):
        assert p["drop"] == pytest.approx(result["clean"]["accuracy"] - p["accuracy"])
        assert p["f1_drop"] == pytest.approx(result["clean"]["f1_macro"] - p["f1_macro"])
        assert 0 <= p["changed_share"] <= 1
    lower = next(p for p in result["perturbations"] if p["name"] == "lowercase")
    texts = perturb_texts(split.texts, Spec("lowercase", 0.0), seed=SEED, rows=idx)
    assert lower["accuracy"] == pytest.approx((np.asarray(clf.predict(texts)) == labels).mean())
    typos = result["perturbations"][1]
    texts = perturb_texts(split.texts, SUITE[1], seed=SEED, rows=idx)
    assert typos["accuracy"] == pytest.approx((np.asarray(clf.predict(texts)) == labels).mean())
    assert result["suite_mean_accuracy"] == pytest.approx(np.mean([p["accuracy"] for p in result["perturbations"]]))


def test_calibration_uses_the_runs_validation_split(report, clf, rows):
    _, result = report
    cal, (split, _) = result["calibration"], rows
    _, val, _ = load_splits(clf.cfg.data, seed=clf.cfg.train.seed, num_labels=4)
    assert cal["fit_rows"] == len(val) == 40
    assert cal["temperature"] == pytest.approx(fit_temperature(clf.predict_logits(val.texts), val.labels), rel=1e-3)
    logits = clf.predict_logits(split.texts)
    assert cal["before"]["nll"] == pytest.approx(nll(logits, split.labels), rel=1e-4)
    assert cal["after"]["nll"] == pytest.approx(nll(logits, split.labels, cal["temperature"]), rel=1e-4)
    assert cal["before"]["accuracy"] == cal["after"]["accuracy"] == result["clean"]["accuracy"]
    assert sum(cal["after"]["reliability"]["count"]) == MAX_ROWS and cal["bins"] == 15


def test_unlabelled_section_numbers(report, clf, unlabelled):
    _, result = report
    u = result["unlabelled"]
    assert u["n"] == 30 and u["labels_ignored"] is False and u["threshold"] == 0.5
    assert sum(u["predicted_share"]) == pytest.approx(1.0)
    assert sum(u["predicted_share_em"]) == pytest.approx(1.0)
    assert sum(u["estimated_prior_em"]) == pytest.approx(1.0)
    train, _, _ = load_splits(clf.cfg.data, seed=clf.cfg.train.seed, num_labels=4)
    assert u["train_prior"] == pytest.approx((np.bincount(train.labels, minlength=4) / len(train)).tolist())
    preds = clf.predict(unlabelled["texts"])
    assert u["predicted_share"] == pytest.approx((np.bincount(preds, minlength=4) / 30).tolist())
    lengths = [len(t.split()) for t in unlabelled["texts"]]
    assert u["length_words"]["median"] == np.median(lengths)
    assert u["train_length_words"]["median"] == np.median([len(t.split()) for t in train.texts])
    assert 0 <= u["low_confidence_share"] <= 1 and 0.25 <= u["mean_confidence"] <= 1
    assert sum(u["histograms"]["confidence"]["after"]) == 30 == sum(u["histograms"]["length_words"]["unlabelled"])


def test_labels_in_the_unlabelled_file_are_ignored(run, report, unlabelled, capsys):
    main(["robustness", str(run), "--unlabelled", str(unlabelled["labelled"]), "--max-rows", str(MAX_ROWS),
          "--seed", str(SEED), "--perturbations", "lowercase,typos:0.2"])
    out = capsys.readouterr().out
    assert "| `typos:0.2` |" in out and f"wrote {run / 'robustness.md'}" in out  # default: the run folder
    result = json.loads((run / "robustness.json").read_text())
    assert [p["label"] for p in result["perturbations"]] == ["lowercase", "typos:0.2"]
    u, before = result["unlabelled"], report[1]["unlabelled"]
    assert u["labels_ignored"] is True
    for key in ("predicted_share", "predicted_share_em", "mean_confidence", "mean_entropy", "length_words"):
        assert u[key] == pytest.approx(before[key])
    assert result["clean"] == report[1]["clean"]


@pytest.mark.parametrize("args, message", [
    (["--unlabelled", "{empty}"], "empty.csv: the file is empty"),
    (["--unlabelled", "{header_only}"], "header.csv: no rows"),
    (["--perturbations", "typos,typoz"], "error: perturbations: unknown perturbation 'typoz'; valid: typos, "
                                         "delete_words, shuffle_words, lowercase, uppercase, truncate_words, "
                                         "replace_entities"),
    (["--perturbations", "typos:2"], "error: perturbations: 'typos:2': share of letters changed must be in [0, 1]"),
    (["--max-rows", "-1"], "error: --max-rows must be >= 0"),
    (["--batch-size", "0"], "error: --batch-size must be >= 1"),
    (["--data", "{header_only_text}"], "has no labels; the perturbation suite needs labelled rows"),
])
def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys, args, message):
    files = {"empty": tmp_path / "empty.csv", "header_only": tmp_path / "header.csv",
             "header_only_text": write_csv(tmp_path / "texts.csv", ["text"], [["Stocks rally as oil falls"]])}
    files["empty"].write_text("")
    files["header_only"].write_text("text\n")
    with pytest.raises(SystemExit) as exit_:
        main(["robustness", str(run), *(a.format(**files) for a in args)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1


def test_no_prior_correction_when_a_class_has_no_training_rows():
    from agnews_lora.data import Split
    from agnews_lora.robustness import _unlabelled_md, unlabelled_section

    rng = np.random.default_rng(0)
    train = Split(["a b c"] * 6, [2, 2, 3, 3, 3, 3])
    u = unlabelled_section(Split(["one two", "three"], None), rng.normal(size=(2, 4)), rng.normal(size=(5, 4)),
                           train, temperature=1.5, threshold=0.5)
    assert u["train_prior"] == pytest.approx([0, 0, 1 / 3, 2 / 3])
    assert u["estimated_prior_em"] is None and u["predicted_share_em"] is None
    md = "\n".join(_unlabelled_md(["World", "Sports", "Business", "Sci/Tech"], u))
    assert "No EM prior correction: no training rows of World, Sports." in md
    assert u["length_words"] == {"median": 1.5, "p95": pytest.approx(1.95), "mean": 1.5}


def test_resolve_suite():
    assert resolve_suite(None) == list(SUITE)
    assert resolve_suite(["truncate_words:5"]) == [Spec("truncate_words", 5.0)]
    with pytest.raises(ConfigError, match="give at least one"):
        resolve_suite([])
