"""The teacher of a distillation: resolve it (TeacherSpec) and run it over texts.

The teacher (`distill.teacher`) is either a run folder of this tool (config.yaml + best/, read
with its own backbone, tokenizer and data.max_length) or a Hugging Face sequence-classification
model: a local folder, `pkg:PACKAGE/path` or a Hub id (its own tokenizer, the student's
data.max_length). Its outputs are per row, so teacher and student may use different tokenizers
and backbones.

`distill.teacher_mode`:
- `finetuned`: the teacher's own logits (`run_teacher`).
- `frozen`: the teacher's pretrained backbone as it is (a run folder's adapter and head, or a Hub
  model's classification head, are not used): its final hidden states mean-pooled over the real
  (non-padding) tokens (`pooled_features`), to which `fit_linear_probe` fits a linear head.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from agnews_lora import runs
from agnews_lora.checkpoint import ADAPTER_FILE
from agnews_lora.config import Config, generic_names
from agnews_lora.errors import ConfigError
from agnews_lora.data import tokenizer_fingerprint
from agnews_lora.losses import cross_entropy
from agnews_lora.precision import autocast_dtype
from agnews_lora.hub import HubUnreachable, ensure_hub_reachable
from agnews_lora.model import load_tokenizer, resolve_model_path
from agnews_lora.predict import Classifier, batched_outputs


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


def resolve_teacher(source: str, mode: str, num_labels: int, max_length: int,
                    names: Sequence[str] = ()) -> TeacherSpec:
    """Find the teacher, check it suits the student, load its tokenizer (not its weights).

    Args:
        source: a run folder of this tool, a model folder, `pkg:PACKAGE/path` or a Hub id.
        mode: "finetuned" or "frozen".
        num_labels: the student's model.num_labels.
        max_length: the student's data.max_length (used for Hugging Face teachers).
        names: the student's class names (data.labels): a finetuned teacher that names the same
            classes in another order has its columns reordered; one that names others is refused.

    Returns:
        The TeacherSpec; raises ConfigError naming distill.teacher when it cannot serve.
    """
    if not source:
        raise ConfigError("distill.teacher is empty: pass --teacher RUN_DIR (a run folder of agnews-lora) "
                          "or a Hugging Face model folder or id")
    path = Path(source).expanduser()
    if path.is_dir() and (path / runs.CONFIG).is_file():
        return _run_teacher(path.resolve(), mode, num_labels, names)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"distill.teacher: {path} is neither a run folder of agnews-lora (no config.yaml) "
                          "nor a Hugging Face model folder (no config.json)")
    if not path.is_dir() and _looks_local(source):
        raise ConfigError(f"distill.teacher: {path} does not exist; pass a run folder written by "
                          "`agnews-lora train` or a Hugging Face model folder or id")
    try:
        if not path.is_dir() and not source.startswith("pkg:"):
            ensure_hub_reachable(source, kind="model", hint="pass --teacher a run folder of agnews-lora or a "
                                                            "local model folder")
        resolved = str(path.resolve()) if path.is_dir() else resolve_model_path(source)
    except (ConfigError, HubUnreachable) as err:
        where = "" if source.startswith("pkg:") else "no such local folder, and as a Hub id: "
        raise ConfigError(f"distill.teacher={source}: {where}{err}") from None
    return _model_teacher(source, resolved, mode, num_labels, max_length, names)


def _check_labels(source: str, teacher_labels: int, num_labels: int) -> None:
    if teacher_labels != num_labels:
        raise ConfigError(f"distill.teacher: {source} predicts {teacher_labels} labels but the student has "
                          f"model.num_labels={num_labels}; use a teacher for the same labels, or "
                          f"distill.teacher_mode=frozen to fit a fresh {num_labels}-label head on its backbone")


def _run_teacher(path: Path, mode: str, num_labels: int, names: Sequence[str]) -> TeacherSpec:
    tcfg = runs.read_config(path)
    try:
        adapter = runs.checkpoint_dir(path, runs.BEST) / ADAPTER_FILE  # read, never repaired
    except ConfigError as err:
        raise ConfigError(f"distill.teacher: {err}") from None
    try:
        backbone = resolve_model_path(tcfg.model.name)
    except (ConfigError, HubUnreachable) as err:
        raise ConfigError(f"distill.teacher: the backbone of the teacher run {path} is not available: {err}") from None
    identity = {"backbone": _model_identity(backbone)}
    order = None
    if mode == "finetuned":
        _check_labels(str(path), tcfg.model.num_labels, num_labels)
        order = _label_order(str(path), dict(enumerate(tcfg.data.labels)), names)
        identity.update(adapter_sha256=_sha256(adapter), config_sha256=_sha256(path / runs.CONFIG))
    elif tcfg.model.init == "random":
        raise ConfigError(f"distill.teacher: {path} was trained from a randomly initialized backbone "
                          "(model.init=random); frozen mode needs pretrained weights to probe")
    return TeacherSpec(source=str(path), kind="run", mode=mode, model_path=backbone,
                       max_length=tcfg.data.max_length, num_labels=num_labels, label_order=order,
                       identity=identity, tokenizer=load_tokenizer(tcfg.model.name))


def _label_order(source: str, id2label: dict, names: Sequence[str]) -> list[int] | None:
    """Teacher column per student label when the teacher names the student's classes in another
    order; None when the order is the same or either side's names are generic (LABEL_i, class i).
    Names that differ otherwise are warned about, and the columns taken in label-id order."""
    theirs = [str(id2label.get(i, "")).lower() for i in range(len(names))]
    wanted = [n.lower() for n in names]
    if not names or _generic(theirs) or _generic(wanted) or theirs == wanted:
        return None
    if sorted(theirs) != sorted(wanted):
        warnings.warn(f"distill.teacher: {source} names its classes {', '.join(theirs)}, the student's are "
                      f"{', '.join(names)}; its columns are taken in label-id order", stacklevel=3)
        return None
    return [theirs.index(n) for n in wanted]


def _generic(names: list[str]) -> bool:
    """Names that say nothing about the class: empty, LABEL_i (transformers') or class i (this tool's)."""
    generic = generic_names(len(names))
    return any(n in ("", f"label_{i}", generic[i]) for i, n in enumerate(names))


def _model_teacher(source: str, resolved: str, mode: str, num_labels: int, max_length: int,
                   names: Sequence[str]) -> TeacherSpec:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(resolved)
    order = None
    if mode == "finetuned":
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            raise ConfigError(f"distill.teacher: {source} is not a sequence-classification model "
                              f"(architectures: {config.architectures}); use distill.teacher_mode=frozen "
                              "to fit a fresh head on its backbone")
        _check_labels(source, config.num_labels, num_labels)
        order = _label_order(source, config.id2label, names)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    source = str(Path(source).expanduser().resolve()) if Path(source).expanduser().is_dir() else source
    return TeacherSpec(source=source, kind="model", mode=mode, model_path=resolved,
                       max_length=min(max_length, tokenizer.model_max_length), num_labels=num_labels,
                       label_order=order, identity=_model_identity(resolved), tokenizer=tokenizer)


# ---------------------------------------------------------------- running the teacher


def teacher_device(cpu: bool = False) -> str:
    """Where the teacher runs: under `accelerate launch` each process uses its own GPU."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() and not cpu else "cpu"


