"""Knowledge distillation: teacher logits for the training rows, computed once and cached on
disk, then `train()` with `losses.distillation_loss`.

The teacher (`distill.teacher`) is either a run folder of this tool (config.yaml + best/, read
with its own backbone, tokenizer and data.max_length) or a Hugging Face sequence-classification
model: a local folder, `pkg:PACKAGE/path` or a Hub id (its own tokenizer, the student's
data.max_length). Logits are per row, so teacher and student may use different tokenizers and
backbones. The teacher's parameters do not count against the student's budget.

`distill.teacher_mode`:
- `finetuned`: the teacher's own logits.
- `frozen`: a linear probe on the teacher's pretrained backbone. The backbone is loaded as it
  is (a run folder's adapter and head, or a Hub model's classification head, are not used).
  Its final hidden states, mean-pooled over the real (non-padding) tokens, are computed once
  for the training and validation rows; the features are standardized with the training rows'
  mean and std; a Linear(hidden, num_labels) starting from zeros is fitted to the training
  rows' gold labels with full-batch Adam for `distill.probe_steps` steps at `distill.probe_lr`
  (cross-entropy, no weight decay); the standardization is folded into its weight and bias
  (saved as `teacher_probe.npz` in the run folder). Its logits on the training rows, on which
  it was fitted, are the teacher logits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from agnews_lora import checkpoint as ckpt
from agnews_lora import runs
from agnews_lora.config import Config, ConfigError
from agnews_lora.data import LABEL_NAMES, Split, load_splits, texts_fingerprint, tokenizer_fingerprint
from agnews_lora.evaluate import compute_metrics
from agnews_lora.losses import cross_entropy

TEACHER_FILE = runs.TEACHER
PROBE_FILE = "teacher_probe.npz"
_CACHE_VERSION = 1  # bump when the way logits are computed changes


@dataclass
class TeacherSpec:
    """A teacher resolved without loading its weights: what it is and how it tokenizes."""

    source: str  # as given (folders made absolute)
    kind: str  # "run" (a run folder of this tool) or "model" (a Hugging Face model)
    mode: str  # "finetuned" or "frozen"
    model_path: str  # the backbone to load: a folder or a Hub id
    max_length: int  # the teacher's truncation length
    num_labels: int  # classes of the teacher's logits
    label_order: list[int] | None  # teacher column for each student label, when names differ in order
    identity: dict  # what the cache key and teacher.json record about its files
    tokenizer: Any

    def to_record(self) -> dict:
        return {"source": self.source, "kind": self.kind, "mode": self.mode, "model_path": self.model_path,
                "max_length": self.max_length, "label_order": self.label_order, "identity": self.identity,
                "tokenizer": tokenizer_fingerprint(self.tokenizer)}


@dataclass
class TeacherOutputs:
    """Teacher logits for the student's training and validation rows (row order of load_splits)."""

    train: np.ndarray
    val: np.ndarray
    probe: dict | None  # frozen mode: {"weight": [classes, hidden], "bias": [classes]}
    seconds: float  # spent computing them in this call; 0.0 when read from the cache
    computed_seconds: float  # spent when they were first computed
    cached: bool
    cache_file: Path
    val_overlap: int | None  # student validation rows the teacher run trained on (None: unknown)


