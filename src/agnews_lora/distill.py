"""Knowledge distillation: the teacher-logit artifact, computed once and cached, then `train()`
with one more loss term (losses.DistillTerm).

The teacher (`distill.teacher`: a run folder of this tool or a Hugging Face model) is resolved
and run by teacher.py; its parameters do not count against the student's budget. Its logits for
the student's training and validation rows are an artifact with its own content key
(`cache_key`), stored and read through runs.py (runs.TeacherLogits) under
`data.cache_dir/teacher_logits/`; the student's teacher.json records the key and the file.

`distill.teacher_mode`:
- `finetuned`: the teacher's own logits.
- `frozen`: a linear probe on the teacher's pretrained backbone: its mean-pooled final hidden
  states are computed once for the training and validation rows; a Linear(hidden, num_labels)
  is fitted to the training rows' gold labels with full-batch Adam for `distill.probe_steps`
  steps at `distill.probe_lr` (teacher.fit_linear_probe; saved as `teacher_probe.npz` in the
  run folder). Its logits on the training rows, on which it was fitted, are the teacher logits.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agnews_lora import runs
from agnews_lora.config import Config, validate
from agnews_lora.errors import ConfigError
from agnews_lora.data import Split, load_splits, resolve_labels, row_ids, texts_fingerprint, tokenizer_fingerprint
from agnews_lora.evaluate import compute_metrics
from agnews_lora.losses import DistillTerm
from agnews_lora.outputs import claim_folder
from agnews_lora.precision import resolve_precision
from agnews_lora.teacher import (TeacherSpec, fit_linear_probe, resolve_teacher, run_teacher, teacher_device,
                                 to_logits)
from agnews_lora.data import DataError
from agnews_lora.hub import HubUnreachable
from agnews_lora import train as recipe  # train(): the student's run

TEACHER_FILE = runs.TEACHER
PROBE_FILE = runs.TEACHER_PROBE
_CACHE_VERSION = 2  # bump when the way logits are computed or stored changes


@dataclass
class TeacherOutputs:
    """The teacher-logit artifact as one distillation met it: read from the cache, or computed now."""

    artifact: runs.TeacherLogits
    seconds: float  # spent computing it in this call; 0.0 when read from the cache
    cached: bool

    @property
    def train(self) -> np.ndarray:
        return self.artifact.train

    @property
    def val(self) -> np.ndarray:
        return self.artifact.val

    @property
    def computed_seconds(self) -> float:
        return self.artifact.computed_seconds


# ---------------------------------------------------------------- the artifact


def cache_key(spec: TeacherSpec, cfg: Config, train: Split, val: Split, precision: str) -> str:
    """The artifact's content key: everything the teacher logits depend on (the teacher's files,
    mode and probe settings, tokenization, max_length, precision and the rows)."""
    parts = {"version": _CACHE_VERSION, "teacher": spec.identity, "kind": spec.kind, "mode": spec.mode,
             "tokenizer": tokenizer_fingerprint(spec.tokenizer), "max_length": spec.max_length,
             "train_texts": texts_fingerprint(train.texts), "val_texts": texts_fingerprint(val.texts),
             "label_order": spec.label_order, "num_labels": spec.num_labels, "precision": precision}
    if spec.mode == "frozen":  # the probe also depends on the labels and its own settings
        parts.update(labels=hashlib.sha256(np.asarray(train.labels, np.int64).tobytes()).hexdigest(),
                     probe_steps=cfg.distill.probe_steps, probe_lr=cfg.distill.probe_lr, pooling="mean")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def teacher_logits(spec: TeacherSpec, cfg: Config, train: Split, val: Split) -> TeacherOutputs:
    """Teacher logits for the training and validation rows: the cached artifact, or computed once.

    Args:
        spec: the resolved teacher.
        cfg: the student's config (data.cache_dir, train.eval_batch_size, train.precision,
            train.cpu, distill.probe_*); validated first, before the teacher runs.
        train: the student's training rows (load_splits order).
        val: the student's validation rows.

    Returns:
        TeacherOutputs; `cached` says whether the cache served them.

    Raises:
        ConfigError: a bad config value, or a cached artifact that is damaged or holds other rows.
    """
    validate(cfg)
    device = teacher_device(cfg.train.cpu)
    precision = resolve_precision(cfg.train.precision, device)
    key = cache_key(spec, cfg, train, val, precision)
    path = runs.teacher_logits_path(cfg.data.cache_dir, key)
    stored = runs.read_teacher_logits(path)
    if stored is not None:
        _check_rows(stored, train, val)
        return TeacherOutputs(stored, seconds=0.0, cached=True)
    start = time.perf_counter()
    artifact = _compute(spec, cfg, train, val, device=device, precision=precision, key=key, path=path)
    artifact.computed_seconds = time.perf_counter() - start
    runs.write_teacher_logits(artifact)
    return TeacherOutputs(artifact, seconds=artifact.computed_seconds, cached=False)


def _check_rows(artifact: runs.TeacherLogits, train: Split, val: Split) -> None:
    if not (np.array_equal(artifact.train_rows, row_ids(train.texts)) and
            np.array_equal(artifact.val_rows, row_ids(val.texts))):
        raise ConfigError(f"{artifact.path}: the teacher-logit cache holds other rows than its key says "
                          "(damaged); delete it and distill again to recompute it")


def _compute(spec: TeacherSpec, cfg: Config, train: Split, val: Split, device: str, precision: str,
             key: str, path: Path) -> runs.TeacherLogits:
    train_out, val_out = run_teacher(spec, [train.texts, val.texts], device=device, precision=precision,
                                     batch_size=cfg.train.eval_batch_size, progress=cfg.train.progress)
    probe = None
    if spec.mode == "frozen":
        probe = fit_linear_probe(train_out, train.labels, num_labels=spec.num_labels,
                                 steps=cfg.distill.probe_steps, lr=cfg.distill.probe_lr)
    return runs.TeacherLogits(key=key, path=path, train=to_logits(spec, train_out, probe),
                              val=to_logits(spec, val_out, probe), train_rows=row_ids(train.texts),
                              val_rows=row_ids(val.texts), probe=probe, computed_seconds=0.0,
                              val_overlap=_val_overlap(spec, val))


def _val_overlap(spec: TeacherSpec, val: Split) -> int | None:
    """How many student validation rows a finetuned teacher run was trained on (None: unknown)."""
    if spec.kind != "run" or spec.mode != "finetuned" or not len(val):
        return None
    tcfg = runs.read_config(spec.source)
    try:
        teacher_train, _, _ = load_splits(tcfg.data, seed=tcfg.train.seed, num_labels=tcfg.model.num_labels)
    except (DataError, HubUnreachable):  # the teacher's data is not readable from here
        return None
    seen = set(teacher_train.texts)
    return sum(t in seen for t in val.texts)


# ---------------------------------------------------------------- the distillation run


def _accuracy(logits: np.ndarray, labels: list[int]) -> dict:
    m = compute_metrics(labels, logits.argmax(-1).tolist(), runs.label_names(logits.shape[1]))
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}


def teacher_record(spec: TeacherSpec, cfg: Config, out: TeacherOutputs, train: Split, val: Split) -> dict:
    """What teacher.json holds: identity, validation figures, KD settings, the logits' key, file and cost."""
    val_m = _accuracy(out.val, val.labels) if len(val) else {"accuracy": None, "f1_macro": None}
    record = {**spec.to_record(), "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
              "val_rows": len(val), "val_accuracy": val_m["accuracy"], "val_f1_macro": val_m["f1_macro"],
              "val_rows_seen_by_teacher": out.artifact.val_overlap,
              "train_accuracy": _accuracy(out.train, train.labels)["accuracy"],
              "logits_seconds": round(out.seconds, 2), "logits_cached": out.cached,
              "logits_computed_seconds": round(out.computed_seconds, 2), "logits_key": out.artifact.key,
              "cache_file": str(out.artifact.path)}
    if spec.mode == "frozen":
        record["probe"] = {"steps": cfg.distill.probe_steps, "lr": cfg.distill.probe_lr, "pooling": "mean",
                           "file": PROBE_FILE}
    return record


