"""Score a saved model on labelled rows: metrics, the teacher beside a distilled student, eval.json.

What `agnews-lora evaluate` does, for Python users too:

    result = evaluate_folder("runs/cpu-minilm")          # the run's own test data
    result.metrics["accuracy"], result.output            # -> 0.9237, runs/cpu-minilm/eval.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agnews_lora.config import ConfigError
from agnews_lora.data import Split

EVAL_FILE = "eval.json"


@dataclass
class Evaluation:
    """What `evaluate_folder` computed and where it wrote it."""

    metrics: dict  # compute_metrics' dict + "data" (+ "teacher" for a distilled run)
    output: Path  # the metrics JSON written
    classifier: object  # the predict.Classifier used (format, precision, last_throughput)


def evaluation_split(clf, data: Sequence[str] | None = None) -> Split:
    """The labelled rows to score: `data` files, else the run's test files, else its Hub test split.

    Raises:
        ConfigError: the rows have no labels.
    """
    from agnews_lora.data import load_hub_split, read_files

    if data:
        split = read_files(data, clf.num_labels)
    elif clf.cfg.data.test:
        split = read_files(clf.cfg.data.test, clf.num_labels)
    else:
        split = load_hub_split(clf.cfg.data.hub_dataset, "test")
    if split.labels is None:
        raise ConfigError(f"evaluate: {split.source} has no labels; predict unlabelled data instead")
    return split


def evaluate_folder(path: str | Path, data: Sequence[str] | None = None, output: str | Path | None = None,
                    batch_size: int = 64, precision: str = "auto", teacher: bool = True,
                    progress: bool = False, threads: int | None = None) -> Evaluation:
    """Score a run folder or an exported folder on labelled rows and write the metrics as JSON.

    Args:
        path: a run folder (train/distill) or a merged/ONNX folder (export).
        data: labelled file(s); default: the run's test data (its files, else the Hub test split).
        output: the JSON to write; default PATH/eval.json.
        batch_size: texts per forward pass.
        precision: "auto", "bf16", "fp16" or "fp32" (see `precision.resolve_precision`).
        teacher: for a distilled run (teacher.json present), also score its teacher on the same rows.
        progress: show progress bars.
        threads: ONNX folders: ONNX Runtime's threads (torch's are the caller's to set).

    Returns:
        An Evaluation: the metrics (accuracy, P/R/F1, confusion, data source, "teacher"), the
        file written and the Classifier.
    """
    from agnews_lora.checkpoint import atomic_write_json
    from agnews_lora.evaluate import compute_metrics
    from agnews_lora.predict import Classifier

    clf = Classifier.load(path, precision=precision, threads=threads)
    split = evaluation_split(clf, data)
    logits = clf.predict_logits(split.texts, batch_size=batch_size, progress=progress)
    metrics = compute_metrics(split.labels, logits.argmax(-1).tolist(), clf.label_names)
    metrics["data"] = split.source
    if teacher and (Path(path) / "teacher.json").is_file():
        from agnews_lora.distill import evaluate_teacher

        metrics["teacher"] = evaluate_teacher(path, split, batch_size=batch_size, precision=precision)
    out = Path(output) if output else Path(path) / EVAL_FILE
    atomic_write_json(out, metrics)
    return Evaluation(metrics=metrics, output=out, classifier=clf)
