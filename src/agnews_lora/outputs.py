"""May this command write here? The one module that decides, for every writer, before any work.

The rules (docs/reference/inputs.md states them for users):
- The tool deletes or replaces only what it wrote itself. A run, export or sweep folder carries
  a marker (`runs.MARKER`) written when the tool creates it; an existing folder without one is
  never emptied or written into: the command is refused, naming what is in the folder.
- No output may be an input of the same command, a file inside a run, export or model folder
  (other than the files the command owns there), or lie in a checkpoint folder. An existing
  file outside those folders is replaced only when it is one the tool writes (its kind is
  recognised: an `ID,Label` CSV, a metrics JSON, ...).
- Temporary files and folders are removed on failure and by the next writer; a symbolic link
  inside a run folder is refused, never followed.

Commands call `claim_file` / `claim_folder` with everything they will write before they load a
model or read data, so a refusal costs nothing and never leaves half an output behind.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from agnews_lora import runs
from agnews_lora.errors import OutputRefused

PathLike = str | Path


# ---------------------------------------------------------------- what is already there


@dataclass(frozen=True)
class Holder:
    """A folder whose contents belong to someone: the tool's run/export/sweep folder, a
    checkpoint of a run, or a model folder the tool did not write."""

    path: Path
    kind: str  # run | export | sweep | checkpoint | model


def holder_of(folder: PathLike) -> Holder | None:
    """What `folder` itself is (not its parents), or None for an ordinary folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marked = runs.read_marker(folder)
    if marked is not None:
        return Holder(folder, marked)
    if folder.name in runs.CHECKPOINT_NAMES and runs.is_run_folder(folder.parent):
        return Holder(folder, "checkpoint")
    if runs.is_run_folder(folder):
        return Holder(folder, "run")  # written by an older version, before the marker
    if (folder / runs.EXPORT_META).is_file():
        return Holder(folder, "export")
    if _is_sweep_folder(folder):
        return Holder(folder, "sweep")  # written by an older version, or a study created for the sweep first
    if (folder / "adapter_config.json").is_file() or \
            ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return Holder(folder, "model")
    return None


def _is_sweep_folder(folder: Path) -> bool:
    """A folder holding only what a sweep writes, with its SQLite study (created by `sweep`, or by
    the user with optuna.create_study to enqueue trials) or its summary."""
    db = folder / runs.STUDY_DB
    has_study = db.is_file() and _first_bytes(db, 16) == b"SQLite format 3\x00"
    if not (has_study or (folder / runs.SWEEP_SUMMARY).is_file()):
        return False
    own = {runs.STUDY_DB, runs.SWEEP_SUMMARY, runs.BEST_TRIAL, runs.COMPARISON,
           Path(runs.COMPARISON).with_suffix(".png").name, runs.MARKER}
    return all(p.name in own or (p.name.startswith("trial-") and p.is_dir()) for p in folder.iterdir())


def enclosing_holder(path: PathLike) -> Holder | None:
    """The nearest folder above `path` (resolved) that belongs to someone, else None."""
    for folder in Path(path).resolve().parents:
        holder = holder_of(folder)
        if holder is not None:
            return holder
    return None


