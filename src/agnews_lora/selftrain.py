"""Self-training: choose confident pseudo-labels for unlabelled texts (pure functions)."""

from __future__ import annotations

import numpy as np


def select_pseudo_labels(probs: np.ndarray, threshold: float, balance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose top probability is above `threshold`, with that class as their label.

    Args:
        probs: [n, classes] (temperature-scaled) probabilities.
        threshold: keep rows with top probability strictly above it (1.0 keeps none).
        balance: keep at most as many rows per class as the rarest kept class has, the most
            confident first, so the further round does not learn the model's own class skew
            (on shifted text the model over-predicts some classes).

    Returns:
        (row indices, sorted; labels), as int64 arrays.
    """
    probs = np.asarray(probs)
    conf, labels = probs.max(-1), probs.argmax(-1)
    keep = np.flatnonzero(conf > threshold)
    if balance and len(keep):
        counts = np.bincount(labels[keep], minlength=probs.shape[1])
        cap = counts[counts > 0].min()
        chosen = []
        for c in range(probs.shape[1]):
            rows = keep[labels[keep] == c]
            chosen.append(rows[np.argsort(-conf[rows], kind="stable")[:cap]])
        keep = np.sort(np.concatenate(chosen))
    return keep.astype(np.int64), labels[keep].astype(np.int64)
