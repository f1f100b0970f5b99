"""Which rows of an unlabelled batch are shifted away from the training texts, and prior matching
on those rows only (`predict --prior match-shifted`).

A domain classifier tells the batch's texts from a sample of the training texts: TF-IDF word
uni- and bigrams and a class-balanced logistic regression, cross-fitted (every text is scored by a
model that did not see it). A text the classifier puts on the batch's side with probability above
a threshold is "shifted"; texts like the training ones (for the course's hidden file: its AG News
half) score about as often on either side and stay below it. On the shifted rows only, the class
weights are re-fitted so that their mean posterior equals the training prior
(`calibration.match_prior`): a model that over-predicts one class on shifted text (Sci/Tech on the
generated news) is pulled back, while rows like the training texts keep their predictions.

Matching re-weights the classes, and that flattens the matched rows: on the hidden file's
generated rows the matched probabilities were under-confident (mean top probability 0.82 at 87%
accuracy). `calibration="keep-confidence"` then puts a temperature on the matched rows only
(`calibration.confidence_temperature`) that gives them back the mean top probability they had
before matching: matching decides which class, the model's own (validation-calibrated)
temperature how sure. It keeps every label, uses no label of any domain, and leaves the rows
that were not matched alone.

It uses texts, never labels, and needs a batch: at least MIN_ROWS shifted rows, or nothing changes
(a batch of fewer rows is left as it is without being scored).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from agnews_lora.calibration import (CALIBRATIONS, MIN_BATCH_ROWS, confidence_temperature, match_prior, sharpen,
                                     too_few_rows)
from agnews_lora.errors import ConfigError, DataError

MIN_ROWS = MIN_BATCH_ROWS  # fewer shifted rows than this: their class shares say too little to match a prior
FOLDS = 5  # cross-fitting folds of the domain classifier
_WORD = re.compile(r"(?u)\b\w\w+\b")  # TfidfVectorizer's default token pattern: what counts as a word
MAX_REFERENCE = 10_000  # training texts sampled for the domain classifier
DEFAULT_THRESHOLD = 0.6  # chosen on the 300 labelled generated rows of the hidden file (docs/results/shift.md)


def check_threshold(threshold: float, name: str = "shift threshold") -> float:
    """The threshold if it is in (0, 1); else a ConfigError naming `name` (the CLI flag or config key)."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"{name} {threshold!r}: must be in (0, 1)")
    return threshold


def _no_words(count: int) -> DataError:
    return DataError(f"reference texts ({count:,} rows): the shift classifier finds no usable word in them (words "
                     "of two or more letters or digits, in at least two texts of reference and batch together), so "
                     "it cannot tell shifted rows from the training texts; give texts of the training distribution "
                     "as the reference (e.g. the run's training file)")


def check_reference(reference: Sequence[str], folds: int = FOLDS) -> None:
    """Refuse, before any prediction, reference texts the domain classifier cannot learn from: fewer
    than `folds` texts, or not one word (two or more letters or digits) in any of them.

    Raises:
        DataError: naming the reference and what to give instead.
    """
    if len(reference) < folds:
        raise DataError(f"reference texts ({len(reference)} rows): the shift classifier needs at least {folds}; "
                        "give texts of the training distribution (e.g. the run's training file)")
    if not any(_WORD.search(text) for text in reference):
        raise _no_words(len(reference))


