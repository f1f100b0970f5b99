"""Metrics from predictions: accuracy, precision/recall/F1 (macro, weighted, per class), confusion."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def compute_metrics(labels: Sequence[int], preds: Sequence[int], label_names: Sequence[str]) -> dict:
    """All classification metrics the tool reports, from one place.

    Args:
        labels: gold labels.
        preds: predicted labels.
        label_names: class names, index = label.

    Returns:
        accuracy; precision/recall/f1 with _macro and _weighted suffixes; per_class (name ->
        precision, recall, f1, support); confusion (rows gold, columns predicted).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y, p = np.asarray(labels), np.asarray(preds)
    ids = list(range(len(label_names)))
    out: dict = {"accuracy": float((y == p).mean()) if len(y) else 0.0, "n": int(len(y))}
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = precision_recall_fscore_support(y, p, labels=ids, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(pr), f"recall_{avg}": float(rc), f"f1_{avg}": float(f1)})
    pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=ids, average=None, zero_division=0)
    out["per_class"] = {name: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]),
                               "support": int(sup[i])} for i, name in enumerate(label_names)}
    out["confusion"] = confusion_matrix(y, p, labels=ids).tolist()
    return out


def format_metrics(m: dict, label_names: Sequence[str]) -> str:
    """A plain-text report: headline figures, per-class table, confusion matrix."""
    lines = [f"accuracy {m['accuracy']:.4f} on {m['n']:,} rows",
             f"macro     P {m['precision_macro']:.4f}  R {m['recall_macro']:.4f}  F1 {m['f1_macro']:.4f}",
             f"weighted  P {m['precision_weighted']:.4f}  R {m['recall_weighted']:.4f}  F1 {m['f1_weighted']:.4f}",
             "", f"{'class':<10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, c in m["per_class"].items():
        lines.append(f"{name:<10} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} {c['support']:>8}")
    width = max(len(n) for n in label_names) + 1
    lines += ["", "confusion (rows gold, columns predicted)",
              " " * width + "".join(f"{n[:8]:>9}" for n in label_names)]
    for name, row in zip(label_names, m["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>9}" for v in row))
    return "\n".join(lines)


def accuracy_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on n independent rows: sqrt(p (1 - p) / n)."""
    return float((accuracy * (1 - accuracy) / n) ** 0.5) if n > 0 else 0.0


def paired_difference(labels: Sequence[int], preds_a: Sequence[int], preds_b: Sequence[int]) -> dict:
    """Accuracy of A minus accuracy of B on the same rows, with the standard error of that difference.

    Paired: the SE comes from the per-row differences of correctness (d = [a right] - [b right]),
    sd(d) / sqrt(n), so the rows both get right or both get wrong cost nothing. It is far smaller
    than the SE of either accuracy when the two models agree on most rows.

    Returns:
        {"difference", "se", "a_only" (rows only A gets right), "b_only", "n"}.

    Raises:
        ValueError: the three sequences differ in length, or are empty.
    """
    y, a, b = np.asarray(labels), np.asarray(preds_a), np.asarray(preds_b)
    if not (len(y) == len(a) == len(b)) or len(y) == 0:
        raise ValueError(f"paired difference: {len(y)} labels, {len(a)} and {len(b)} predictions")
    d = (a == y).astype(np.float64) - (b == y).astype(np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"difference": float(d.mean()), "se": se, "a_only": int((d > 0).sum()), "b_only": int((d < 0).sum()),
            "n": int(len(d))}
