"""Any text-classification data (local files or a Hub dataset; AG News by default): load -> class ids
-> split -> tokenize once (cached) -> length-grouped batches."""

from __future__ import annotations

import copy
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import random
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from agnews_lora.config import AG_NEWS_LABELS, Config, DataConfig, class_names, generic_names, validate
from agnews_lora.errors import DataError
from agnews_lora.hub import ensure_hub_reachable
from agnews_lora.unpickle import ForbiddenGlobal, safe_load

@dataclass
class Split:
    """Texts with optional integer labels (0-based); labels is None for unlabelled files. `names`:
    the class names by label id that the labels were read with (None when unlabelled)."""

    texts: list[str]
    labels: list[int] | None
    source: str = ""
    names: list[str] | None = None
    columns: list[str] | None = None  # the columns the source has, where it has named ones (for messages)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Split":
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return Split([self.texts[i] for i in idx], labels, self.source, self.names)


@dataclass(frozen=True)
class Columns:
    """Where a row's parts are: its text is the `text` columns joined by a space, its label is in
    `label` (an integer class id, 0-based, or a class name)."""

    text: tuple[str, ...] = ("text",)
    label: str = "label"

    @classmethod
    def of(cls, data: DataConfig) -> "Columns":
        return cls(tuple(data.text_fields), data.label_field)


def clean_text(text: str) -> str:
    # The original CSV marks line breaks with a backslash; make them spaces.
    return " ".join(text.replace("\\", " ").split())


@dataclass
class _Part:
    """One source's rows before their labels become ids: `values` holds each row's label as read
    (an int: a class id; a str: a class name or an id written as text); `names` are the class names
    the source itself gives (a Hub ClassLabel, the AG News CSV), if any."""

    source: str
    texts: list[str]
    values: list | None
    first_row: int = 1  # the row number of the first row, for messages
    names: list[str] | None = None
    one_based: bool = False  # ids were written 1-based (the headerless CSV): say so in messages
    columns: list[str] | None = None  # the columns the source has (for messages)


# ---------------------------------------------------------------- reading files


