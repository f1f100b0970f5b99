"""Prior matching (calibration.match_prior) and its domain-aware form (shift.py, `--prior
match-shifted`): the batch's mean posterior hits the target, a model's class skew on shifted rows
is removed while rows like the training texts keep their predictions, and the CLI/API paths."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from agnews_lora import shift
from agnews_lora.calibration import match_prior
from agnews_lora.cli import main
from agnews_lora.config import ConfigError
from agnews_lora.data import read_file
from agnews_lora.predict import Classifier
from conftest import skewed_posteriors, tiny_run_overrides


_skewed = skewed_posteriors


def test_match_prior_hits_the_target_and_removes_a_skew():
    probs, labels = _skewed(4000, 0, skew=1.5)
    before = (probs.argmax(1) == labels).mean()
    assert np.bincount(probs.argmax(1), minlength=4)[3] / 4000 > 0.35  # the skew
    matched, weights = match_prior(probs, [0.25] * 4)
    np.testing.assert_allclose(matched.mean(0), [0.25] * 4, atol=1e-6)
    np.testing.assert_allclose(matched.sum(1), 1.0, atol=1e-9)
    assert weights[3] < weights[:3].min()  # class 3 weighed down
    assert (matched.argmax(1) == labels).mean() > before + 0.03
    # a batch already at the target is left as it is
    fair, _ = _skewed(4000, 1, skew=0.0)
    np.testing.assert_allclose(match_prior(fair, fair.mean(0))[0], fair, atol=1e-6)


def test_match_prior_keeps_an_absent_class_at_zero():
    probs = np.array([[0.7, 0.3, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0]])
    matched, weights = match_prior(probs, [0.5, 0.5, 0.0, 0.0])
    assert np.isfinite(matched).all() and matched[:, 2:].max() == 0.0 and weights[2:].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(matched.mean(0)[:2], [0.5, 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="at least one row"):
        match_prior(np.zeros((0, 4)), [0.25] * 4)


def _texts(n: int, words: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=12)) for _ in range(n)]


NEWS = "market shares rally bank profit team match coach league election minister talks".split()
GARBLED = "quantum metaverse blockchain influencer crypto drone vaccine startup".split()


def test_shift_scores_tell_shifted_texts_from_training_like_ones():
    reference = _texts(600, NEWS, 0)
    batch = _texts(300, NEWS, 1) + _texts(300, GARBLED + NEWS[:3], 2)
    scores = shift.shift_scores(reference, batch)
    assert scores.shape == (600,) and ((scores >= 0) & (scores <= 1)).all()
    assert (scores[:300] > shift.DEFAULT_THRESHOLD).mean() < 0.1  # like the training texts
    assert (scores[300:] > shift.DEFAULT_THRESHOLD).mean() > 0.9  # shifted
    np.testing.assert_array_equal(scores, shift.shift_scores(reference, batch))  # deterministic
    with pytest.raises(ConfigError, match="at least 5 reference"):
        shift.shift_scores(reference[:3], batch)


def test_match_shifted_changes_only_the_shifted_rows():
    in_dist, y_in = _skewed(1000, 3, skew=0.0)
    shifted, y_sh = _skewed(1000, 4, skew=1.5)
    probs = np.vstack([in_dist, shifted])
    scores = np.r_[np.full(1000, 0.4), np.full(1000, 0.9)]
    out, info = shift.match_shifted(probs, scores, [0.25] * 4, threshold=0.6)
    np.testing.assert_array_equal(out[:1000], in_dist)  # training-like rows untouched
    np.testing.assert_allclose(out[1000:].mean(0), [0.25] * 4, atol=1e-6)
    assert (out[1000:].argmax(1) == y_sh).mean() > (shifted.argmax(1) == y_sh).mean() + 0.03
    assert info["shifted_rows"] == 1000 and len(info["weights"]) == 4
    few, info = shift.match_shifted(probs, np.r_[np.zeros(1990), np.ones(10)], [0.25] * 4)
    np.testing.assert_array_equal(few, probs)  # 10 shifted rows: too few to match a prior
    assert "too few" in info["skipped"] and info["weights"] is None
    with pytest.raises(ConfigError, match="must be in"):
        shift.match_shifted(probs, scores, [0.25] * 4, threshold=1.0)


@pytest.fixture(scope="module")
def run(tiny_model_dir, ag_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("shift-match") / "run"
    main(["train", *tiny_run_overrides(tiny_model_dir, ag_files, out.parent / "cache", out)])
    return out


def test_predict_cli_match_and_match_shifted(run, ag_files, tmp_path, capsys):
    clf = Classifier.load(run, precision="fp32")
    texts = read_file(ag_files["test"]).texts
    logits = clf.predict_logits(texts)
    for prior in ("match", "match-shifted"):
        out = tmp_path / f"{prior}.csv"
        main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(out), "--prior", prior,
              "--probs"])
        with open(out.with_name(f"{prior}.probs.csv")) as fh:
            probs = np.array([[float(v) for v in row[1:]] for row in list(csv.reader(fh))[1:]])
        expected = clf.probabilities(logits, prior=prior, texts=texts)
        np.testing.assert_allclose(probs, expected, atol=2e-6)
        with open(out) as fh:
            assert [int(r[1]) for r in list(csv.reader(fh))[1:]] == expected.argmax(1).tolist()
    printed = capsys.readouterr().out
    assert "match-shifted:" in printed and "rows scored above 0.6" in printed
    # the test rows are the training distribution's: too few shifted rows, nothing changes
    np.testing.assert_allclose(clf.probabilities(logits, prior="match-shifted", texts=texts),
                               clf.probabilities(logits), atol=1e-6)
    np.testing.assert_allclose(clf.probabilities(logits, prior="match").mean(0), clf.class_prior, atol=1e-5)


def test_match_shifted_errors_are_clear(run, ag_files, tmp_path, capsys):
    clf = Classifier.load(run, precision="fp32")
    with pytest.raises(ConfigError, match="needs the texts of the rows"):
        clf.probabilities(np.zeros((3, 4)), prior="match-shifted")
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit):
        main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(out), "--shift-threshold", "0.5"])
    assert "go with --prior match-shifted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(out), "--prior", "match-shifted",
              "--shift-threshold", "1.5"])
    assert "must be in (0, 1)" in capsys.readouterr().err
    clf.cfg.data.train = [str(tmp_path / "gone.csv")]  # the training files moved away
    with pytest.raises(ConfigError, match="give them with --reference FILE"):
        clf.training_texts()
    assert not out.exists()


def test_the_runs_predict_prior_is_the_cli_default(tiny_model_dir, ag_files, tmp_path, capsys):
    """predict.prior in the run's config is what `predict` applies without --prior; `--prior none`
    is the training prior; a bad predict.prior is refused when the config is loaded."""
    from agnews_lora.config import load_config

    run = tmp_path / "run"
    main(["train", *tiny_run_overrides(tiny_model_dir, ag_files, tmp_path / "cache", run), "predict.prior=match"])
    clf = Classifier.load(run, precision="fp32")
    logits = clf.predict_logits(read_file(ag_files["test"]).texts)
    got = {}
    for name, extra in (("default", []), ("none", ["--prior", "none"])):
        out = tmp_path / f"{name}.csv"
        main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(out), *extra])
        with open(out) as fh:
            got[name] = [int(r[1]) for r in list(csv.reader(fh))[1:]]
    assert got["default"] == clf.probabilities(logits, prior="match").argmax(1).tolist()
    assert got["none"] == logits.argmax(1).tolist()
    assert "prior: match (the run's predict.prior" in capsys.readouterr().out
    for bad in ("sometimes", "0.5,0.5"):
        with pytest.raises(ConfigError, match="predict.prior"):
            load_config(overrides=[f"predict.prior={bad}"])
    with pytest.raises(ConfigError, match="predict.shift_threshold"):
        load_config(overrides=["predict.shift_threshold=1"])