def _listing(folder: Path, most: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# ---------------------------------------------------------------- kinds of output files


def _first_bytes(path: Path, n: int = 256) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _is_json_object(path: Path, key: str | None = None) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (key is None or key in data)


def _is_predictions_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return {"labels.npy", "logits.npy"} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# kind -> how a file the tool wrote of that kind is recognised (an existing file of another kind
# outside the tool's folders is the user's, and is never replaced)
KINDS: dict[str, Callable[[Path], bool]] = {
    "predictions": lambda p: _first_bytes(p).startswith(b"ID,"),  # predict's ID,Label and --probs CSVs
    "metrics": lambda p: _is_json_object(p, "accuracy"),  # evaluate's metrics JSON
    "json": _is_json_object,
    "npz": _is_predictions_npz,
    "png": lambda p: _first_bytes(p).startswith(b"\x89PNG"),
    "markdown": lambda p: _first_bytes(p).startswith(b"# "),  # every report the tool writes opens with a title
}


# ---------------------------------------------------------------- the checks


def _check_inputs(out: Path, label: str, inputs: Sequence[PathLike]) -> None:
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if out == source:
            why = "is also an input file"
        elif source.is_dir() and source in out.parents:
            why = "lies inside an input folder"
        elif out in source.parents:
            why = "holds an input"
        else:
            continue
        raise OutputRefused(f"{label} {out}: {why} of this command ({item}); write the output elsewhere")


def _owned(resolved: Path, holder: Holder, owner: PathLike | None, owned: Sequence[str]) -> bool:
    """True when `resolved`, inside `holder`, is one of the paths `owner` owns (`owned`: patterns
    relative to `owner`, which is the holder itself or the run whose checkpoint the holder is)."""
    if owner is None:
        return False
    top = Path(owner).expanduser().resolve()
    if top != holder.path and not (holder.kind == "checkpoint" and holder.path.parent == top):
        return False
    return any(fnmatch.fnmatchcase(str(resolved.relative_to(top)), pattern) for pattern in owned)


def _where(holder: Holder) -> str:
    if holder.kind == "checkpoint":
        return f"the run folder {holder.path.parent}, in its checkpoint folder {holder.path.name}/"
    return f"the {holder.kind} folder {holder.path}"


def _refuse_links_below(path: Path, owner: PathLike | None, label: str) -> None:
    """Refuse a symbolic link at `path` or at any folder between the tool's folder `owner`
    (exclusive) and it: the tool never writes through a link inside its folders."""
    if owner is None:
        return
    top, path = Path(owner).expanduser().absolute(), path.absolute()
    if top not in path.parents:
        return
    current = top
    for part in path.relative_to(top).parts:
        current = current / part
        if current.is_symlink():
            raise OutputRefused(f"{label} {path}: {current} is a symbolic link inside {top}; the tool never "
                                "writes through links in its folders; replace the link with a real folder or file")


def _probe_writable(target: Path, label: str) -> None:
    parent = next(p for p in [target.parent, *target.parent.parents] if p.exists())
    if not parent.is_dir():
        raise OutputRefused(f"{label} {target}: {parent} is a file, not a folder; choose another path")
    try:  # a real probe: permission bits say nothing for root or on a read-only mount
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".agnews-lora-probe.")
        os.close(fd)
        os.unlink(probe)
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(f"{target} is read-only")
    except OSError as err:
        raise OutputRefused(f"{label} {target}: cannot write there ({err.strerror or err}); "
                            "choose another path") from None


def claim_file(path: PathLike, kind: str, label: str = "output", inputs: Sequence[PathLike] = (),
               owner: PathLike | None = None, owned: Sequence[str] = ()) -> Path:
    """Check, before any work, that a command may write (create or replace) the file `path`.

    Args:
        path: the file to write.
        kind: what the tool writes there (a key of KINDS); an existing file outside the tool's
            folders is replaced only when it is of this kind.
        label: the option or argument that named it, for the message (e.g. "--probs").
        inputs: the command's input files and folders.
        owner: the run, export or sweep folder the command works on, if any.
        owned: the files the command owns inside `owner`, relative to it (glob patterns allowed).

    Returns:
        The path, with `~` expanded.

    Raises:
        OutputRefused: naming the path, why, and what to do.
    """
    out = Path(path).expanduser()
    _refuse_links_below(out, owner, label)
    resolved = out.resolve()
    if out.is_dir():
        raise OutputRefused(f"{label} {out}: is a folder; name the file to write")
    _check_inputs(resolved, label, inputs)
    holder = enclosing_holder(resolved)
    if holder is not None:
        if not _owned(resolved, holder, owner, owned):
            raise OutputRefused(f"{label} {out}: lies inside {_where(holder)}; writing there could break it; "
                                "write the output elsewhere")
    elif out.exists() and not KINDS[kind](out):
        raise OutputRefused(f"{label} {out}: exists and is not a {kind} file that agnews-lora writes; the tool "
                            "never replaces a file it did not write; choose a new path (or delete the file yourself)")
    _probe_writable(resolved, label)
    return out


