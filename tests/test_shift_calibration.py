"""Label-free calibration of the prior-matched rows (`predict.shift_calibration=keep-confidence`,
calibration.confidence_temperature / sharpen, shift.match_shifted) and self-training on the
matched pseudo-labels (`self_train.prior=match-shifted`)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from agnews_lora import shift
from agnews_lora import train as train_mod
from agnews_lora.calibration import confidence_temperature, match_prior, sharpen
from agnews_lora.cli import main
from agnews_lora.config import ConfigError
from agnews_lora.data import read_file
from agnews_lora.predict import Classifier, resolve_shift_calibration
from conftest import skewed_posteriors, tiny_run_overrides


def _by_hand_top(probs: np.ndarray, t: float) -> float:
    """Mean top probability of p^(1/t) renormalised, written out without the library."""
    total = 0.0
    for row in probs:
        powered = [p ** (1.0 / t) for p in row]
        total += max(powered) / sum(powered)
    return total / len(probs)


_skewed = skewed_posteriors


def test_sharpen_is_a_temperature_on_probabilities():
    probs, _ = _skewed(50, 0, skew=0.0)
    np.testing.assert_allclose(sharpen(probs, 1.0), probs, atol=1e-12)
    for t in (0.3, 2.5):
        got = sharpen(probs, t)
        want = probs ** (1 / t) / (probs ** (1 / t)).sum(1, keepdims=True)
        np.testing.assert_allclose(got, want, rtol=1e-9)
        assert (got.argmax(1) == probs.argmax(1)).all()
    assert sharpen(np.array([[0.5, 0.5, 0.0, 0.0]]), 0.5)[0, 2] == 0.0  # an absent class stays absent


def test_confidence_temperature_hits_the_target():
    probs, _ = _skewed(200, 1, skew=0.0)
    now = probs.max(1).mean()
    for target in (now - 0.1, now, min(0.99, now + 0.05)):
        t = confidence_temperature(probs, target)
        assert _by_hand_top(probs, t) == pytest.approx(target, abs=1e-5)
    assert confidence_temperature(probs, now) == pytest.approx(1.0, rel=1e-4)
    assert confidence_temperature(probs, 0.2) == pytest.approx(20.0, rel=1e-4)  # below 1/classes: the bound
    assert confidence_temperature(np.zeros((0, 4)), 0.9) == 1.0
    with pytest.raises(ConfigError, match="confidence target"):
        confidence_temperature(probs, float("nan"))


def test_keep_confidence_restores_the_matched_rows_confidence_and_keeps_labels():
    in_dist, _ = _skewed(1000, 3, skew=0.0)
    shifted, y = _skewed(1000, 4, skew=1.5)
    probs = np.vstack([in_dist, shifted])
    scores = np.r_[np.full(1000, 0.4), np.full(1000, 0.9)]
    plain, info_plain = shift.match_shifted(probs, scores, [0.25] * 4)
    kept, info = shift.match_shifted(probs, scores, [0.25] * 4, calibration="keep-confidence")
    np.testing.assert_array_equal(kept[:1000], in_dist)  # rows not matched are untouched
    assert (kept.argmax(1) == plain.argmax(1)).all()  # labels are the matched ones
    # independent: match by hand (library's match_prior), then the mean top probability equals the one before
    matched = match_prior(shifted, [0.25] * 4)[0]
    np.testing.assert_allclose(plain[1000:], matched, atol=1e-12)
    assert kept[1000:].max(1).mean() == pytest.approx(shifted.max(1).mean(), abs=1e-5)
    np.testing.assert_allclose(kept[1000:], sharpen(matched, info["temperature"]), atol=1e-5)
    assert info["temperature"] > 0 and info["calibration"] == "keep-confidence"
    assert info["confidence"]["before"] == pytest.approx(shifted.max(1).mean(), abs=1e-6)
    assert info_plain["calibration"] == "none" and "temperature" not in info_plain
    few, info = shift.match_shifted(probs, np.zeros(2000), [0.25] * 4, calibration="keep-confidence")
    np.testing.assert_array_equal(few, probs)
    assert "too few" in info["skipped"]
    with pytest.raises(ConfigError, match="choose from none, keep-confidence"):
        shift.match_shifted(probs, scores, [0.25] * 4, calibration="sometimes")


NEWS = "market shares rally bank profit team match coach league election minister talks".split()
GARBLED = "quantum metaverse blockchain influencer crypto drone vaccine startup neural orbit".split()


@pytest.fixture(scope="module")
def run(tiny_model_dir, ag_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("shift-calibration") / "run"
    main(["train", *tiny_run_overrides(tiny_model_dir, ag_files, out.parent / "cache", out),
          "predict.prior=match-shifted", "predict.shift_calibration=keep-confidence"])
    return out


@pytest.fixture(scope="module")
def shifted_file(ag_files, tmp_path_factory):
    """120 AG News test texts and 200 garbled ones no training text looks like."""
    rng = np.random.default_rng(0)
    texts = read_file(ag_files["test"]).texts + [" ".join(rng.choice(GARBLED, size=14)) for _ in range(200)]
    path = tmp_path_factory.mktemp("shifted") / "batch.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"])
        writer.writerows([t] for t in texts)
    return path, texts


def _probs(path):
    with open(path) as fh:
        return np.array([[float(v) for v in row[1:]] for row in list(csv.reader(fh))[1:]])


def test_predict_applies_the_runs_shift_calibration(run, shifted_file, tmp_path, capsys):
    path, texts = shifted_file
    clf = Classifier.load(run, precision="fp32")
    logits = clf.predict_logits(texts)
    outs = {}
    for name, extra in (("default", []), ("none", ["--shift-calibration", "none"])):
        out = tmp_path / f"{name}.csv"
        main(["predict", str(run), "--input", str(path), "--output", str(out), "--probs", *extra])
        outs[name] = _probs(out.with_name(f"{name}.probs.csv"))
    printed = capsys.readouterr().out
    assert "keep-confidence: temperature" in printed
    matched = clf.probabilities(logits, prior="match-shifted", texts=texts)
    shifted_rows = np.flatnonzero(np.abs(matched - clf.probabilities(logits)).max(1) > 1e-7)
    assert len(shifted_rows) >= 100
    np.testing.assert_allclose(outs["none"], matched, atol=2e-6)
    kept = clf.probabilities(logits, prior="match-shifted", texts=texts, shift_calibration="keep-confidence")
    np.testing.assert_allclose(outs["default"], kept, atol=2e-6)
    assert (outs["default"].argmax(1) == outs["none"].argmax(1)).all()
    info = clf.last_shift
    rows = np.flatnonzero(shift.shift_scores(clf.training_texts(), texts) > info["threshold"])
    assert info["shifted_rows"] == len(rows)
    before = clf.probabilities(logits)[rows].max(1).mean()
    assert info["confidence"]["before"] == pytest.approx(before, abs=1e-5)
    np.testing.assert_allclose(kept[rows], sharpen(matched[rows], info["temperature"]), atol=1e-5)
    # the mean top probability is restored, unless the matched rows cannot get there within the
    # temperature's bounds (this tiny run's 400 training rows hold two classes, so matching leaves two)
    at_bound = min(abs(info["temperature"] - 0.05), abs(info["temperature"] - 20.0)) < 1e-3
    assert at_bound or kept[rows].max(1).mean() == pytest.approx(before, abs=1e-4)


def test_shift_calibration_needs_match_shifted(run, ag_files, tmp_path, capsys):
    clf = Classifier.load(run, precision="fp32")
    assert resolve_shift_calibration(clf, "match-shifted") == "keep-confidence"  # the run's default
    assert resolve_shift_calibration(clf, "em") is None
    with pytest.raises(ConfigError, match="goes with prior 'match-shifted'"):
        resolve_shift_calibration(clf, "match", "keep-confidence")
    with pytest.raises(ConfigError, match="choose from"):
        resolve_shift_calibration(clf, "match-shifted", "often")
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(out), "--prior", "em",
              "--shift-calibration", "keep-confidence"])
    assert exit_.value.code == 2
    assert "--shift-calibration goes with --prior match-shifted" in capsys.readouterr().err
    assert not out.exists()


def test_self_training_on_matched_pseudo_labels(make_cfg, shifted_file, tmp_path):
    """The round's pseudo-labels are the matched labels of round 0's model: the same as a run
    without the round labels the file with `prior="match-shifted"` (round 0 is the same run)."""
    path, texts = shifted_file
    ref = train_mod.train(make_cfg(tmp_path / "ref"))
    extra = (f"data.unlabelled={path}", "self_train.threshold=0.0", "self_train.steps=2", "self_train.balance=false",
             "self_train.prior=match-shifted", "predict.shift_calibration=keep-confidence")
    run = train_mod.train(make_cfg(tmp_path / "run", *extra))
    pseudo = json.loads((run / "pseudo_labels.json").read_text())
    assert pseudo["prior"] == "match-shifted" and pseudo["match_shifted"]["shifted_rows"] >= 100
    assert pseudo["match_shifted"]["calibration"] == "keep-confidence" and pseudo["rows"] == len(texts)
    clf = Classifier.load(ref, precision="fp32")
    assert pseudo["temperature"] == pytest.approx(clf.temperature, rel=1e-5)
    want = clf.probabilities(clf.predict_logits(texts), prior="match-shifted", texts=texts,
                             shift_calibration="keep-confidence").argmax(1)
    assert (np.asarray(pseudo["labels"]) == want).mean() >= 0.98  # near-ties of a 6-step model may differ
    summary = json.loads((run / "summary.json").read_text())
    assert summary["self_train"]["prior"] == "match-shifted" and summary["steps"] == 8
