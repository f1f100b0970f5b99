"""Calibration numerics on constructed examples whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from agnews_lora.calibration import (adjust_to_prior, em_prior, expected_calibration_error, fit_temperature, nll,
                                     reliability, softmax)


def overconfident(n: int = 2000, correct: float = 0.7, margin: float = 8.0, seed: int = 0):
    """Logits that put ~all mass on the predicted class while only `correct` of the rows are right."""
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 4, n)
    wrong = rng.random(n) >= correct
    labels = np.where(wrong, (pred + rng.integers(1, 4, n)) % 4, pred)
    logits = rng.normal(0, 0.3, (n, 4))
    logits[np.arange(n), pred] += margin
    return logits, labels


def sampled(n: int, scale: float, seed: int = 0):
    """Labels drawn from softmax(z): z is calibrated, z * scale is over-confident by `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 4))
    p = softmax(z)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return z * scale, labels


def test_softmax_and_nll_match_the_definitions():
    logits = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    np.testing.assert_allclose(p[0], np.exp(logits[0]) / np.exp(logits[0]).sum())
    np.testing.assert_allclose(softmax(logits, temperature=2.0), softmax(logits / 2.0))
    assert nll(logits, [3, 0]) == pytest.approx(-(np.log(p[0, 3]) + np.log(0.25)) / 2)
    assert softmax(np.array([[1000.0, 0.0]]))[0, 0] == 1.0  # no overflow


def test_reliability_bins_and_ece_on_a_known_case():
    # 10 rows at confidence 0.8, 8 of them right: calibrated; 10 rows at 0.95, all right: gap 0.05
    probs = np.array([[0.8, 0.2, 0.0, 0.0]] * 10 + [[0.95, 0.05, 0.0, 0.0]] * 10)
    labels = [0] * 8 + [1] * 2 + [0] * 10
    r = reliability(probs, labels, bins=10)
    assert sum(r["count"]) == 20 and r["count"][7] == 10 and r["count"][9] == 10
    assert r["accuracy"][7] == pytest.approx(0.8) and r["confidence"][9] == pytest.approx(0.95)
    assert np.isnan(r["accuracy"][0])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.5 * 0.05)


def test_temperature_scaling_lowers_nll_and_ece_of_an_overconfident_model():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels)
    assert t > 2.0
    assert nll(logits, labels, t) < 0.5 * nll(logits, labels)
    assert nll(logits, labels, t) <= min(nll(logits, labels, t * 0.9), nll(logits, labels, t * 1.1))
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, t), labels)
    assert before > 0.25 and after < 0.05
    # argmax, and so accuracy, is unchanged by a temperature
    assert (softmax(logits, t).argmax(-1) == logits.argmax(-1)).all()


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_a_known_scale(scale):
    logits, labels = sampled(20000, scale)
    assert fit_temperature(logits, labels) == pytest.approx(scale, rel=0.06)


def test_fit_temperature_without_rows_is_one():
    assert fit_temperature(np.zeros((0, 4)), []) == 1.0


def test_adjust_to_prior_is_bayes_rule():
    probs = np.array([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    uniform = [0.25] * 4
    np.testing.assert_allclose(adjust_to_prior(probs, uniform, uniform), probs)
    np.testing.assert_allclose(adjust_to_prior(probs, uniform, [0.4, 0.2, 0.2, 0.2])[0], [0.4, 0.2, 0.2, 0.2])


def gaussian_posteriors(prior, n: int, seed: int = 0) -> np.ndarray:
    """Rows drawn from class-conditional Gaussians under `prior`; exact posteriors under a uniform
    training prior (the logits are the class log-likelihoods)."""
    rng = np.random.default_rng(seed)
    means = 1.5 * np.eye(4)
    y = rng.choice(4, size=n, p=prior)
    x = means[y] + rng.normal(size=(n, 4))
    return softmax(-0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1))


def test_em_recovers_a_known_shifted_prior():
    shifted = np.array([0.55, 0.25, 0.15, 0.05])
    probs = gaussian_posteriors(shifted, 20000)
    adjusted, prior = em_prior(probs, [0.25] * 4)
    naive = probs.mean(0)
    assert np.abs(prior - shifted).max() < 0.02
    assert np.abs(naive - shifted).max() > 0.1  # the uncorrected shares are far off
    np.testing.assert_allclose(adjusted.sum(-1), 1.0)
    np.testing.assert_allclose(adjusted.mean(0), prior, atol=1e-6)  # a fixed point


def test_em_keeps_an_unshifted_prior_and_refuses_no_rows():
    probs = gaussian_posteriors([0.25] * 4, 20000, seed=1)
    _, prior = em_prior(probs, [0.25] * 4)
    assert np.abs(prior - 0.25).max() < 0.02
    with pytest.raises(ValueError, match="at least one row"):
        em_prior(np.zeros((0, 4)), [0.25] * 4)