# ---------------------------------------------------------------- resolving the teacher


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_identity(model_path: str) -> dict:
    """Config hash and weight files' size + mtime of a folder; id + cached revision of a Hub id."""
    path = Path(model_path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        return {"path": str(path.resolve()), "config_sha256": _sha256(path / "config.json"),
                "weights": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}
    try:
        from huggingface_hub import snapshot_download

        revision = Path(snapshot_download(model_path, local_files_only=True)).name
    except Exception:  # not in the local cache (several hub exception types)
        revision = ""
    return {"hub_id": model_path, "revision": revision}


def _looks_local(source: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a slash is a path that does not exist.
    parent = Path(source).parent
    return source.startswith((".", "/", "~")) or source.count("/") >= 2 or \
        (str(parent) != "." and parent.is_dir())


def resolve_teacher(source: str, mode: str, num_labels: int, max_length: int) -> TeacherSpec:
    """Find the teacher, check it suits the student, load its tokenizer (not its weights).

    Args:
        source: a run folder of this tool, a model folder, `pkg:PACKAGE/path` or a Hub id.
        mode: "finetuned" or "frozen".
        num_labels: the student's model.num_labels.
        max_length: the student's data.max_length (used for Hugging Face teachers).

    Returns:
        The TeacherSpec; raises ConfigError naming distill.teacher when it cannot serve.
    """
    if not source:
        raise ConfigError("distill.teacher is empty: pass --teacher RUN_DIR (a run folder of agnews-lora) "
                          "or a Hugging Face model folder or id")
    path = Path(source).expanduser()
    if path.is_dir() and (path / runs.CONFIG).is_file():
        return _run_teacher(path.resolve(), mode, num_labels)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"distill.teacher: {path} is neither a run folder of agnews-lora (no config.yaml) "
                          "nor a Hugging Face model folder (no config.json)")
    if not path.is_dir() and _looks_local(source):
        raise ConfigError(f"distill.teacher: {path} does not exist; pass a run folder written by "
                          "`agnews-lora train` or a Hugging Face model folder or id")
    from agnews_lora.hub import HubUnreachable, ensure_hub_reachable
    from agnews_lora.model import resolve_model_path

    try:
        if not path.is_dir() and not source.startswith("pkg:"):
            ensure_hub_reachable(source, kind="model", hint="pass --teacher a run folder of agnews-lora or a "
                                                            "local model folder")
        resolved = str(path.resolve()) if path.is_dir() else resolve_model_path(source)
    except (ConfigError, HubUnreachable) as err:
        where = "" if source.startswith("pkg:") else "no such local folder, and as a Hub id: "
        raise ConfigError(f"distill.teacher={source}: {where}{err}") from None
    return _model_teacher(source, resolved, mode, num_labels, max_length)


def _check_labels(source: str, teacher_labels: int, num_labels: int) -> None:
    if teacher_labels != num_labels:
        raise ConfigError(f"distill.teacher: {source} predicts {teacher_labels} labels but the student has "
                          f"model.num_labels={num_labels}; use a teacher for the same labels, or "
                          f"distill.teacher_mode=frozen to fit a fresh {num_labels}-label head on its backbone")


def _run_teacher(path: Path, mode: str, num_labels: int) -> TeacherSpec:
    from agnews_lora.model import load_tokenizer, resolve_model_path

    tcfg = runs.read_config(path)
    try:
        adapter = runs.checkpoint_dir(path, "best") / "adapter_model.safetensors"  # read, never repaired
    except ConfigError as err:
        raise ConfigError(f"distill.teacher: {err}") from None
    from agnews_lora.hub import HubUnreachable

    try:
        backbone = resolve_model_path(tcfg.model.name)
    except (ConfigError, HubUnreachable) as err:
        raise ConfigError(f"distill.teacher: the backbone of the teacher run {path} is not available: {err}") from None
    identity = {"backbone": _model_identity(backbone)}
    if mode == "finetuned":
        _check_labels(str(path), tcfg.model.num_labels, num_labels)
        identity.update(adapter_sha256=_sha256(adapter), config_sha256=_sha256(path / "config.yaml"))
    elif tcfg.model.init == "random":
        raise ConfigError(f"distill.teacher: {path} was trained from a randomly initialized backbone "
                          "(model.init=random); frozen mode needs pretrained weights to probe")
    return TeacherSpec(source=str(path), kind="run", mode=mode, model_path=backbone,
                       max_length=tcfg.data.max_length, num_labels=num_labels, label_order=None,
                       identity=identity, tokenizer=load_tokenizer(tcfg.model.name))


def _label_order(id2label: dict, num_labels: int) -> list[int] | None:
    """Teacher column per student label when the teacher names AG News' classes in another order."""
    names = [str(id2label.get(i, "")).lower() for i in range(num_labels)]
    wanted = [n.lower() for n in LABEL_NAMES]
    if num_labels != len(LABEL_NAMES) or sorted(names) != sorted(wanted) or names == wanted:
        return None  # generic names (LABEL_0 ...) or the same order: columns are taken as they are
    return [names.index(n) for n in wanted]


def _model_teacher(source: str, resolved: str, mode: str, num_labels: int, max_length: int) -> TeacherSpec:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(resolved)
    order = None
    if mode == "finetuned":
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            raise ConfigError(f"distill.teacher: {source} is not a sequence-classification model "
                              f"(architectures: {config.architectures}); use distill.teacher_mode=frozen "
                              "to fit a fresh head on its backbone")
        _check_labels(source, config.num_labels, num_labels)
        order = _label_order(config.id2label, num_labels)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    source = str(Path(source).expanduser().resolve()) if Path(source).expanduser().is_dir() else source
    return TeacherSpec(source=source, kind="model", mode=mode, model_path=resolved,
                       max_length=min(max_length, tokenizer.model_max_length), num_labels=num_labels,
                       label_order=order, identity=_model_identity(resolved), tokenizer=tokenizer)


# ---------------------------------------------------------------- running the teacher


class MeanPooledFeatures(nn.Module):
    """A backbone whose output `.logits` is its mean-pooled final hidden state.

    Lets Classifier.predict_logits compute frozen-mode features with the same length-sorted,
    batched, bf16 path as logits.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.config = copy.deepcopy(backbone.config)
        self.config.num_labels = backbone.config.hidden_size  # output width for predict_logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return SimpleNamespace(logits=(hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def _device(cpu: bool = False) -> str:
    # Under `accelerate launch` each process runs the teacher on its own GPU.
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() and not cpu else "cpu"


def _effective_precision(precision: str, device: str) -> str:
    """What Classifier computes in (part of the cache key): `precision.resolve_precision`."""
    from agnews_lora.precision import resolve_precision

    return resolve_precision(precision, device)


def load_teacher_encoder(spec: TeacherSpec, device: str, precision: str):
    """The teacher as a predict.Classifier: its logits (finetuned) or pooled features (frozen).

    Args:
        spec: the resolved teacher.
        device: torch device.
        precision: a resolved precision ("bf16", "fp16" or "fp32").

    Returns:
        A Classifier whose predict_logits gives logits [n, classes] or features [n, hidden].
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    from agnews_lora.predict import Classifier

    if spec.kind == "run" and spec.mode == "finetuned":
        return Classifier.load(spec.source, device=device, precision=precision)
    tcfg = Config()
    tcfg.data.max_length = spec.max_length
    if spec.mode == "finetuned":
        model = AutoModelForSequenceClassification.from_pretrained(spec.model_path).to(device)
    else:
        model = MeanPooledFeatures(AutoModel.from_pretrained(spec.model_path)).to(device)
    return Classifier(model, spec.tokenizer, tcfg, precision=precision)


def to_logits(spec: TeacherSpec, outputs: np.ndarray, probe: dict | None) -> np.ndarray:
    """Encoder outputs -> teacher logits in the student's label order (frozen: through the probe)."""
    if spec.mode == "frozen":
        return (outputs @ probe["weight"].T + probe["bias"]).astype(np.float32)
    return outputs[:, spec.label_order] if spec.label_order else outputs


def fit_linear_probe(features: np.ndarray, labels: list[int], num_labels: int, steps: int,
                     lr: float) -> dict:
    """Fit Linear(hidden, num_labels) on standardized features with full-batch Adam.

    Args:
        features: [n, hidden] pooled features of the training rows.
        labels: gold labels of those rows.
        num_labels: classes.
        steps: Adam steps (each on all rows).
        lr: Adam learning rate.

    Returns:
        {"weight": [classes, hidden], "bias": [classes]} acting on raw (unstandardized)
        features: the standardization is folded in.
    """
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z, y = (x - mean) / std, torch.tensor(labels, dtype=torch.long)
    head = nn.Linear(x.shape[1], num_labels)
    nn.init.zeros_(head.weight)  # a convex problem: zeros make the fit deterministic
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = cross_entropy(head(z), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weight = head.weight / std
        bias = head.bias - (head.weight * (mean / std)).sum(1)
    return {"weight": weight.numpy(), "bias": bias.numpy()}


# ---------------------------------------------------------------- the cache


def cache_key(spec: TeacherSpec, cfg: Config, train: Split, val: Split, precision: str) -> str:
    """Hash of everything the teacher logits depend on: teacher files, mode, tokenization, rows."""
    parts = {"version": _CACHE_VERSION, "teacher": spec.identity, "kind": spec.kind, "mode": spec.mode,
             "tokenizer": tokenizer_fingerprint(spec.tokenizer), "max_length": spec.max_length,
             "train_texts": texts_fingerprint(train.texts), "val_texts": texts_fingerprint(val.texts),
             "label_order": spec.label_order, "num_labels": spec.num_labels, "precision": precision}
    if spec.mode == "frozen":  # the probe also depends on the labels and its own settings
        parts.update(labels=hashlib.sha256(np.asarray(train.labels, np.int64).tobytes()).hexdigest(),
                     probe_steps=cfg.distill.probe_steps, probe_lr=cfg.distill.probe_lr, pooling="mean")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def teacher_logits(spec: TeacherSpec, cfg: Config, train: Split, val: Split) -> TeacherOutputs:
    """Teacher logits for the training and validation rows, from the cache or computed once.

    Args:
        spec: the resolved teacher.
        cfg: the student's config (data.cache_dir, train.eval_batch_size, train.precision,
            train.cpu, distill.probe_*).
        train: the student's training rows (load_splits order).
        val: the student's validation rows.

    Returns:
        TeacherOutputs; `cached` says whether the cache served them.
    """
    device = _device(cfg.train.cpu)
    precision = _effective_precision(cfg.train.precision, device)
    key = cache_key(spec, cfg, train, val, precision)
    path = Path(cfg.data.cache_dir).expanduser() / "teacher_logits" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            probe = {"weight": z["probe_weight"], "bias": z["probe_bias"]} if "probe_weight" in z else None
            overlap = int(z["val_overlap"])
            return TeacherOutputs(train=z["train"], val=z["val"], probe=probe, seconds=0.0,
                                  computed_seconds=float(z["seconds"]), cached=True, cache_file=path,
                                  val_overlap=None if overlap < 0 else overlap)
    start = time.perf_counter()
    out = _compute(spec, cfg, train, val, device=device, precision=precision)
    out.seconds = out.computed_seconds = time.perf_counter() - start
    out.cache_file = path
    _save_cache(path, out)
    return out


def _compute(spec: TeacherSpec, cfg: Config, train: Split, val: Split, device: str,
             precision: str) -> TeacherOutputs:
    encoder = load_teacher_encoder(spec, device=device, precision=precision)
    run = lambda texts: encoder.predict_logits(texts, batch_size=cfg.train.eval_batch_size,  # noqa: E731
                                               progress=cfg.train.progress)
    train_out = run(train.texts)
    val_out = run(val.texts) if len(val) else np.zeros((0, train_out.shape[1]), np.float32)
    probe = None
    if spec.mode == "frozen":
        if cfg.distill.probe_steps < 1 or cfg.distill.probe_lr <= 0:
            raise ConfigError(f"distill.probe_steps={cfg.distill.probe_steps} must be >= 1 and "
                              f"distill.probe_lr={cfg.distill.probe_lr} > 0 for teacher_mode=frozen")
        probe = fit_linear_probe(train_out, train.labels, num_labels=spec.num_labels,
                                 steps=cfg.distill.probe_steps, lr=cfg.distill.probe_lr)
    return TeacherOutputs(train=to_logits(spec, train_out, probe), val=to_logits(spec, val_out, probe),
                          probe=probe, seconds=0.0, computed_seconds=0.0, cached=False,
                          cache_file=Path(), val_overlap=_val_overlap(spec, val))


def _save_cache(path: Path, out: TeacherOutputs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"train": out.train, "val": out.val, "seconds": np.float64(out.computed_seconds),
              "val_overlap": np.int64(-1 if out.val_overlap is None else out.val_overlap)}
    if out.probe is not None:
        arrays.update(probe_weight=out.probe["weight"], probe_bias=out.probe["bias"])
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a half-written cache file is never read


def _val_overlap(spec: TeacherSpec, val: Split) -> int | None:
    """How many student validation rows a finetuned teacher run was trained on (None: unknown)."""
    if spec.kind != "run" or spec.mode != "finetuned" or not len(val):
        return None
    from agnews_lora.data import DataError
    from agnews_lora.hub import HubUnreachable
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
    """What teacher.json holds: identity, validation figures, KD settings, time for the logits."""
    val_m = _accuracy(out.val, val.labels) if len(val) else {"accuracy": None, "f1_macro": None}
    record = {**spec.to_record(), "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
              "val_rows": len(val), "val_accuracy": val_m["accuracy"], "val_f1_macro": val_m["f1_macro"],
              "val_rows_seen_by_teacher": out.val_overlap,
              "train_accuracy": _accuracy(out.train, train.labels)["accuracy"],
              "logits_seconds": round(out.seconds, 2), "logits_cached": out.cached,
              "logits_computed_seconds": round(out.computed_seconds, 2), "cache_file": str(out.cache_file)}
    if spec.mode == "frozen":
        record["probe"] = {"steps": cfg.distill.probe_steps, "lr": cfg.distill.probe_lr, "pooling": "mean",
                           "file": PROBE_FILE}
    return record


def distill(cfg: Config) -> Path:
    """Train a student from the teacher's soft labels as well as the gold labels.

    Args:
        cfg: the student's resolved config; cfg.distill names the teacher and the KD settings.

    Returns:
        The run folder: what `train` writes, plus teacher.json (and teacher_probe.npz in
        frozen mode); summary.json gains a "distill" entry.
    """
    from agnews_lora.model import budget_breakdown, check_budget
    from agnews_lora.train import run_dir_for

    check_budget(budget_breakdown(cfg), cfg.budget.max_trainable)  # the student's; the teacher does not count
    # train() refuses too, but only after the teacher logits were paid for; the lock covers
    # teacher.json, written after train() returns.
    with runs.writer_lock(run_dir_for(cfg)):
        runs.refuse_existing_run(run_dir_for(cfg), resume=cfg.train.resume)
        return _distill(cfg)


def _distill(cfg: Config) -> Path:
    from agnews_lora.train import train

    spec = resolve_teacher(cfg.distill.teacher, mode=cfg.distill.teacher_mode,
                           num_labels=cfg.model.num_labels, max_length=cfg.data.max_length)
    train_split, val_split, _ = load_splits(cfg.data, seed=cfg.train.seed, num_labels=cfg.model.num_labels)
    out = teacher_logits(spec, cfg, train=train_split, val=val_split)
    record = teacher_record(spec, cfg, out, train=train_split, val=val_split)
    _print_teacher(record)
    summary = {"distill": {"teacher": spec.source, "teacher_kind": spec.kind, "teacher_mode": spec.mode,
                           "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
                           "teacher_val_accuracy": record["val_accuracy"],
                           "teacher_logits_seconds": record["logits_seconds"],
                           "teacher_logits_cached": out.cached}}
    run_dir = train(cfg, teacher_logits=out.train, extra_summary=summary)
    if out.probe is not None:
        np.savez(run_dir / PROBE_FILE, weight=out.probe["weight"], bias=out.probe["bias"])
    ckpt.atomic_write_json(run_dir / TEACHER_FILE, record)
    return run_dir


def _print_teacher(record: dict) -> None:
    acc = record["val_accuracy"]
    how = "read from cache" if record["logits_cached"] else f"computed in {record['logits_seconds']:.1f} s"
    print(f"teacher {record['source']} ({record['mode']}): val accuracy "
          f"{'n/a' if acc is None else f'{acc:.4f}'}; logits {how}")
    if record["val_rows_seen_by_teacher"]:
        print(f"warning: the teacher was trained on {record['val_rows_seen_by_teacher']} of the "
              f"{record['val_rows']} validation rows; its validation accuracy is optimistic")


# ---------------------------------------------------------------- teacher vs student


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
    from agnews_lora.hub import HubUnreachable

    record = runs.read_json(Path(run_dir) / TEACHER_FILE)
    cfg = runs.read_config(run_dir)
    base = {"source": record["source"], "mode": record["mode"], "recorded_val_accuracy": record["val_accuracy"]}
    try:
        spec = resolve_teacher(record["source"], mode=record["mode"], num_labels=cfg.model.num_labels,
                               max_length=cfg.data.max_length)
    except (ConfigError, HubUnreachable) as err:
        return {**base, "available": False, "reason": str(err)}
    probe = None
    if spec.mode == "frozen":
        with np.load(Path(run_dir) / PROBE_FILE) as z:
            probe = {"weight": z["weight"], "bias": z["bias"]}
    device = _device()
    encoder = load_teacher_encoder(spec, device=device, precision=_effective_precision(precision, device))
    logits = to_logits(spec, encoder.predict_logits(split.texts, batch_size=batch_size, progress=True), probe)
    m = compute_metrics(split.labels, logits.argmax(-1).tolist(), runs.label_names(spec.num_labels))
    return {**m, **base, "available": True, "data": split.source,
            "changed_since_distill": spec.identity != record["identity"]}


def format_teacher_vs_student(teacher: dict, student: dict, run_dir: str | Path) -> str:
    """A side-by-side table of the teacher's and the student's figures."""
    record = runs.read_json(Path(run_dir) / TEACHER_FILE)
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
