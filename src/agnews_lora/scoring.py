"""Score a saved model on labelled rows: metrics, the teacher beside a distilled student, eval.json.

What `agnews-lora evaluate` does, for Python users too:

    result = evaluate_folder("runs/cpu-minilm")          # the run's own test data
    result.metrics["accuracy"], result.output            # -> 0.9237, runs/cpu-minilm/eval.json
    evaluate_folder(run, predictions=f"{run}/test_predictions.npz")  # also per row: label, logits
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agnews_lora import runs
from agnews_lora.data import Split
from agnews_lora.errors import ConfigError, OutputRefused
from agnews_lora.outputs import claim_file
from agnews_lora.data import load_test_split
from agnews_lora.evaluate import compute_metrics
from agnews_lora.hub import HubUnreachable
from agnews_lora.precision import resolve_precision
from agnews_lora.predict import Classifier
from agnews_lora.teacher import resolve_teacher, run_teacher, teacher_device, to_logits

EVAL_FILE = runs.EVAL


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
    split = load_test_split(clf.cfg.data, clf.label_names, files=data or ())
    if split is None:
        raise ConfigError(f"evaluate: the run has no test data (data.test, or a Hub dataset's "
                          f"{clf.cfg.data.test_split or 'test'} split); pass --data FILE")
    if split.labels is None:
        raise ConfigError(f"evaluate: {split.source} has no labels; predict unlabelled data instead")
    return split


def evaluate_folder(path: str | Path, data: Sequence[str] | None = None, output: str | Path | None = None,
                    batch_size: int = 64, precision: str = "auto", teacher: bool = True,
                    progress: bool = False, threads: int | None = None,
                    predictions: str | Path | None = None) -> Evaluation:
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
        predictions: also write every row's gold label and logits there (`runs.write_predictions`;
            RUN/test_predictions.npz is what train writes for its test rows).

    Returns:
        An Evaluation: the metrics (accuracy, P/R/F1, confusion, data source, "teacher"), the
        file written and the Classifier.
    """
    out = claim_evaluation_outputs(path, data=data, output=output, predictions=predictions)
    clf = Classifier.load(path, precision=precision, threads=threads)
    split = evaluation_split(clf, data)
    logits = clf.predict_logits(split.texts, batch_size=batch_size, progress=progress)
    metrics = compute_metrics(split.labels, logits.argmax(-1).tolist(), clf.label_names)
    metrics["data"] = split.source
    if teacher and (Path(path) / runs.TEACHER).is_file():
        metrics["teacher"] = evaluate_teacher(path, split, batch_size=batch_size, precision=precision)
    runs.write_eval(out, metrics)
    if predictions is not None:
        runs.write_predictions(predictions, split.labels, logits, split.source)
    return Evaluation(metrics=metrics, output=out, classifier=clf)


def claim_evaluation_outputs(path: str | Path, data: Sequence[str] | None, output: str | Path | None,
                             predictions: str | Path | None) -> Path:
    """Check, before any work, the files `evaluate_folder` will write (outputs.claim_file).

    The metrics may be PATH/eval.json; the predictions may be PATH/test_predictions.npz only
    for the run's own test rows (no `data`): that is the file train writes for them.

    Returns:
        The metrics file to write.

    Raises:
        OutputRefused: an output is an input, a file of the run or another model folder, a
            folder, or the same file as the other output.
    """
    inputs = list(data or [])
    out = claim_file(output if output else Path(path) / EVAL_FILE, kind="metrics", label="--output",
                     inputs=inputs, owner=path, owned=(EVAL_FILE,))
    if predictions is not None:
        pred = claim_file(predictions, kind="npz", label="--predictions", inputs=inputs, owner=path,
                          owned=() if data else (runs.TEST_PREDICTIONS,))
        if pred.resolve() == out.resolve():
            raise OutputRefused(f"--predictions {predictions}: is also the metrics file; name another file")
    return out


def evaluate_teacher(run_dir: str | Path, split: Split, batch_size: int = 64, precision: str = "auto") -> dict:
    """Score a distilled run's teacher on `split` (the rows `evaluate` scores the student on).

    Args:
        run_dir: a run folder written by `distill` (holds teacher.json).
        split: labelled rows.
        batch_size: rows per forward pass.
        precision: "auto", "bf16" or "fp32".

    Returns:
        compute_metrics' dict plus source/mode/recorded_val_accuracy/changed_since_distill; when
        the teacher can no longer be loaded, {"available": False, "reason": ...} and the
        recorded figures.
    """
    record = runs.read_teacher(run_dir)
    cfg = runs.read_config(run_dir)
    base = {"source": record["source"], "mode": record["mode"], "recorded_val_accuracy": record["val_accuracy"]}
    try:
        spec = resolve_teacher(record["source"], mode=record["mode"], num_labels=cfg.model.num_labels,
                               max_length=cfg.data.max_length, names=cfg.data.labels)
    except (ConfigError, HubUnreachable) as err:
        return {**base, "available": False, "reason": str(err)}
    probe = runs.read_teacher_probe(run_dir) if spec.mode == "frozen" else None
    device = teacher_device()
    [outputs] = run_teacher(spec, [split.texts], device=device, precision=resolve_precision(precision, device),
                            batch_size=batch_size, progress=True)
    logits = to_logits(spec, outputs, probe)
    m = compute_metrics(split.labels, logits.argmax(-1).tolist(), runs.label_names(spec.num_labels,
                                                                                   names=cfg.data.labels))
    return {**m, **base, "available": True, "data": split.source,
            "changed_since_distill": spec.identity != record["identity"]}


def format_teacher_vs_student(teacher: dict, student: dict, run_dir: str | Path) -> str:
    """A side-by-side table of the teacher's and the student's figures."""
    record = runs.read_teacher(run_dir)
    student_val = (runs.read_summary(run_dir) or {}).get("best_val_accuracy")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["", f"teacher {record['source']} ({record['mode']}); KD T={record['temperature']} "
             f"alpha={record['alpha']}", f"{'':<26}{'teacher':>9}{'student':>9}"]
    if teacher.get("available"):
        lines += [f"{'accuracy (these rows)':<26}{fmt(teacher['accuracy']):>9}{fmt(student['accuracy']):>9}",
                  f"{'macro F1 (these rows)':<26}{fmt(teacher['f1_macro']):>9}{fmt(student['f1_macro']):>9}"]
    lines.append(f"{'val accuracy (recorded)':<26}{fmt(record['val_accuracy']):>9}{fmt(student_val):>9}")
    if not teacher.get("available"):
        lines.append(f"teacher not evaluated on these rows: {teacher['reason']}")
    elif teacher["changed_since_distill"]:
        lines.append("note: the teacher's files changed since this run was distilled from it")
    return "\n".join(lines)