def claim_folder(path: PathLike, kind: str, label: str = "output", inputs: Sequence[PathLike] = (),
                 owner: PathLike | None = None, owned: Sequence[str] = ()) -> Path:
    """Check, before any work, that a command may create, fill or replace the folder `path`.

    A folder may be used when it does not exist, is empty, or is the tool's own folder of
    `kind` (its marker says so). It may lie inside another of the tool's folders only where
    `owner` owns it (`owned`, relative to `owner`), or where a sweep folder holds its trial runs.

    Args:
        path: the folder.
        kind: "run", "export" or "sweep".
        label: the option that named it, for the message.
        inputs: the command's input files and folders.
        owner: the run folder the command works on, if any.
        owned: folders `owner` may hold for this command (e.g. "export/*").

    Returns:
        The path, with `~` expanded.

    Raises:
        OutputRefused: naming the path, what is in it, and what to do.
    """
    out = Path(path).expanduser()
    _refuse_links_below(out, owner, label)
    resolved = out.resolve()
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{label} {out}: is a file, not a folder; name a new folder")
    _check_inputs(resolved, label, inputs)
    if owner is not None and resolved == Path(owner).expanduser().resolve():
        raise OutputRefused(f"{label} {out}: is the folder this command reads; name a new folder")
    holder = enclosing_holder(resolved)
    trial = holder is not None and holder.kind == "sweep" and kind == "run" and resolved.parent == holder.path
    if holder is not None and not trial and not _owned(resolved, holder, owner, owned):
        raise OutputRefused(f"{label} {out}: lies inside {_where(holder)}; writing there could break it; "
                            "name a folder outside it")
    if out.is_dir():
        own = holder_of(out)
        if own is not None and own.kind != kind:
            raise OutputRefused(f"{label} {out}: is a {own.kind} folder, not {'an' if kind[0] in 'ae' else 'a'} "
                                f"{kind} folder; name a new folder")
        if own is None and any(out.iterdir()):
            raise OutputRefused(f"{label} {out}: is a folder that agnews-lora did not create and it is not empty "
                                f"({_listing(out)}); the tool never writes into or empties such a folder; "
                                "name a new or empty folder")
    _probe_writable(resolved / "x", label)
    return out


# ---------------------------------------------------------------- temporaries


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(dest: PathLike) -> list[Path]:
    """Remove the temporary folders beside `dest` that a killed writer left (their pid is gone).

    Returns:
        The folders removed.
    """
    dest = Path(dest)
    removed = []
    if not dest.parent.is_dir():
        return removed
    for tmp in dest.parent.glob(f".{dest.name}.tmp*"):
        pid_text = tmp.name[len(f".{dest.name}.tmp"):].split("-")[0]
        if tmp.is_dir() and not tmp.is_symlink() and (not pid_text.isdigit() or not _alive(int(pid_text))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def discard_run(path: PathLike) -> None:
    """Delete a run folder, only when it is the tool's own (a script restarting a run that was
    interrupted before its first checkpoint).

    Raises:
        OutputRefused: the folder is not a run folder the tool wrote.
    """
    path = Path(path).expanduser()
    holder = holder_of(path)
    if path.is_symlink() or holder is None or holder.kind != "run":
        raise OutputRefused(f"{path}: not a run folder that agnews-lora wrote; the tool never deletes it; "
                            "move it away or choose another folder")
    shutil.rmtree(path)