def shift_scores(reference: Sequence[str], texts: Sequence[str], folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """P(batch | text) for every text of `texts` against `reference` (training texts).

    Args:
        reference: texts of the training distribution (a seeded sample of MAX_REFERENCE is used).
        texts: the batch.
        folds: cross-fitting folds.
        seed: the sample's and the folds' seed.

    Returns:
        float64 [len(texts)] in [0, 1]; with the balanced classifier, texts indistinguishable from
        the reference score about 0.5 or less.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    if len(reference) < folds or len(texts) < folds:
        raise ConfigError(f"shift scores need at least {folds} reference and {folds} batch texts "
                          f"(got {len(reference)} and {len(texts)})")
    rng = np.random.default_rng(seed)
    ref = list(reference)
    if len(ref) > MAX_REFERENCE:
        ref = [ref[i] for i in np.sort(rng.choice(len(ref), size=MAX_REFERENCE, replace=False))]
    corpus = ref + list(texts)
    domain = np.r_[np.zeros(len(ref), dtype=np.int64), np.ones(len(texts), dtype=np.int64)]
    try:
        features = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(corpus)
    except ValueError:  # "empty vocabulary": no word occurs in two texts
        raise _no_words(len(ref)) from None
    if features[: len(ref)].nnz == 0:  # the batch has words, the reference none of them: nothing to learn
        raise _no_words(len(ref))
    scores = np.zeros(len(corpus))
    for fit, held in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, domain):
        model = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced")
        model.fit(features[fit], domain[fit])
        scores[held] = model.predict_proba(features[held])[:, 1]
    return scores[len(ref):]


def check_calibration(calibration: str, name: str = "shift calibration") -> str:
    """`calibration` if it is one of CALIBRATIONS; else a ConfigError naming `name`."""
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"{name} {calibration!r}: choose from {', '.join(CALIBRATIONS)}")
    return calibration


def match_shifted(probs: np.ndarray, scores: np.ndarray, prior: Sequence[float],
                  threshold: float = DEFAULT_THRESHOLD, min_rows: int = MIN_ROWS,
                  calibration: str = "none") -> tuple[np.ndarray, dict]:
    """Match the class prior on the rows whose shift score is above `threshold`; others unchanged.

    Args:
        probs: [n, classes] posteriors (temperature-scaled).
        scores: [n] shift scores (`shift_scores`).
        prior: the class shares the shifted rows are matched to (the training prior).
        threshold, min_rows: which rows are shifted, and the fewest that are matched.
        calibration: "none", or "keep-confidence": a temperature on the matched rows
            (`calibration.confidence_temperature`) that restores their mean top probability from
            before matching; labels unchanged.

    Returns:
        (probabilities [n, classes], what was done: shifted rows, threshold, class weights or the
        reason nothing changed, and (keep-confidence) the temperature with the matched rows' mean
        top probability before matching, as matched and after the temperature).
    """
    check_threshold(threshold)
    check_calibration(calibration)
    probs = np.asarray(probs, dtype=np.float64).copy()
    rows = np.flatnonzero(np.asarray(scores) > threshold)
    info = {"rows": len(probs), "shifted_rows": int(len(rows)), "threshold": threshold, "calibration": calibration}
    skipped = too_few_rows(len(rows), min_rows, what="shifted rows")
    if skipped:
        return probs, {**info, "weights": None, "skipped": skipped}
    before = probs[rows]
    matched, weights = match_prior(before, prior)
    info["weights"] = weights.round(6).tolist()
    if calibration == "keep-confidence":
        target = float(before.max(-1).mean())
        t = confidence_temperature(matched, target)
        info.update(temperature=round(t, 6), confidence={"before": round(target, 6),
                                                         "matched": round(float(matched.max(-1).mean()), 6)})
        matched = sharpen(matched, t)
        info["confidence"]["after"] = round(float(matched.max(-1).mean()), 6)
    probs[rows] = matched
    return probs, info


def match_shifted_texts(probs: np.ndarray, texts: Sequence[str],
                        reference: Sequence[str] | Callable[[], Sequence[str]], prior: Sequence[float],
                        threshold: float = DEFAULT_THRESHOLD, min_rows: int = MIN_ROWS,
                        calibration: str = "none") -> tuple[np.ndarray, dict]:
    """`prior="match-shifted"` on a batch: score its texts against the reference (`shift_scores`),
    then match the prior on the shifted rows (`match_shifted`).

    A batch of fewer than `min_rows` rows cannot hold that many shifted ones: it is left unchanged
    without being scored, so a small batch never fails on the classifier's needs.

    Args:
        probs: [n, classes] posteriors of the batch.
        texts: its n texts.
        reference: texts of the training distribution, or a function returning them (called only
            when the batch is large enough: reading the run's training texts costs time).
        prior, threshold, min_rows, calibration: as in `match_shifted`.

    Returns:
        As `match_shifted`; "skipped" says why nothing changed.
    """
    check_threshold(threshold)
    check_calibration(calibration)
    skipped = too_few_rows(len(probs), min_rows, what="rows in the batch")
    if skipped:
        return np.asarray(probs, dtype=np.float64).copy(), {
            "rows": len(probs), "shifted_rows": 0, "threshold": threshold, "calibration": calibration,
            "weights": None, "skipped": f"{skipped}; not scored"}
    reference = reference() if callable(reference) else reference
    check_reference(reference)
    return match_shifted(probs, shift_scores(reference, texts), prior, threshold=threshold, min_rows=min_rows,
                         calibration=calibration)