def distill_term(cfg: Config, out: TeacherOutputs, record: dict) -> DistillTerm:
    """The loss term `train` takes: the artifact's training-row logits with cfg.distill's T and alpha."""
    return DistillTerm(logits=out.train, rows=out.artifact.train_rows, temperature=cfg.distill.temperature,
                       alpha=cfg.distill.alpha, key=out.artifact.key, teacher=record["source"],
                       teacher_kind=record["kind"], teacher_mode=record["mode"],
                       teacher_val_accuracy=record["val_accuracy"], logits_seconds=record["logits_seconds"],
                       logits_cached=out.cached)


def distill(cfg: Config) -> Path:
    """Train a student from the teacher's soft labels as well as the gold labels.

    Every check comes before the teacher runs over any row: the config's values (distill.probe_*
    included), train's own checks (the student's budget, data.max_length, trackers), the
    teacher itself, and the run folder (a fresh run into a used folder is refused).

    Args:
        cfg: the student's resolved config; cfg.distill names the teacher and the KD settings.

    Returns:
        The run folder: what `train` writes, plus teacher.json (and teacher_probe.npz in
        frozen mode); summary.json gains a "distill" entry.
    """
    validate(cfg)  # also a Config changed after loading (cli sets distill.teacher)
    cfg = resolve_labels(cfg)  # the classes, from the data when the config leaves them open
    recipe.preflight(cfg)  # the student's budget; the teacher does not count
    spec = resolve_teacher(cfg.distill.teacher, mode=cfg.distill.teacher_mode, num_labels=cfg.model.num_labels,
                           max_length=cfg.data.max_length, names=cfg.data.labels)
    run_dir = recipe.run_dir_for(cfg)
    if runs.writer_process():
        claim_folder(run_dir, kind="run", label="out_dir")
    # train() takes the lock again (re-entrant) and refuses a used folder too, but only after the
    # teacher logits were paid for; holding it here also covers teacher.json, written after train().
    with runs.writer_lock(run_dir):
        runs.refuse_existing_run(run_dir, resume=cfg.train.resume)
        train_split, val_split, _ = load_splits(cfg.data, seed=cfg.train.seed, num_labels=cfg.model.num_labels)
        out = teacher_logits(spec, cfg, train=train_split, val=val_split)
        record = teacher_record(spec, cfg, out, train=train_split, val=val_split)
        _print_teacher(record)
        run_dir = recipe.train(cfg, distill_term=distill_term(cfg, out, record))
        runs.write_teacher(run_dir, record, probe=out.artifact.probe)
    return run_dir


def _print_teacher(record: dict) -> None:
    acc = record["val_accuracy"]
    how = "read from cache" if record["logits_cached"] else f"computed in {record['logits_seconds']:.1f} s"
    print(f"teacher {record['source']} ({record['mode']}): val accuracy "
          f"{'n/a' if acc is None else f'{acc:.4f}'}; logits {how}")
    if record["val_rows_seen_by_teacher"]:
        print(f"warning: the teacher was trained on {record['val_rows_seen_by_teacher']} of the "
              f"{record['val_rows']} validation rows; its validation accuracy is optimistic")
