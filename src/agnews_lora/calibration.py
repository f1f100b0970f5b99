"""Probabilities from logits: temperature scaling, calibration error, and class-prior
correction on an unlabelled batch. Pure numpy functions, the one place these numbers come from.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from agnews_lora.errors import ConfigError, finite

# What happens to the confidence of rows whose prior was matched (shift.match_shifted): "none" (as
# matched) or "keep-confidence" (`confidence_temperature` gives them back their mean top probability).
CALIBRATIONS = ("none", "keep-confidence")

MIN_BATCH_ROWS = 100  # the batch priors' minimum: fewer rows say too little about a class prior


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the gold labels under softmax(logits / temperature)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-log_p[np.arange(len(z)), np.asarray(labels)].mean())


def reliability(probs: np.ndarray, labels: Sequence[int], bins: int = 15) -> dict:
    """Confidence (top probability) against accuracy in equal-width bins.

    Returns:
        edges (bins + 1), and per bin: count, mean confidence, accuracy (NaN where empty).
    """
    probs = np.asarray(probs, dtype=np.float64)
    conf, correct = probs.max(-1), (probs.argmax(-1) == np.asarray(labels))
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        acc = np.bincount(which, weights=correct, minlength=bins) / count
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": mean_conf.tolist(),
            "accuracy": acc.tolist()}


def expected_calibration_error(probs: np.ndarray, labels: Sequence[int], bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins
    (Guo et al. 2017, 15 bins)."""
    r = reliability(probs, labels, bins)
    count = np.asarray(r["count"], dtype=np.float64)
    gap = np.abs(np.nan_to_num(np.asarray(r["accuracy"]) - np.asarray(r["confidence"])))
    return float((count * gap).sum() / max(count.sum(), 1))


def fit_temperature(logits: np.ndarray, labels: Sequence[int], low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T minimising NLL of softmax(logits / T) on labelled rows (Guo et al. 2017).

    NLL is unimodal in log T for T > 0, so a golden-section search over [low, high] on log T
    finds it to 1e-4 relative, deterministically. Returns 1.0 for no rows.
    """
    if len(labels) == 0:
        return 1.0
    a, b = np.log(low), np.log(high)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, np.exp(c)), nll(logits, labels, np.exp(d))
    while b - a > 1e-4:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def adjust_to_prior(probs: np.ndarray, train_prior: Sequence[float], prior: Sequence[float]) -> np.ndarray:
    """Bayes' rule for a changed class prior: p'(y|x) is proportional to p(y|x) * prior(y) /
    train_prior(y) (Saerens et al. 2002, eq. 2.4)."""
    train_prior = np.asarray(train_prior, dtype=np.float64)
    # A class absent from training (prior 0) stays out: its posterior is ~0 and its ratio undefined.
    w = np.divide(np.asarray(prior, dtype=np.float64), train_prior, out=np.zeros_like(train_prior),
                  where=train_prior > 0)
    p = np.asarray(probs, dtype=np.float64) * w
    return p / p.sum(axis=-1, keepdims=True)


def em_prior(probs: np.ndarray, train_prior: Sequence[float], max_iter: int = 1000,
             tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Re-estimate the class prior of an unlabelled batch by EM (Saerens, Latinne & Decaestecker
    2002): alternate adjusting the posteriors to the current prior and setting the prior to the
    mean adjusted posterior, until the prior moves less than `tol`.

    Args:
        probs: [n, classes] posteriors of a model trained under `train_prior` (calibrated ones work
            best: apply the run's temperature first).
        train_prior: the training rows' class shares.

    Returns:
        (adjusted posteriors [n, classes], the estimated prior [classes]).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        raise ValueError("prior correction needs at least one row")
    prior = np.asarray(train_prior, dtype=np.float64)
    for _ in range(max_iter):
        adjusted = adjust_to_prior(probs, train_prior, prior)
        new = adjusted.mean(axis=0)
        if np.abs(new - prior).max() < tol:
            prior = new
            break
        prior = new
    return adjust_to_prior(probs, train_prior, prior), prior


def match_prior(probs: np.ndarray, prior: Sequence[float], max_iter: int = 1000,
                tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Re-weight the classes so that the batch's mean posterior equals `prior` (Sinkhorn-style
    alternating scaling): p'(y|x) is proportional to p(y|x) * w(y), with one weight per class
    chosen so that mean_x p'(y|x) = prior(y).

    Unlike `em_prior`, which trusts the model's posteriors to estimate the batch's prior (and so
    keeps a skew the model acquired under shift), this assumes the prior (e.g. the training one)
    and removes whatever skew the posteriors show on the batch. Use it on a batch whose class shares
    are known to be about `prior`, never on a handful of rows.

    Args:
        probs: [n, classes] posteriors (apply the run's temperature first).
        prior: the target class shares (normalized here); a class with share 0 gets weight 0.

    Returns:
        (adjusted posteriors [n, classes], the class weights [classes], scaled to sum to 1).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        raise ValueError("prior matching needs at least one row")
    target = np.asarray(prior, dtype=np.float64)
    target = target / target.sum()
    w = (target > 0).astype(np.float64)
    for _ in range(max_iter):
        q = probs * w
        q /= np.maximum(q.sum(axis=-1, keepdims=True), 1e-300)
        mean = q.mean(axis=0)
        if np.abs(mean - target).max() < tol:
            break
        w = np.divide(w * target, mean, out=np.zeros_like(w), where=mean > 0)
    q = probs * w
    return q / np.maximum(q.sum(axis=-1, keepdims=True), 1e-300), w / w.sum()


def sharpen(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probs) / temperature): a temperature on probabilities (e.g. prior-matched ones,
    whose log is the logits plus the log class weights). The top class of each row is kept; below 1
    it sharpens, above 1 it flattens. A class with probability 0 stays at 0."""
    log_p = np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-300))
    return softmax(log_p, temperature)