def run_teacher(spec: TeacherSpec, texts: Sequence[Sequence[str]], device: str, precision: str,
                batch_size: int = 64, progress: bool = False) -> list[np.ndarray]:
    """Load the teacher once and run it over each list of texts.

    Args:
        spec: the resolved teacher.
        texts: lists of raw texts (e.g. the training rows, then the validation rows).
        device: torch device.
        precision: a resolved precision ("bf16", "fp16" or "fp32").
        batch_size: texts per forward pass.
        progress: show progress bars.

    Returns:
        One array per list: finetuned, the teacher's logits [n, classes] in its own column order
        (see `to_logits`); frozen, the backbone's mean-pooled features [n, hidden].
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    if spec.mode == "frozen":
        backbone = AutoModel.from_pretrained(spec.model_path).to(device).eval()
        return [pooled_features(backbone, spec.tokenizer, t, max_length=spec.max_length, batch_size=batch_size,
                                precision=precision, progress=progress) for t in texts]
    if spec.kind == "run":
        clf = Classifier.load(spec.source, device=device, precision=precision)
    else:
        tcfg = Config()
        tcfg.data.max_length = spec.max_length
        model = AutoModelForSequenceClassification.from_pretrained(spec.model_path).to(device)
        clf = Classifier(model, spec.tokenizer, tcfg, precision=precision)
    return [clf.predict_logits(t, batch_size=batch_size, progress=progress) for t in texts]


@torch.inference_mode()
def pooled_features(backbone: nn.Module, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64,
                    precision: str = "fp32", progress: bool = False) -> np.ndarray:
    """The mean of a backbone's final hidden states over each text's real (non-padding) tokens.

    Args:
        backbone: a transformers encoder (output `.last_hidden_state`), in eval mode.
        tokenizer: its tokenizer.
        texts: raw texts.
        max_length: truncation length.
        batch_size: texts per forward pass (batched longest first, like Classifier.predict_logits).
        precision: a resolved precision; the encoder runs under its autocast, the pooling in fp32.
        progress: show a progress bar.

    Returns:
        float32 features [n, hidden] in input order.
    """
    device = next(backbone.parameters()).device
    dtype = autocast_dtype(precision)

    def pool(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids, mask = torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu().numpy()

    return batched_outputs(texts, tokenizer, max_length=max_length, forward=pool, width=backbone.config.hidden_size,
                           batch_size=batch_size, progress=progress)


def to_logits(spec: TeacherSpec, outputs: np.ndarray, probe: dict | None) -> np.ndarray:
    """Teacher outputs -> teacher logits in the student's label order (frozen: through the probe)."""
    if spec.mode == "frozen":
        return (outputs @ probe["weight"].T + probe["bias"]).astype(np.float32)
    return outputs[:, spec.label_order] if spec.label_order else outputs


def fit_linear_probe(features: np.ndarray, labels: list[int], num_labels: int, steps: int,
                     lr: float) -> dict:
    """Fit Linear(hidden, num_labels) on standardized features with full-batch Adam.

    The features are standardized with their mean and std; the Linear starts from zeros and is
    fitted to the gold labels with cross-entropy, no weight decay.

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
