"""Prediction-time levers: temperature-scaled probabilities (the run's fitted temperature),
`--probs`, and prior correction (given prior, uniform, EM on the input batch) in the Python
API, the CLI and the service."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from agnews_lora.calibration import adjust_to_prior, em_prior, softmax
from agnews_lora.cli import main
from agnews_lora.config import ConfigError
from agnews_lora.data import read_file
from agnews_lora.predict import Classifier, parse_prior
from agnews_lora.serve import create_app
from conftest import tiny_run_overrides


@pytest.fixture(scope="module")
def run(tiny_model_dir, ag_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict-shift") / "run"
    main(["train", *tiny_run_overrides(tiny_model_dir, ag_files, out.parent / "cache", out)])
    return out


@pytest.fixture(scope="module")
def clf(run) -> Classifier:
    return Classifier.load(run, precision="fp32")


@pytest.fixture(scope="module")
def texts(ag_files) -> list[str]:
    return read_file(ag_files["test"]).texts


def test_classifier_uses_the_runs_fitted_temperature(run, clf, texts):
    summary = json.loads((run / "summary.json").read_text())
    assert clf.temperature == pytest.approx(summary["calibration"]["temperature"])
    assert clf.class_prior.tolist() == pytest.approx(summary["class_prior"])
    logits = clf.predict_logits(texts[:10])
    np.testing.assert_allclose(clf.predict_proba(texts[:10]), softmax(logits, clf.temperature), atol=1e-6)
    np.testing.assert_allclose(clf.predict_proba(texts[:10], temperature=1.0), softmax(logits), atol=1e-6)


def test_prior_correction_in_the_python_api(clf, texts):
    logits = clf.predict_logits(texts)
    calibrated = softmax(logits, clf.temperature)
    target = np.array([0.7, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(clf.probabilities(logits, prior=target.tolist()),
                               adjust_to_prior(calibrated, clf.class_prior, target), atol=1e-6)
    np.testing.assert_allclose(clf.probabilities(logits, prior="em"),
                               em_prior(calibrated, clf.class_prior)[0], atol=1e-6)
    assert clf.predict(texts, prior="0.7,0.1,0.1,0.1") == \
        adjust_to_prior(calibrated, clf.class_prior, target).argmax(-1).tolist()


def test_em_recovers_a_shifted_prior_through_bayes_rule():
    # Calibrated posteriors under a uniform training prior for two well-separated Gaussian
    # classes; the batch holds 80% class 0. EM must find ~0.8 and move the labels accordingly.
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.2).astype(int)
    x = rng.normal(loc=np.where(y == 1, 1.0, -1.0), scale=1.0)
    logits = np.stack([-x, x], axis=1)  # log-likelihood ratio 2x: posterior under a uniform prior
    adjusted, prior = em_prior(softmax(logits), [0.5, 0.5])
    assert prior[0] == pytest.approx(0.8, abs=0.01)
    assert (adjusted.argmax(-1) == y).mean() > (softmax(logits).argmax(-1) == y).mean()


def test_bad_priors_are_clear_errors():
    for bad in ("0.5,0.5", "a,b,c,d", "-1,1,1,1", "0,0,0,0", "sometimes"):
        with pytest.raises(ConfigError, match=r"use 'uniform', 'em', 'match', 'match-shifted', or 4 non-negative shares"):
            parse_prior(bad, 4)
    assert parse_prior("uniform", 4).tolist() == [0.25] * 4 and parse_prior("em", 4) is None
    assert parse_prior("match", 4) is None and parse_prior("match-shifted", 4) is None


def _read_csv(path: Path) -> list[list[str]]:
    with open(path) as fh:
        return list(csv.reader(fh))


def test_cli_predict_writes_probabilities_and_corrects_the_prior(run, clf, ag_files, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(out), "--precision", "fp32",
          "--probs", "--prior", "em"])
    rows, probs = _read_csv(out), _read_csv(tmp_path / "sub.probs.csv")
    assert rows[0] == ["ID", "Label"] and len(rows) == 121
    assert probs[0] == ["ID", "p_World", "p_Sports", "p_Business", "p_Sci/Tech"] and len(probs) == 121
    p = np.array([[float(v) for v in r[1:]] for r in probs[1:]])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert [int(r[1]) for r in rows[1:]] == p.argmax(1).tolist()
    texts = read_file(ag_files["test"]).texts
    np.testing.assert_allclose(p, clf.predict_proba(texts, prior="em"), atol=2e-6)
    assert "wrote probabilities" in capsys.readouterr().out


def test_cli_bad_prior_fails_before_predicting(run, ag_files, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(out), "--prior", "0.5,0.5"])
    assert exit_.value.code == 2 and "error: prior '0.5,0.5'" in capsys.readouterr().err
    assert not out.exists()


def test_service_applies_a_given_prior_and_refuses_em(clf, texts):
    for prior in ("em", "match", "match-shifted"):
        with pytest.raises(ConfigError, match=rf"prior '{prior}' works on a whole unlabelled batch"):
            create_app(clf, prior=prior)
    with TestClient(create_app(clf, prior="0.7,0.1,0.1,0.1")) as client:
        body = client.post("/predict", json={"texts": texts[:4]}).json()
        np.testing.assert_allclose(body["probabilities"], clf.predict_proba(texts[:4], prior=[0.7, 0.1, 0.1, 0.1]),
                                   atol=1e-5)
        info = client.get("/info").json()
        assert info["prior"] == "0.7,0.1,0.1,0.1" and info["temperature"] == pytest.approx(clf.temperature)


def test_a_class_absent_from_training_stays_at_zero():
    # The tiny training file has two classes: a prior correction must not divide by their zero share.
    probs = np.array([[0.7, 0.3, 1e-9, 0.0], [0.2, 0.8, 0.0, 1e-9]])
    adjusted = adjust_to_prior(probs, [0.5, 0.5, 0.0, 0.0], [0.25] * 4)
    np.testing.assert_allclose(adjusted, [[0.7, 0.3, 0, 0], [0.2, 0.8, 0, 0]], atol=1e-8)
    em_probs, prior = em_prior(probs, [0.5, 0.5, 0.0, 0.0])
    assert np.isfinite(em_probs).all() and prior[2:].tolist() == [0.0, 0.0]