def confidence_temperature(probs: np.ndarray, target: float, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T for which the mean top probability of `sharpen(probs, T)` equals `target`.

    Uses no labels: the caller chooses the target (`shift.match_shifted`'s "keep-confidence": the
    rows' mean top probability before prior matching). The mean top probability falls as T grows
    (from 1 towards 1/classes), so bisection on log T over [low, high] finds it to 1e-6 relative;
    a target outside what [low, high] reaches gives the bound.

    Args:
        probs: [n, classes] probabilities, n >= 1.
        target: the wanted mean top probability, in (1/classes, 1).

    Returns:
        T (1.0 for no rows).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return 1.0
    target = finite(target, "confidence target")
    a, b = np.log(low), np.log(high)
    while b - a > 1e-6:
        mid = (a + b) / 2
        if sharpen(probs, np.exp(mid)).max(-1).mean() > target:  # too sure: a higher temperature
            a = mid
        else:
            b = mid
    return float(np.exp((a + b) / 2))


BATCH_PRIORS = ("em", "match", "match-shifted")  # need a whole unlabelled batch, not one request


def too_few_rows(rows: int, min_rows: int = MIN_BATCH_ROWS, what: str = "rows") -> str | None:
    """Why a batch prior leaves `rows` rows unchanged (fewer than `min_rows`: too few to estimate or
    match a class prior on), or None when there are enough; `what` names the rows counted."""
    if rows >= min_rows:
        return None
    return f"{rows:,} {what} (< {min_rows}): too few to estimate or match a class prior on"


def batch_prior(probs: np.ndarray, prior: str, train_prior: Sequence[float],
                min_rows: int = MIN_BATCH_ROWS) -> tuple[np.ndarray, dict]:
    """Apply the batch prior "em" (`em_prior`) or "match" (`match_prior`, to `train_prior`) to a
    batch's posteriors, or leave them unchanged when the batch has fewer than `min_rows` rows.

    Args:
        probs: [n, classes] posteriors of the whole batch (temperature-scaled).
        prior: "em" or "match".
        train_prior: the training rows' class shares.
        min_rows: the fewest rows the prior is estimated or matched on.

    Returns:
        (probabilities [n, classes], what was done: prior, rows, and the estimated prior ("em"),
        the class weights ("match") or the reason nothing changed ("skipped")).
    """
    if prior not in ("em", "match"):
        raise ConfigError(f"batch prior {prior!r}: use 'em' or 'match' ('match-shifted': shift.match_shifted_texts)")
    probs = np.asarray(probs, dtype=np.float64)
    info = {"prior": prior, "rows": len(probs)}
    skipped = too_few_rows(len(probs), min_rows)
    if skipped:
        return probs.copy(), {**info, "skipped": skipped}
    if prior == "em":
        out, estimated = em_prior(probs, train_prior)
        return out, {**info, "estimated_prior": estimated.round(6).tolist()}
    out, weights = match_prior(probs, train_prior)
    return out, {**info, "weights": weights.round(6).tolist()}


def parse_prior(prior: str | Sequence[float], num_labels: int) -> np.ndarray:
    """"uniform", "em", "match", "match-shifted", or one non-negative finite share per class (a
    sequence or "0.2,0.3,..."): checked, as shares summing to 1 (None for the batch priors); raises
    ConfigError naming the value."""
    if isinstance(prior, str) and prior in ("uniform", *BATCH_PRIORS):
        return None if prior in BATCH_PRIORS else np.full(num_labels, 1.0 / num_labels)
    usage = (f"use 'uniform', 'em', 'match', 'match-shifted', or {num_labels} non-negative shares separated by "
             "commas (e.g. 0.25,0.25,0.25,0.25)")
    try:
        shares = list(prior.split(",") if isinstance(prior, str) else prior)
    except TypeError:
        shares = []
    if len(shares) != num_labels:
        raise ConfigError(f"prior {prior!r}: {usage}")
    try:  # the one finiteness check (NaN, inf, 1e309): a NaN prior would label every row class 0
        values = np.asarray([finite(v, f"prior {prior!r}: share {i + 1}") for i, v in enumerate(shares)])
    except ConfigError as err:
        raise ConfigError(f"{err}; {usage}") from None
    if (values < 0).any() or not (values > 0).any():
        raise ConfigError(f"prior {prior!r}: {usage}")
    values = values / values.max()  # finite shares whose sum would overflow (1e308 each) stay finite
    return values / values.sum()
