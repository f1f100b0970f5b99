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

It uses texts, never labels, and needs a batch: at least MIN_ROWS shifted rows, or nothing changes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from agnews_lora.config import ConfigError

MIN_ROWS = 100  # fewer shifted rows than this: their class shares say too little to match a prior
MAX_REFERENCE = 10_000  # training texts sampled for the domain classifier
DEFAULT_THRESHOLD = 0.6  # chosen on the 300 labelled generated rows of the hidden file (README)


def check_threshold(threshold: float, name: str = "shift threshold") -> float:
    """The threshold if it is in (0, 1); else a ConfigError naming `name` (the CLI flag or config key)."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"{name} {threshold!r}: must be in (0, 1)")
    return threshold


def shift_scores(reference: Sequence[str], texts: Sequence[str], folds: int = 5, seed: int = 0) -> np.ndarray:
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
    features = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(corpus)
    scores = np.zeros(len(corpus))
    for fit, held in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, domain):
        model = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced")
        model.fit(features[fit], domain[fit])
        scores[held] = model.predict_proba(features[held])[:, 1]
    return scores[len(ref):]


def match_shifted(probs: np.ndarray, scores: np.ndarray, prior: Sequence[float],
                  threshold: float = DEFAULT_THRESHOLD, min_rows: int = MIN_ROWS) -> tuple[np.ndarray, dict]:
    """Match the class prior on the rows whose shift score is above `threshold`; others unchanged.

    Returns:
        (probabilities [n, classes], what was done: shifted rows, threshold, class weights or the
        reason nothing changed).
    """
    from agnews_lora.calibration import match_prior

    check_threshold(threshold)
    probs = np.asarray(probs, dtype=np.float64).copy()
    rows = np.flatnonzero(np.asarray(scores) > threshold)
    info = {"rows": len(probs), "shifted_rows": int(len(rows)), "threshold": threshold}
    if len(rows) < min_rows:
        return probs, {**info, "weights": None,
                       "skipped": f"{len(rows)} shifted rows (< {min_rows}): too few to match a prior"}
    probs[rows], weights = match_prior(probs[rows], prior)
    return probs, {**info, "weights": weights.round(6).tolist()}