def _suffixes(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def _read_bytes(path: Path) -> bytes:
    if not path.name.lower().endswith(".gz"):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as raw:
            return raw.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        why = "is truncated" if isinstance(err, EOFError) else "is not gzip data"
        raise DataError(f"{path}: the file {why} ({err}); download or compress it again, or drop the .gz "
                        "suffix if it is not compressed") from None


def _open_text(path: Path) -> io.TextIOBase:
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        bad = data[err.start : err.start + 8]
        raise DataError(
            f"{path}: line {line}: bytes {bad!r} are not valid UTF-8; re-save the file as UTF-8"
        ) from None
    return io.StringIO(text, newline="")


# A lone UTF-16 surrogate: no Unicode character, so no UTF-8 byte sequence. CSV bytes cannot hold one
# (they fail as invalid UTF-8); a JSON escape ("\ud800") or a pickled str can, and the tokenizer
# then fails. Refused like invalid UTF-8, for every format alike.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_text(path: Path | str, row: int, text: object) -> str:
    if not isinstance(text, str):
        raise DataError(f"{path}: row {row}: text {text!r} is not a string")
    bad = _SURROGATE.search(text)
    if bad:
        raise DataError(f"{path}: row {row}: text holds a lone surrogate {bad.group()!r} at character {bad.start()}, "
                        "which is not a Unicode character (a broken \\u escape or a text cut inside an emoji); "
                        "fix or remove it")
    cleaned = clean_text(text)
    if not cleaned:
        raise DataError(f"{path}: row {row}: text is empty; remove the row or fill it in")
    return cleaned


# csv's default field limit (131,072 characters) rejects a long article; texts are truncated
# at tokenization anyway, so any field that fits in memory is read.
_CSV_FIELD_LIMIT = 2**31 - 1


def _csv_rows(path: Path, delimiter: str = ",") -> list[list[str]]:
    text = _open_text(path).getvalue()
    previous = csv.field_size_limit(_CSV_FIELD_LIMIT)
    # strict: a quote left open would otherwise swallow the following rows into one field, silently
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, start = [], 1  # start: the line the next row begins on
    try:
        for row in reader:
            rows.append(row)
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(_csv_error(path, text, start, reader.line_num, err)) from None
    finally:
        csv.field_size_limit(previous)  # a process-wide setting: leave it as found
    return rows


def _csv_error(path: Path, text: str, start: int, line: int, err: csv.Error) -> str:
    """The message for a CSV row that starts on line `start` and fails on line `line`: where its
    broken quoted field opened, when the quoting is what broke."""
    opened = _open_quote(io.StringIO(text, newline="").readlines()[start - 1 : line], start)
    if opened is None:
        return f"{path}: line {line}: not a readable CSV file ({err})"
    where, closed = opened
    if not closed:
        return (f"{path}: line {where}: a quoted field opens here and is never closed, so every later line would "
                "be read into it; close the quote (a quote inside a quoted field is written twice: \"\")")
    if where == line:
        return (f"{path}: line {where}: a quoted field has text after its closing quote; quote the whole field, "
                "and write a quote inside it twice (\"\")")
    return (f"{path}: line {where}: a quoted field opens here and is not closed on its line: it runs on to line "
            f"{line}, where a quote ends it and text follows; close the quote on line {where} (a quote inside a "
            "quoted field is written twice: \"\")")


def _open_quote(lines: list[str], first: int) -> tuple[int, bool] | None:
    """Where strict CSV quoting breaks in `lines` (a row's lines, the first numbered `first`): (the
    line its quoted field opened on, whether that field was closed before the text that broke it),
    or None when the quoting is sound."""
    quoted, opened, field_start = False, first, True
    for number, line in enumerate(lines, start=first):
        i = 0
        while i < len(line):
            c = line[i]
            if quoted and c == '"':
                if line[i + 1 : i + 2] == '"':  # a doubled quote: one quote character
                    i += 1
                elif line[i + 1 : i + 2] not in ("", ",", "\r", "\n"):
                    return opened, True
                else:
                    quoted = False
            elif not quoted and c == '"' and field_start:
                quoted, opened = True, number
            field_start = not quoted and c in ",\r\n"
            i += 1
    return (opened, False) if quoted else None


def _read_csv(path: Path, columns: Columns, delimiter: str = ",") -> _Part:
    """A CSV (or, with a tab delimiter, TSV) file with a header, or headerless (`_headerless`).

    Read by Python's csv module in strict mode, not by `datasets`' csv loader: that one (pandas)
    silently joins the rows after a quote left open into one field and shifts the columns of a row
    with an extra field, where this reader stops at the line and says what to fix."""
    rows = _csv_rows(path, delimiter)
    while rows and not rows[-1]:  # blank lines at the end, as editors and spreadsheets leave them
        rows.pop()
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header = [h.strip() for h in rows[0]]
    wanted = {c.lower() for c in (*columns.text, "text")}
    if wanted & {h.lower() for h in header}:
        records = [dict(zip(header, r)) for r in rows[1:]]
        return _from_records(path, records, columns, first_row=2)
    return _headerless(path, rows, columns)


def _headerless(path: Path, rows: list[list[str]], columns: Columns) -> _Part:
    """The CSV format of Zhang, Zhao & LeCun (2015), AG News' original: no header, every row
    `class,field,...` with the class 1-based and the fields joined into the text. Three columns with
    classes 1..4 is AG News (class,title,description): its class names come with it."""
    width = len(rows[0])
    if _as_id(rows[0][0]) is None:  # a header, without the text column
        raise DataError(f"{path}: no {_fields(columns.text)} column (header: {', '.join(rows[0][:8])}); name the text "
                        "column(s) with data.text_fields, or write the headerless class,title,description format")
    texts, values = [], []
    for i, r in enumerate(rows, start=1):
        if len(r) != width or width < 2:
            raise DataError(
                f"{path}: row {i}: expected {width if width >= 2 else 3} columns (class,title,description: "
                f"headerless, as the first row) or a header naming the text column ({_fields(columns.text)}), "
                f"got {len(r)} columns: {r[:4]!r}")
        value = _as_id(r[0])
        if value is None:
            raise DataError(f"{path}: row {i}: label {r[0]!r} is not an integer (the first column of a headerless "
                            "CSV is the class, 1-based)")
        if value < 1:
            raise DataError(f"{path}: row {i}: label {value} is out of range: the classes of a headerless CSV "
                            "count from 1")
        values.append(value - 1)
        texts.append(_check_text(path, i, " ".join(r[1:])))
    ag_news = width == 3 and max(values) < len(AG_NEWS_LABELS)
    return _Part(str(path), texts, values, names=list(AG_NEWS_LABELS) if ag_news else None, one_based=True)


def _fields(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _present(keys: set, wanted: Sequence[str], fallback: str) -> tuple[str, ...] | None:
    """The columns to read: `wanted` when all are there; the plain `fallback` column when none of
    them is (a file in the common `text`/`label` shape); None when the columns are missing."""
    if set(wanted) <= keys:
        return tuple(wanted)
    if fallback in keys and not set(wanted) & keys:
        return (fallback,)
    return None


def _from_records(path: Path | str, records: list[dict], columns: Columns, first_row: int = 1) -> _Part:
    if not records:
        raise DataError(f"{path}: no rows")
    keys = set().union(*records)  # every row's: a label missing from the first row alone is an error, not "unlabelled"
    fields = _present(keys, columns.text, "text")
    if fields is None:
        raise DataError(f"{path}: no {_fields(columns.text)} column (columns: {sorted(map(str, keys))}); name the "
                        "text column(s) with data.text_fields, or name the text column 'text'")
    label = _present(keys, [columns.label], "label")
    texts, values = [], []
    for i, rec in enumerate(records, start=first_row):
        texts.append(_check_text(path, i, _joined(path, i, rec, fields)))
        if label:
            values.append(_label_value(path, i, rec.get(label[0]), label[0]))
    return _Part(str(path), texts, values if label else None, first_row=first_row, columns=sorted(map(str, keys)))


def _joined(path: Path | str, row: int, rec: dict, fields: tuple[str, ...]) -> object:
    """A row's text: its one text field as it is, or several joined by a space (a missing one empty)."""
    if len(fields) == 1:
        return rec.get(fields[0])
    parts = []
    for f in fields:
        value = rec.get(f)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: row {row}: field '{f}' {value!r:.80} is not a string")
        parts.append(value or "")
    return " ".join(parts)


def _label_value(path: Path | str, row: int, value: object, field: str = "label") -> int | str:
    """A label as read: an int (a class id) or a str (a class name, or an id written as text)."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)) or (
            isinstance(value, str) and not value.strip()):
        raise DataError(f"{path}: row {row}: label (column '{field}') is missing or empty; fill it in or remove "
                        "the row")
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return int(value)  # a column of ids stored as floats (parquet, pandas)
    if isinstance(value, (float, np.floating)):
        raise DataError(f"{path}: row {row}: label {value!r} is a fractional number, not a class id (an integer) "
                        "or a class name; write class ids as integers, or class names as text")
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(f"{path}: row {row}: label {value!r:.80} is not a class id (an integer) or a class name")


@contextmanager
def _quiet_datasets() -> Iterator:
    """`datasets`, with its progress bars and log lines off while it reads a file (restored after)."""
    import datasets

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _innermost(err: BaseException) -> BaseException:
    """The exception at the bottom of `err`'s chain (datasets wraps the reader's own in its own)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return err


def _load_packaged(path: Path, builder: str):
    """Read one local file with `datasets`' packaged loader `builder` (json, parquet): a Dataset.
    Raises the loader's error; the callers turn it into a message naming the row."""
    import glob

    with _quiet_datasets() as datasets:
        # data_files are glob patterns: a file name with [ or * is escaped to mean itself
        return datasets.load_dataset(builder, data_files=glob.escape(str(path)), split="train")


def _from_dataset(source: Path | str, ds, columns: Columns) -> _Part:
    """A `datasets.Dataset`'s rows as a part: its text and label columns, a ClassLabel's names as the
    class names, its column names for messages."""
    found = list(ds.column_names)
    if _present(set(found), columns.text, "text") is None:
        raise DataError(f"{source}: no {_fields(columns.text)} column (columns: {sorted(found)}); name the "
                        "text column(s) with data.text_fields, or name the text column 'text'")
    wanted = list(dict.fromkeys(c for c in (*columns.text, "text", columns.label, "label") if c in found))
    records = [dict(zip(wanted, row)) for row in zip(*(ds[c] for c in wanted))]
    part = _from_records(source, records, columns)
    part.columns = sorted(found)
    label = _present(set(found), [columns.label], "label")
    part.names = list(getattr(ds.features.get(label[0]) if label else None, "names", None) or []) or None
    return part


def _read_json(path: Path, columns: Columns) -> _Part:
    """JSON lines, or one JSON array of objects (.json, .jsonl, .gz too), read by `datasets`' json
    loader. When it cannot read the file, the file is read line by line to say which line breaks."""
    try:
        ds = _load_packaged(path, "json")
    except Exception as err:  # datasets wraps pyarrow's and json's errors in several types
        _diagnose_json(path)
        raise DataError(f"{path}: not a readable JSON / JSON-lines file ({_innermost(err)})") from None
    if not ds.column_names:
        raise DataError(f"{path}: no rows")
    return _from_dataset(path, ds, columns)


def _diagnose_json(path: Path) -> None:
    """Raise a DataError naming the line (and what is wrong there) that stops `path` from being read
    as JSON lines or a JSON array of objects; return when no such line is found."""
    text = _open_text(path).getvalue()  # raises for bad gzip or UTF-8, naming the line
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        lines = [(i, rec) for i, rec in enumerate(rows, start=1)]
        where = "item"
    else:
        lines = []
        for i, line in enumerate(io.StringIO(text), start=1):
            if not line.strip():
                continue
            try:
                lines.append((i, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {i}: not valid JSON ({err.msg}): {line[:80]!r}") from None
        where = "line"
    if not lines:
        raise DataError(f"{path}: no rows")
    for i, rec in lines:
        if not isinstance(rec, dict):
            raise DataError(f"{path}: {where} {i}: expected an object with 'text' (and 'label'), got {rec!r:.80}")
        for value in rec.values():
            if isinstance(value, str) and _SURROGATE.search(value):
                _check_text(path, i, value)  # names the lone surrogate


def _read_parquet(path: Path, columns: Columns) -> _Part:
    try:
        ds = _load_packaged(path, "parquet")
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({_innermost(err)})") from None
    return _from_dataset(path, ds, columns)


def _read_saved(path: Path, columns: Columns) -> _Part:
    """A folder `datasets.Dataset.save_to_disk` wrote: its columns as a file's; a ClassLabel's names
    become the class names."""
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: not a readable saved dataset ({type(err).__name__}: {err})") from None
    return _from_dataset(path, ds, columns)


def _read_pickle(path: Path, columns: Columns) -> _Part:
    # Restricted: a pickle from the internet must not be able to run code (see unpickle.py).
    with open(path, "rb") as fh:
        try:
            obj = safe_load(fh)
        except ForbiddenGlobal as err:
            raise DataError(f"{path}: refused to unpickle: {err}. Accepted pickles hold a datasets.Dataset, "
                            "a pandas DataFrame, a dict of columns, a list of texts or numpy arrays; "
                            "or convert the file to CSV/JSONL/parquet") from None
        except Exception as err:
            raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None
    return _from_records(path, _pickle_records(path, obj), columns)


def _pickle_records(path: Path, obj: object) -> list[dict]:
    """The supported unpickled shapes as a list of row dicts."""
    if hasattr(obj, "to_pandas"):  # datasets.Dataset
        obj = obj.to_pandas()
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # pandas.DataFrame
        obj = obj.to_dict(orient="records")
    if hasattr(obj, "tolist") and not isinstance(obj, (list, dict)):  # numpy array, pandas Series
        obj = obj.tolist()
    if isinstance(obj, dict) and obj and all(hasattr(v, "__len__") and not isinstance(v, str) for v in obj.values()):
        cols = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in obj.items()}
        obj = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    if isinstance(obj, list) and obj and all(isinstance(t, str) for t in obj):
        obj = [{"text": t} for t in obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(
            f"{path}: pickle holds {type(obj).__name__}; expected a datasets.Dataset, DataFrame, "
            "dict of columns or list of texts with a 'text' field"
        )
    return obj


_READERS = {".csv": _read_csv, ".tsv": lambda path, columns: _read_csv(path, columns, "\t"),
            ".jsonl": _read_json, ".json": _read_json,
            ".parquet": _read_parquet, ".pkl": _read_pickle, ".pickle": _read_pickle}


# ---------------------------------------------------------------- Hub datasets

HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class HubSource:
    """A dataset `datasets.load_dataset` reads: a Hub id (or a local dataset folder), its
    configuration ("" = the default) and a split, slices included (`train[:90%]`, `test[100:200]`).
    Written in data.train, data.test and --input as `hf:NAME`, `hf:NAME:CONFIG` or
    `hf:NAME:CONFIG:SPLIT` (`hf:NAME::SPLIT` for the default configuration)."""

    name: str
    config: str = ""
    split: str = "train"

    @classmethod
    def parse(cls, text: str, split: str) -> "HubSource":
        """`hf:NAME[:CONFIG[:SPLIT]]` with `split` where it names none."""
        name, config, given = (text[len(HUB_PREFIX):].split(":", 2) + ["", ""])[:3]
        if not name.strip() or "[" in config or "]" in config:
            raise DataError(f"{text}: write a Hub dataset as hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT (a split "
                            "with the default configuration: hf:NAME::SPLIT, e.g. hf:fancyzhx/ag_news::train[:90%])")
        return cls(name.strip(), config.strip(), given.strip() or split)

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.name}:{self.config}:{self.split}"


def _read_hub(source: HubSource, columns: Columns,
              hint: str = "name local files (or a local dataset folder) instead") -> _Part:
    """Read a split of a Hub dataset (or of a local dataset folder) through `datasets`: the Hub is
    checked first, so that offline gives one clear line instead of retries."""
    local = Path(source.name).expanduser()
    if not local.is_dir():
        ensure_hub_reachable(source.name, kind="dataset", hint=hint)
    try:
        with _quiet_datasets() as datasets:
            ds = datasets.load_dataset(str(local) if local.is_dir() else source.name, source.config or None,
                                       split=source.split)
    except Exception as err:  # an unknown split or configuration (datasets names the ones there are), ...
        raise DataError(f"{source}: {type(_innermost(err)).__name__}: {_innermost(err)}") from None
    return _from_dataset(str(source), ds, columns)


def _read_part(path: str | Path, columns: Columns, split: str = "test") -> _Part:
    """One source's rows: a local file or folder, or `hf:...` (its split, when it names none, is `split`)."""
    if str(path).startswith(HUB_PREFIX):
        return _read_hub(HubSource.parse(str(path), split), columns)
    path = Path(path).expanduser()
    if path.is_dir() and (path / "state.json").is_file():  # a datasets.Dataset.save_to_disk folder
        return _read_saved(path, columns)
    if path.is_dir() and (path / "dataset_dict.json").is_file():  # a DatasetDict's: one folder per split
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{path}: a saved DatasetDict (splits: {', '.join(splits)}); name one split's folder, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file; name the file itself (or a folder "
                        "datasets.Dataset.save_to_disk wrote)")
    if not path.is_file():
        raise DataError(f"{path}: no such file; check data.train / data.test or --input")
    kind = _suffixes(path)
    for ext, reader in _READERS.items():
        if kind.endswith(ext):
            return reader(path, columns)
    raise DataError(f"{path}: unknown file type; use .csv, .tsv, .jsonl or .json (each also .gz), .parquet, "
                    ".pkl, a folder datasets.Dataset.save_to_disk wrote, or hf:NAME[:CONFIG[:SPLIT]] for a Hub "
                    "dataset")


# Sources already read in this process, by what they are (a file's size and modification time
# included): settling the classes, then loading the splits, or planning many rows of a study on the
# same files reads each file once. The last few are kept.
_READ: dict[tuple, _Part] = {}
_READ_KEEP = 6


def _read_part_once(path: str | Path, columns: Columns, split: str) -> _Part:
    """`_read_part`, from `_READ` when the same source was read before (a shallow copy: callers may
    drop its labels, not change its rows)."""
    if str(path).startswith(HUB_PREFIX):
        where: tuple = (str(path),)
    else:
        try:
            found = Path(path).expanduser().resolve()
            files = sorted(f for f in found.iterdir() if f.is_file()) if found.is_dir() else [found]
            where = (str(found), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
        except OSError:  # missing: reading it says so
            return _read_part(path, columns, split)
    key = (*where, columns, split)
    if key not in _READ:
        _READ[key] = _read_part(path, columns, split)
        while len(_READ) > _READ_KEEP:
            _READ.pop(next(iter(_READ)))
    return dataclasses.replace(_READ[key])


def read_file(path: str | Path, num_labels: int = 0, names: Sequence[str] = (),
              columns: Columns = Columns()) -> Split:
    """Read one local data file.

    Args:
        path: a file with a header naming the text column(s) (and the label column): CSV, JSONL,
            parquet, or a pickle (the course competition's unlabelled test set) holding a
            datasets.Dataset, a DataFrame, a dict of columns, a list of texts or numpy arrays,
            read by a restricted unpickler that refuses any other global; or a headerless CSV
            in the format of AG News' original (`class,title,description`, classes 1-based; any
            number of text fields). `.gz` ok for CSV and JSONL. Or a folder
            `datasets.Dataset.save_to_disk` wrote (a ClassLabel's names are the class names).
        num_labels, names: the classes, as in `read_files`.
        columns: the text and label columns.

    Returns:
        The Split with cleaned texts.
    """
    return read_files([path], num_labels=num_labels, names=names, columns=columns)


def read_files(paths: Sequence[str | Path], num_labels: int = 0, names: Sequence[str] = (),
               columns: Columns = Columns(), labels: bool = True, split: str = "test") -> Split:
    """Read and concatenate several files (all labelled, or all unlabelled).

    Args:
        paths: the files (formats as in `read_file`).
        num_labels: the number of classes; 0 = as many as `names`, else as the labels show.
        names: class names by label id; empty = from the data (`label_ids`).
        columns: the text and label columns.
        labels: False reads the texts alone (any label column is ignored).
        split: the split of an `hf:NAME[:CONFIG]` source that names none.

    Returns:
        The Split: labels as ids, with the class names they were read with.
    """
    parts = [_read_part_once(p, columns, split) for p in paths]
    if not labels:
        for part in parts:
            part.values = None
    labelled = {p.values is not None for p in parts}
    if len(labelled) > 1:
        raise DataError(f"{', '.join(map(str, paths))}: some files have labels and some do not")
    return _split(parts, ",".join(map(str, paths)), num_labels=num_labels, names=names)


def _split(parts: list[_Part], source: str, num_labels: int, names: Sequence[str]) -> Split:
    texts = [t for p in parts for t in p.texts]
    columns = parts[0].columns
    if parts[0].values is None:
        return Split(texts, None, source, columns=columns)
    labels, classes = label_ids(parts, num_labels=num_labels, names=names)
    return Split(texts, labels, source, None if labels is None else classes, columns=columns)


# ---------------------------------------------------------------- labels


def _as_id(value: int | str) -> int | None:
    """A label as a class id when it is an integer (or one written as text), else None."""
    if isinstance(value, int):
        return value
    text = value.strip()
    if re.fullmatch(r"[-+]?\d+(\.0*)?", text):  # "1.0": an id written as a float (pandas, spreadsheets)
        return int(float(text))
    return None


_FRACTION = re.compile(r"[-+]?\d*\.\d+")


def label_ids(parts: list[_Part], num_labels: int = 0, names: Sequence[str] = ()) -> tuple[list[int] | None, list[str]]:
    """Every row's label as a class id, and the class names by id.

    The labels are class names when `names` holds every one of them (mapped in that order); else
    class ids when all are integers (0-based; checked against the number of classes, which is
    `num_labels`, else `len(names)`, else the names a source gives, else the largest id + 1; every
    label -1 means unlabelled, as in GLUE's test splits); else class names (the sorted distinct
    labels when `names` is empty).

    Args:
        parts: the sources' rows.
        num_labels: the number of classes, 0 = as above.
        names: class names by id (the config's data.labels, or a trained model's classes).

    Returns:
        (ids, or None for unlabelled rows; the class names).

    Raises:
        DataError: a label that fits none of these, naming its source, row and value.
    """
    values = [v for p in parts for v in p.values]
    names = list(names)
    if names and all(str(v) in set(names) for v in values):
        index = {n: i for i, n in enumerate(names)}
        return [index[str(v)] for v in values], names
    ids = [_as_id(v) for v in values]
    if all(i is not None for i in ids):
        if all(i == -1 for i in ids):
            return None, names
        hint = next((p.names for p in parts if p.names), None)
        count = num_labels or len(names) or max(max(ids) + 1, len(hint or ()))
        _check_ids(parts, count, names)
        return ids, names or (hint if hint and len(hint) == count else generic_names(count))
    if not names:  # (with names, a label outside them is refused below, naming them)
        _refuse_label(parts, lambda v: isinstance(v, str) and _FRACTION.fullmatch(v) and _as_id(v) is None,
                      "is a fractional number, not a class id (an integer) or a class name; write class ids as "
                      "integers, or name the classes with data.labels to read these numbers as class names")
    if names:  # some names, some ids
        index = {n: i for i, n in enumerate(names)}
        _refuse_label(parts, lambda v: str(v) not in index and not _id_below(v, len(names)),
                      f"is not one of the class names ({', '.join(names)}) nor a class id 0..{len(names) - 1}")
        return [index[str(v)] if str(v) in index else _as_id(v) for v in values], names
    classes = sorted({str(v) for v in values})
    if num_labels and len(classes) != num_labels:
        raise DataError(f"{parts[0].source}: the labels name {len(classes)} classes ({', '.join(classes[:10])}"
                        f"{', ...' if len(classes) > 10 else ''}), not {num_labels} (model.num_labels); name all "
                        "classes with data.labels")
    index = {n: i for i, n in enumerate(classes)}
    return [index[str(v)] for v in values], classes


def _id_below(value: int | str, count: int) -> bool:
    """`value` is a class id of `count` classes."""
    i = _as_id(value)
    return i is not None and 0 <= i < count


def _check_ids(parts: list[_Part], count: int, names: list[str]) -> None:
    for part in parts:
        lo = 1 if part.one_based else 0
        for row, value in enumerate(part.values, start=part.first_row):
            i = _as_id(value)
            if not 0 <= i < count:
                shown = i + lo if isinstance(value, int) else value
                raise DataError(f"{part.source}: row {row}: label {shown} is out of range {lo}..{count - 1 + lo}"
                                + (f" (classes: {', '.join(names)})" if names else ""))


def _refuse_label(parts: list[_Part], bad, why: str) -> None:
    for part in parts:
        for row, value in enumerate(part.values, start=part.first_row):
            if bad(value):
                raise DataError(f"{part.source}: row {row}: label {value!r} {why}")


# ---------------------------------------------------------------- the Hub


def load_hub_split(data: DataConfig, split: str, num_labels: int = 0, names: Sequence[str] = ()) -> Split:
    """Load a split of data.hub_dataset (a Hub id or a local dataset folder) through `datasets`:
    its data.text_fields joined into the text, data.label_field as the label (a ClassLabel's names
    become the class names)."""
    source = HubSource(data.hub_dataset, data.hub_config, split)
    part = _read_hub(source, Columns.of(data), hint="set data.train (and data.test) to local files")
    return _split([part], str(source), num_labels=num_labels, names=names)


def load_training_split(data: DataConfig, num_labels: int = 0) -> Split:
    """All training rows the config names (before the validation rows are carved out)."""
    if data.train:
        full = read_files(data.train, num_labels=num_labels, names=data.labels, columns=Columns.of(data),
                          split=data.train_split)
    else:
        full = load_hub_split(data, data.train_split, num_labels=num_labels, names=data.labels)
    if full.labels is None:
        if full.columns and data.label_field in full.columns:  # GLUE's test split: every label -1
            raise DataError(f"{full.source}: every '{data.label_field}' label is -1 (unlabelled rows); training "
                            "data needs the rows' classes")
        found = f" (columns: {', '.join(full.columns)})" if full.columns else ""
        raise DataError(f"{full.source}: training data needs a '{data.label_field}' column{found} with the rows' "
                        "classes; name the label column with data.label_field")
    counts = np.bincount(full.labels, minlength=len(full.names or ()))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        only = (full.names or generic_names(int(present[0]) + 1))[present[0]] if len(present) else "none"
        raise DataError(f"{full.source}: the training rows hold one class ('{only}', {len(full)} rows); a classifier "
                        "needs rows of two classes or more: add rows of the other classes")
    return full


def check_val_split(full: Split, val_size: int) -> None:
    """Refuse a class too small for the stratified validation split of `val_size` rows (one row:
    it cannot be in both the training and the validation rows)."""
    if not val_size or full.labels is None:
        return
    counts = np.bincount(full.labels, minlength=len(full.names or ()))
    names = full.names or generic_names(len(counts))
    for i, n in enumerate(counts):
        if n == 1:
            raise DataError(f"{full.source}: class '{names[i]}' has 1 training row, too few for the stratified "
                            f"validation split (data.val_size={val_size}), which needs 2 rows of every class; add "
                            f"rows of '{names[i]}' (2 or more), or remove its row")


def resolve_labels(cfg: Config) -> Config:
    """`cfg` with its classes settled: data.labels (class names by label id) and model.num_labels
    filled in. The config's own (`config.class_names`) when it tells them; else the training
    data's (read for it, once per process: the files, or the Hub split).

    Returns:
        A copy of `cfg` (`cfg` itself when nothing was open).
    """
    names = class_names(cfg)
    if names is None:  # (the rows read here are kept: load_splits does not read the files again)
        names = load_training_split(cfg.data, num_labels=cfg.model.num_labels).names
    if cfg.data.labels == names and cfg.model.num_labels == len(names):
        return cfg
    resolved = copy.deepcopy(cfg)
    resolved.data.labels, resolved.model.num_labels = list(names), len(names)
    validate(resolved)  # what needs the classes (predict.prior's shares)
    return resolved


def load_test_split(data: DataConfig, names: Sequence[str], files: Sequence[str | Path] = ()) -> Split | None:
    """The rows to score: `files`, else the config's test files, else its Hub dataset's test split
    (data.test_split); None when there are none. Labels are read as the classes `names`.

    Args:
        data: the run's data section (columns, test files, Hub dataset).
        names: the model's class names by label id.
        files: other files to score instead.
    """
    if files or data.test:
        return read_files(files or data.test, num_labels=len(names), names=names, columns=Columns.of(data),
                          split=data.test_split or "test")
    if not data.train and data.test_split:
        return load_hub_split(data, data.test_split, num_labels=len(names), names=names)
    return None


def load_splits(cfg: DataConfig, seed: int, num_labels: int = 0) -> tuple[Split, Split, Split | None]:
    """Return (train, val, test) as the config says: val is carved from train, stratified. Test
    labels are read with the training data's class names."""
    full = load_training_split(cfg, num_labels)
    test = load_test_split(cfg, full.names)
    check_val_split(full, cfg.val_size)
    train, val = split_train_val(full, val_size=cfg.val_size, seed=seed)
    if cfg.max_train_rows and cfg.max_train_rows < len(train):
        train, _ = split_train_val(train, val_size=len(train) - cfg.max_train_rows, seed=seed)
    return train, val, test


def split_train_val(full: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Seeded, stratified split of `val_size` rows out of `full`."""
    if val_size == 0:
        return full, Split([], [], full.source, full.names)
    if val_size >= len(full):
        raise DataError(f"data.val_size={val_size} must be smaller than the {len(full)} training rows")
    train_idx, val_idx = stratified_indices(full.labels, size=val_size, seed=seed)
    return full.subset(train_idx), full.subset(val_idx)


def stratified_indices(labels: Sequence[int], size: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of row indices into (the rest, `size` rows), stratified by label where every
    class has two rows or more.

    Args:
        labels: one label per row.
        size: rows to draw, 0 < size < len(labels).
        seed: the random state.

    Returns:
        Both index lists, each sorted.
    """
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and size >= len(counts) else None
    rest, drawn = train_test_split(np.arange(len(labels)), test_size=size, random_state=seed, stratify=stratify)
    return sorted(rest.tolist()), sorted(drawn.tolist())


# ---------------------------------------------------------------- tokenization


def tokenizer_fingerprint(tokenizer) -> str:
    """A key that changes when the tokenizer's vocabulary or settings change."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())[:: max(1, len(tokenizer) // 2000)]).encode())
    h.update(str(len(tokenizer)).encode())
    h.update(str(getattr(tokenizer, "do_lower_case", "")).encode())
    return h.hexdigest()[:16]


def texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def row_ids(texts: Sequence[str]) -> np.ndarray:
    """One identity per row: the first 8 bytes of its text's BLAKE2b hash, as uint64.

    What ties values computed for rows (teacher logits) to the rows themselves, in any order:
    equal texts get equal ids.
    """
    return np.fromiter((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
                        for t in texts), dtype=np.uint64, count=len(texts))


def tokenize(texts: Sequence[str], tokenizer, max_length: int, cache_dir: str | None = None) -> list[np.ndarray]:
    """Token ids per text (truncated, unpadded), cached on disk by tokenizer + length + texts.

    Args:
        texts: the texts.
        tokenizer: a Hugging Face tokenizer.
        max_length: truncation length, special tokens included.
        cache_dir: folder for the cache; None disables it.

    Returns:
        One int32 array of ids per text.
    """
    if not texts:
        return []
    path = None
    if cache_dir:
        key = f"{tokenizer_fingerprint(tokenizer)}-{max_length}-{texts_fingerprint(texts)}"
        path = Path(cache_dir).expanduser() / "tokens" / f"{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return np.split(z["ids"], z["offsets"][1:-1])
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    arrays = [np.asarray(x, dtype=np.int32) for x in ids]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(a) for a in arrays])
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, ids=np.concatenate(arrays) if arrays else np.zeros(0, np.int32), offsets=offsets)
        os.replace(tmp, path)
    return arrays


# ---------------------------------------------------------------- batching


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, ids: list[np.ndarray], labels: list[int] | None):
        self.ids = ids
        self.labels = labels
        self.lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return self.ids[i], (-100 if self.labels is None else self.labels[i]), i


class LengthGroupedSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length: shuffle, sort within mega-chunks, shuffle the batches, then
    swap the batch holding the longest row to the front.

    Deterministic per (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                 chunk_batches: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.chunk = batch_size * chunk_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng(self.seed + self.epoch)
        perm = rng.permutation(n)
        out = []
        for start in range(0, n, self.chunk):
            chunk = perm[start : start + self.chunk]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            out += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        order = rng.permutation(len(out))
        # The batch holding the longest row goes first (as transformers' sampler does): memory
        # peaks at step 1, so a batch size that does not fit fails at once, not hours in.
        if out:
            longest = int(np.argmax([self.lengths[out[i]].max() for i in order]))
            order[[0, longest]] = order[[longest, 0]]
        return [out[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        # Chunks are whole multiples of batch_size, so shuffling never adds a partial batch; the
        # loop asks for this every step, so it must not rebuild the batches.
        return -(-len(self.lengths) // self.batch_size)


def padded_width(longest: int, multiple: int = 1) -> int:
    """A batch's width: its longest row rounded up to a multiple of `multiple`."""
    return -(-longest // multiple) * multiple


def pad_batch(ids: Sequence[np.ndarray], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id arrays into (input_ids, attention_mask), int64, without a per-row loop.

    The width is the longest row rounded up to a multiple of `multiple`.
    """
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    width = padded_width(int(lengths.max()), multiple)
    mask = np.arange(width) < lengths[:, None]
    input_ids = np.full(mask.shape, pad_id, dtype=np.int64)
    input_ids[mask] = np.concatenate(ids)  # row-major order matches the concatenation
    return input_ids, mask.astype(np.int64)


def make_collate(pad_id: int, multiple: int = 1):
    """Collate (ids, label, index) items into a dynamically padded batch (width: a multiple of
    `multiple`)."""

    def collate(items):
        input_ids, mask = pad_batch([x[0] for x in items], pad_id, multiple)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.tensor([x[1] for x in items], dtype=torch.long),
            "index": torch.tensor([x[2] for x in items], dtype=torch.long),
        }

    return collate


def make_loader(ids: list[np.ndarray], labels: list[int] | None, batch_size: int, pad_id: int,
                shuffle: bool, seed: int = 0, pad_to_multiple_of: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader of length-grouped, dynamically padded batches."""
    dataset = TokenizedDataset(ids, labels)
    sampler = LengthGroupedSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed)
    # Each pass over a DataLoader draws a seed from its generator; with the global one, every
    # evaluation and every resume would shift the training run's dropout masks.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                       collate_fn=make_collate(pad_id, pad_to_multiple_of),
                                       generator=torch.Generator().manual_seed(seed))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
