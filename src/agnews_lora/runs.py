"""The run folder's on-disk contract: the one module that knows its files and their rules.

A run folder (written by `train`/`distill`) holds `config.yaml` (the resolved config),
`metrics.jsonl` (one record per evaluation), `train_log.jsonl` (one record per logging window),
`best/` and `last/` (checkpoints, swapped in whole by `checkpoint.replace_dir`), `summary.json`,
`test_metrics.json` with `test_predictions.npz` (per test row, in file order: the gold label and
`best/`'s logits, for paired comparisons of runs on the same rows), `speed_patches.json` (what each
speed patch did) and, when distilled,
`teacher.json` (the teacher, its figures, and the key and file of its logits) with
`teacher_probe.npz` (frozen mode). `evaluate` writes `eval.json`. An exported folder holds
`config.yaml` and `agnews_lora.json` (export metadata) beside the model.

Teacher logits are an artifact of their own (`TeacherLogits`): one file per content key under
`data.cache_dir/teacher_logits/`, shared by every student distilled from the same teacher on the
same rows; a student's teacher.json points to the one it was trained with.

Rules:
- One writer at a time: the writer holds an exclusive `flock` on `RUN/.lock` for its lifetime
  (`writer_lock`). The kernel drops it when the process dies, so a crashed writer's lock is
  taken over by the next one; a live writer makes a second one fail with its pid, host and start.
- Only the writer, holding the lock, repairs the folder: it finishes a swap a crash cut short
  and removes temporary folders left by an interrupted save (`recover`).
- Readers (predict, evaluate, report, export, distill's teacher) never take the lock and never
  move files: mid-swap they read whichever checkpoint folder exists (`checkpoint_dir`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import yaml

from agnews_lora.checkpoint import STATE_FILE, atomic_write_json, atomic_write_text, read_jsonl, recover_swap
from agnews_lora.config import (AG_NEWS_LABELS, Config, class_count, class_names, config_from_dict, generic_names,
                                parse_yaml, to_dict)
from agnews_lora.errors import ConfigError, OutputRefused, RunDamaged, RunLocked

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train_log.jsonl"
SUMMARY = "summary.json"
TEST_METRICS = "test_metrics.json"
TEST_PREDICTIONS = "test_predictions.npz"
TEACHER = "teacher.json"
TEACHER_PROBE = "teacher_probe.npz"  # frozen-mode distillation: the linear probe on the teacher's backbone
SPEED_PATCHES = "speed_patches.json"
EVAL = "eval.json"  # written by `evaluate` (scoring.evaluate_folder)
TEACHER_LOGITS = "teacher_logits"  # the folder of teacher-logit artifacts under data.cache_dir
EXPORT_META = "agnews_lora.json"  # written by export beside every exported model
ONNX_FILE = "model.onnx"
PARITY = "parity.json"  # beside an exported model: how closely it reproduces the PyTorch model
LOCK = ".lock"
MARKER = ".agnews-lora"  # written by the tool into every run, export and sweep folder it creates
MARKED_KINDS = ("run", "export", "sweep")
REPORT = "report.md"
ROBUSTNESS = "robustness.md"  # robustness.py: with ROBUSTNESS_JSON and PNGs beside it
ROBUSTNESS_JSON = "robustness.json"  # every number of robustness.md (the model card reads it)
PSEUDO_LABELS = "pseudo_labels.json"  # self-training's pseudo-labelled rows
STATE = STATE_FILE  # in last/: the step, epoch and sampler state to resume from (checkpoint.py writes it)
EXPORTS = "export"  # RUN/export/FORMAT: export's default folders
SWEEP_SUMMARY = "sweep.md"  # a sweep folder: the summary, best_trial.json, study.db (SQLite) and trial-NNN/ runs
BEST_TRIAL = "best_trial.json"
STUDY_DB = "study.db"
COMPARISON = "comparison.md"  # compare's default output, and a sweep's comparison of its finished trials
BEST, LAST = "best", "last"  # the best checkpoint (by validation) and the latest (to resume from)
CHECKPOINTS = (BEST, LAST)
CHECKPOINT_NAMES = CHECKPOINTS + tuple(f".{name}.old" for name in CHECKPOINTS)  # .NAME.old: mid-swap
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)  # a damaged or foreign .npz


# ---------------------------------------------------------------- what a folder is


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark `folder` as the tool's own folder of `kind` ("run", "export" or "sweep"): only such a
    folder is ever written into again or replaced (outputs.py)."""
    if kind not in MARKED_KINDS:
        raise ValueError(f"marker kind {kind!r}: one of {MARKED_KINDS}")
    path = Path(folder) / MARKER
    if read_marker(folder) != kind:
        atomic_write_json(path, {"tool": "agnews-lora", "kind": kind, "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def read_marker(folder: str | Path) -> str | None:
    """The kind the tool's marker in `folder` names; None when there is no (readable) marker."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) and data.get("tool") == "agnews-lora" else None
    return kind if kind in MARKED_KINDS else None


def is_run_folder(folder: str | Path) -> bool:
    """True for a run folder of this tool: marked, or written by a version before the marker
    (a config.yaml the tool can read beside metrics.jsonl)."""
    folder = Path(folder)
    marked = read_marker(folder)
    if marked is not None:
        return marked == "run"
    if not (folder / CONFIG).is_file() or not (folder / METRICS).is_file():
        return False
    try:
        read_config(folder)
    except RunDamaged:
        return False
    return True


# ---------------------------------------------------------------- config.yaml


def read_config(folder: str | Path) -> Config:
    """The resolved config saved in a run or exported folder.

    Args:
        folder: a folder holding config.yaml.

    Returns:
        The validated Config.

    Raises:
        RunDamaged: no config.yaml (not a run folder), or one that cannot be parsed (damaged run).
    """
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise RunDamaged(f"{folder}: not a run folder (no {CONFIG}); pass the folder `train` wrote")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as err:
        raise RunDamaged(f"{path}: the run is damaged: {CONFIG} is not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise RunDamaged(f"{path}: the run is damaged: {CONFIG} holds {type(data).__name__}, not the "
                          "run's settings; restore it or train again")
    try:
        return _settled(config_from_dict(data))
    except ConfigError as err:
        raise RunDamaged(f"{path}: the run is damaged or from another version: {err}") from None


def _settled(cfg: Config) -> Config:
    """A saved config with its class names: `train` writes them (data.labels); a run of a version
    before data.labels showed four classes as AG News' and others as `class i`, and still does."""
    count = class_count(cfg)
    if cfg.data.labels or not count:
        return cfg
    names = class_names(cfg) or (list(AG_NEWS_LABELS) if count == len(AG_NEWS_LABELS) else
                                 generic_names(count))
    cfg.data.labels, cfg.model.num_labels = names, count
    return cfg


def write_config(cfg: Config, folder: str | Path) -> None:
    """Write the resolved config as `folder/config.yaml` (atomically)."""
    atomic_write_text(Path(folder) / CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------- logs and JSON files


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL log (metrics.jsonl, train_log.jsonl); a torn last line (power loss
    mid-write) is dropped with a warning; an unparsable earlier line is a RunDamaged error."""
    return read_jsonl(path)


def append_record(path: str | Path, record: dict) -> None:
    """Append one record to a JSONL log."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def drop_records_after(run_dir: str | Path, step: int) -> None:
    """Forget the log lines an interrupted run wrote after its last checkpoint (they are redone),
    and a torn last line."""
    for name in (METRICS, TRAIN_LOG):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        records = read_records(path)
        kept = [r for r in records if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text != path.read_text(errors="replace"):
            atomic_write_text(path, text)


def read_json(path: str | Path) -> dict | None:
    """A JSON file of the run (summary, test metrics, teacher record); None when absent.

    Raises:
        RunDamaged: the file exists but is not valid JSON (the run is damaged).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDamaged(f"{path}: the run is damaged: not valid JSON ({err})") from None


def write_summary(run_dir: str | Path, summary: dict) -> None:
    atomic_write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: str | Path) -> dict | None:
    return read_json(Path(run_dir) / SUMMARY)


def write_test_metrics(run_dir: str | Path, metrics: dict) -> None:
    atomic_write_json(Path(run_dir) / TEST_METRICS, metrics)


def write_predictions(path: str | Path, labels, logits, source: str) -> None:
    """Per scored row, in the order of the labelled file(s) `source`: the gold label and the logits
    (an .npz written atomically). train writes RUN/test_predictions.npz (best/ on the test rows);
    `evaluate --predictions FILE` writes the same for any labelled rows."""
    labels, logits = np.asarray(labels, dtype=np.int64), np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or len(labels) != len(logits):
        raise ValueError(f"predictions: {len(labels)} labels for logits of shape {logits.shape}")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, labels=labels, logits=logits, source=np.str_(source))
    os.replace(tmp, path)


def read_predictions(path: str | Path) -> dict | None:
    """A predictions .npz as {"labels", "logits", "preds", "source"}; None when absent (a run
    trained before RUN/test_predictions.npz existed: `agnews-lora evaluate RUN --predictions FILE`
    scores its test rows again).

    Raises:
        RunDamaged: the file is damaged.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            labels, logits, source = z["labels"], z["logits"], str(z["source"])
    except NPZ_ERRORS as err:
        raise RunDamaged(f"{path}: damaged predictions file ({type(err).__name__}: {str(err)[:120]}); delete it "
                          "and write it again with `agnews-lora evaluate RUN --predictions FILE`") from None
    if logits.ndim != 2 or len(labels) != len(logits):
        raise RunDamaged(f"{path}: damaged predictions file ({len(labels)} labels for logits of shape "
                          f"{logits.shape}); delete it and write it again with `agnews-lora evaluate`")
    return {"labels": labels, "logits": logits, "preds": logits.argmax(-1), "source": source}


def write_speed_patches(run_dir: str | Path, patches: list[dict]) -> None:
    """What each speed patch did (applied or not, and why) as RUN/speed_patches.json."""
    atomic_write_json(Path(run_dir) / SPEED_PATCHES, {"patches": patches})


def write_eval(path: str | Path, metrics: dict) -> None:
    """`evaluate`'s metrics (default place: RUN/eval.json)."""
    atomic_write_json(Path(path), metrics)


def label_names(num_labels: int, id2label: dict | None = None, names: Sequence[str] = ()) -> list[str]:
    """Class names by label id: `names` (a run's data.labels), else the model's own names, else `class i`.

    Args:
        num_labels: number of classes.
        id2label: optional names from a transformers config (generic LABEL_i are ignored).
        names: the run's class names (used when there are num_labels of them).

    Returns:
        num_labels names.
    """
    if len(names) == num_labels:
        return list(names)
    names = [str((id2label or {}).get(i, "")) for i in range(num_labels)]
    if all(names) and names != [f"LABEL_{i}" for i in range(num_labels)]:
        return names
    return generic_names(num_labels)


# ---------------------------------------------------------------- checkpoints (readers)


def checkpoint_dir(run_dir: str | Path, name: str = "best") -> Path:
    """The checkpoint folder to read, without moving anything.

    Mid-swap (the writer moved `name` aside to `.name.old` and has not yet renamed the new one
    in), the previous checkpoint is read where it lies.

    Raises:
        RunDamaged: no such checkpoint (training never reached an evaluation).
    """
    dest = Path(run_dir) / name
    for candidate in (dest, dest.with_name(f".{name}.old")):
        if (candidate / "adapter_model.safetensors").is_file():
            return candidate
    if dest.is_dir() or any(Path(run_dir).glob(f".{name}.tmp*")):
        raise RunDamaged(f"{dest}: the run is being written or is damaged (no adapter_model.safetensors); "
                          "retry when training has saved it")
    raise RunDamaged(f"{dest}: no adapter_model.safetensors; did training finish an evaluation?")


def folder_kind(path: str | Path) -> str:
    """'run', 'merged' or 'onnx': what `Classifier.load` will find in the folder.

    Raises:
        RunDamaged: the folder is none of them.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunDamaged(f"{path}: no such folder; pass a run folder (train) or an exported folder (export)")
    if (path / EXPORT_META).is_file():
        kind = read_export_meta(path).get("format")
        if kind not in ("merged", "onnx"):
            raise RunDamaged(f"{path / EXPORT_META}: the export is damaged (format {kind!r}); export again")
        return kind
    if (path / CONFIG).is_file():
        return "run"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "merged"  # any transformers sequence-classification folder
    raise RunDamaged(f"{path}: not a run folder ({CONFIG}), an exported folder ({EXPORT_META}) or a "
                      "transformers model folder (config.json + *.safetensors)")


def read_export_meta(folder: str | Path) -> dict:
    """Export metadata beside an exported model ({} for a plain transformers folder)."""
    meta = read_json(Path(folder) / EXPORT_META)
    if meta is not None and not isinstance(meta, dict):
        raise RunDamaged(f"{Path(folder) / EXPORT_META}: the export is damaged (not a JSON object)")
    return meta or {}


def write_export_meta(folder: str | Path, meta: dict) -> None:
    atomic_write_json(Path(folder) / EXPORT_META, meta)


def exported_config(folder: str | Path) -> tuple[Config, dict]:
    """The run's config and the export metadata saved beside an exported model (defaults if absent)."""
    folder = Path(folder)
    meta = read_export_meta(folder)
    cfg = read_config(folder) if (folder / CONFIG).is_file() else Config()
    if "max_length" in meta:
        cfg.data.max_length = int(meta["max_length"])
    return cfg, meta


# ---------------------------------------------------------------- teacher logits and the teacher


@dataclass
class TeacherLogits:
    """Teacher logits for a student's training and validation rows: an artifact with its own key.

    The key (distill.cache_key) covers everything the logits depend on: the teacher's files,
    mode and probe settings, tokenization, max_length, precision and the rows. Each row of
    `train`/`val` belongs to the row whose id (data.row_ids) stands at the same place in
    `train_rows`/`val_rows`.
    """

    key: str
    path: Path  # where the artifact is stored (teacher_logits_path)
    train: np.ndarray  # [training rows, classes]
    val: np.ndarray  # [validation rows, classes]
    train_rows: np.ndarray  # uint64 row ids
    val_rows: np.ndarray
    probe: dict | None  # frozen mode: {"weight": [classes, hidden], "bias": [classes]}
    computed_seconds: float  # what computing them cost
    val_overlap: int | None  # student validation rows the teacher run trained on (None: unknown)


def teacher_logits_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir).expanduser() / TEACHER_LOGITS / f"{key}.npz"


def read_teacher_logits(path: str | Path) -> TeacherLogits | None:
    """The artifact stored at `path`; None when there is none.

    Raises:
        RunDamaged: the file is damaged (unreadable, or its parts do not fit together).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            probe = {"weight": z["probe_weight"], "bias": z["probe_bias"]} if "probe_weight" in z else None
            overlap = int(z["val_overlap"])
            artifact = TeacherLogits(key=str(z["key"]), path=path, train=z["train"], val=z["val"],
                                     train_rows=z["train_rows"], val_rows=z["val_rows"], probe=probe,
                                     computed_seconds=float(z["seconds"]),
                                     val_overlap=None if overlap < 0 else overlap)
    except NPZ_ERRORS as err:
        raise RunDamaged(f"{path}: the teacher-logit cache is damaged ({type(err).__name__}: {str(err)[:120]}); "
                          "delete it and distill again to recompute it") from None
    if artifact.key != path.stem or len(artifact.train) != len(artifact.train_rows) or \
            len(artifact.val) != len(artifact.val_rows):
        raise RunDamaged(f"{path}: the teacher-logit cache is damaged (its key or row ids do not fit its "
                          "logits); delete it and distill again to recompute it")
    return artifact


def write_teacher_logits(artifact: TeacherLogits) -> None:
    """Store the artifact at `artifact.path` (atomically: a half-written file is never read)."""
    arrays = {"key": np.str_(artifact.key), "train": artifact.train, "val": artifact.val,
              "train_rows": artifact.train_rows, "val_rows": artifact.val_rows,
              "seconds": np.float64(artifact.computed_seconds),
              "val_overlap": np.int64(-1 if artifact.val_overlap is None else artifact.val_overlap)}
    if artifact.probe is not None:
        arrays.update(probe_weight=artifact.probe["weight"], probe_bias=artifact.probe["bias"])
    artifact.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = artifact.path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, artifact.path)


def write_teacher(run_dir: str | Path, record: dict, probe: dict | None) -> None:
    """A distilled run's teacher.json (with the key and file of its teacher logits) and, in
    frozen mode, teacher_probe.npz."""
    if probe is not None:
        np.savez(Path(run_dir) / TEACHER_PROBE, weight=probe["weight"], bias=probe["bias"])
    atomic_write_json(Path(run_dir) / TEACHER, record)


def read_teacher(run_dir: str | Path) -> dict | None:
    """teacher.json of a distilled run; None for a run that was not distilled."""
    return read_json(Path(run_dir) / TEACHER)


def read_teacher_probe(run_dir: str | Path) -> dict:
    """The linear probe of a run distilled from a frozen teacher: {"weight", "bias"}."""
    with np.load(Path(run_dir) / TEACHER_PROBE) as z:
        return {"weight": z["weight"], "bias": z["bias"]}


def teacher_logits_of(run_dir: str | Path) -> TeacherLogits | None:
    """The teacher-logit artifact a distilled run was trained with (None: not distilled, or the
    cache file is gone)."""
    record = read_teacher(run_dir)
    return read_teacher_logits(record["cache_file"]) if record and record.get("cache_file") else None


# ---------------------------------------------------------------- the writer


_held: dict[str, list] = {}  # resolved run folder -> [open lock file, depth]: re-entrant per process


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(path: Path):
    """The open, flock-ed lock file, or None when a live writer holds it."""
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed the file after we opened it: lock the new one
            return fh
        fh.close()


def writer_process() -> bool:
    """False in the other processes of a multi-process launch: only the main one (RANK 0) claims,
    locks and writes a run folder."""
    return int(os.environ.get("RANK", "0")) == 0


def holds_lock(run_dir: str | Path) -> bool:
    """True while this process holds the run folder's writer lock (`writer_lock`)."""
    return str(Path(run_dir).resolve()) in _held


@contextlib.contextmanager
def writer_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's exclusive writer lock (creating the folder) for the block.

    Re-entrant within a process (distill holds it around train). Under several processes
    (accelerate), only the main process (RANK 0) locks: the others write nothing of their own.

    Raises:
        RunLocked: another live process is writing this run folder.
    """
    run_dir = Path(run_dir)
    if not writer_process():
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:
        _held[key][1] += 1
    else:
        path = run_dir / LOCK
        fh = _try_lock(path)
        if fh is None:
            raise RunLocked(f"out_dir: {run_dir} is being written by {_holder(path)}; wait for it to "
                              "finish, or choose another out_dir/name")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        fh.flush()
        _held[key] = [fh, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            fh = _held.pop(key)[0]
            (run_dir / LOCK).unlink(missing_ok=True)  # while still locked: nobody can take a dead file
            fh.close()
            if created and not any(run_dir.iterdir()):  # refused before writing: leave no empty folder
                run_dir.rmdir()


def refuse_links(run_dir: str | Path) -> None:
    """Refuse a run folder holding a symbolic link among its entries (a linked best/ or last/
    would be written through); the writer calls it before writing anything."""
    run_dir = Path(run_dir)
    links = [p.name for p in run_dir.iterdir() if p.is_symlink()] if run_dir.is_dir() else []
    if links:
        raise OutputRefused(f"{run_dir}: holds symbolic links ({', '.join(sorted(links))}); the tool never writes "
                            "through links in its folders; replace them with real folders or files")


def recover(run_dir: str | Path) -> None:
    """Writer only (holding the lock): finish swaps a crash cut short, remove stale temporaries."""
    run_dir = Path(run_dir)
    for name in CHECKPOINTS:
        recover_swap(run_dir / name)
        for tmp in run_dir.glob(f".{name}.tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
    for name in (CONFIG, METRICS, TRAIN_LOG, SUMMARY, TEST_METRICS, TEACHER, SPEED_PATCHES, "report.md"):
        for tmp in run_dir.glob(f".{name}.*"):  # interrupted atomic writes (mkstemp's names)
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def holds_run(run_dir: str | Path) -> bool:
    """True when the folder already holds (part of) a training run."""
    run_dir = Path(run_dir)
    return (run_dir / METRICS).exists() or (run_dir / "last").exists() or (run_dir / ".last.old").exists()


def refuse_existing_run(run_dir: str | Path, resume: bool) -> None:
    """Raise ConfigError when a fresh (not resumed) run would overwrite a used run folder."""
    if not resume and holds_run(run_dir):
        raise ConfigError(f"out_dir: {run_dir} already holds a run; pass train.resume=true to continue "
                          "it, or choose another out_dir/name")


def prepare_run_dir(run_dir: Path, cfg: Config) -> bool:
    """Writer only (holding the lock): repair, check and initialise the folder for a run.

    Returns:
        True when resuming from the folder's `last/` checkpoint.

    Raises:
        ConfigError: a fresh run into a used folder, or a resume with other model/lora/data settings.
    """
    refuse_links(run_dir)
    recover(run_dir)
    last = run_dir / "last"
    if cfg.train.resume and last.is_dir():
        # read as a config: keys an older version did not write were at their defaults (peft: plain
        # LoRA), and its classes are settled as it showed them (_settled)
        old = to_dict(read_config(run_dir))
        for section in ("model", "lora", "peft", "data"):
            if old[section] != to_dict(cfg)[section]:
                raise ConfigError(f"train.resume: {section}.* differs from the run in {run_dir}; "
                                  "resume with the same settings or choose another out_dir")
        write_marker(run_dir, "run")  # a run of a version before the marker
        write_config(cfg, run_dir)  # the run goes on under these train.* settings
        return True
    refuse_existing_run(run_dir, resume=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, "run")
    (run_dir / TRAIN_LOG).unlink(missing_ok=True)  # from a start that never reached a checkpoint
    write_config(cfg, run_dir)
    return False


# ---------------------------------------------------------------- the run folder as one object

# Where a run lives, not how it is trained: may differ between two invocations of the same run.
NOT_SETTINGS = ("out_dir", "train.resume", "train.progress", "data.cache_dir", "distill.teacher")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass(frozen=True)
class RunFolder:
    """One run folder: where its files are, what state it is in, and its saved records.

    Commands, experiments and benchmarks ask it instead of spelling a run file's name.
    `status` is "done" (summary.json: training finished), "resume" (a complete last/
    checkpoint: `train.resume=true` continues it), "restart" (the tool's folder, interrupted
    before its first checkpoint), "foreign" (a folder the tool did not write) or "new".
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def status(self) -> str:
        if (self.path / SUMMARY).is_file():
            return "done"
        if (self.last / STATE).is_file():  # last/ is swapped in whole, never half-written
            return "resume"
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            return "new"
        return "restart" if is_run_folder(self.path) else "foreign"

    def steps_done(self) -> int:
        """The step of the last checkpoint (0 when there is none)."""
        path = self.last / STATE
        return int(json.loads(path.read_text())["step"]) if path.is_file() else 0

    def config(self) -> Config:
        return read_config(self.path)

    def summary(self) -> dict | None:
        return read_summary(self.path)

    def test_metrics(self) -> dict | None:
        return read_json(self.path / TEST_METRICS)

    def test_predictions(self) -> dict | None:
        return read_predictions(self.path / TEST_PREDICTIONS)

    def settings_changes(self, cfg: Config) -> list[str]:
        """The config keys whose saved value differs from `cfg` (where the run lives ignored)."""
        saved, now = _flat(to_dict(self.config())), _flat(to_dict(cfg))
        # classes `cfg` leaves open are the data's to tell: the run's settled ones are no change
        derived = {"data.labels": [], "model.num_labels": 0}
        return [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(saved.keys() | now.keys())
                if k not in NOT_SETTINGS and saved.get(k) != now.get(k) and derived.get(k, ...) != now.get(k)]
