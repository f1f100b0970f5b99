"""AG News: load (Hub or local files) -> split -> tokenize once (cached) -> length-grouped batches."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from agnews_lora.config import DataConfig
from agnews_lora.errors import DataError
from agnews_lora.hub import ensure_hub_reachable
from agnews_lora.unpickle import ForbiddenGlobal, safe_load

LABEL_NAMES = ["World", "Sports", "Business", "Sci/Tech"]




@dataclass
class Split:
    """Texts with optional integer labels (0-based); labels is None for unlabelled files."""

    texts: list[str]
    labels: list[int] | None
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Split":
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return Split([self.texts[i] for i in idx], labels, self.source)


def clean_text(text: str) -> str:
    # The original CSV marks line breaks with a backslash; make them spaces.
    return " ".join(text.replace("\\", " ").split())


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


def _check_label(path: Path, row: int, value: object, num_labels: int, one_based: bool) -> int:
    lo, hi = (1, num_labels) if one_based else (0, num_labels - 1)
    try:
        label = int(str(value).strip())
        if str(value).strip() != str(label):
            raise ValueError
    except ValueError:
        raise DataError(f"{path}: row {row}: label {value!r} is not an integer in {lo}..{hi}") from None
    if not lo <= label <= hi:
        raise DataError(f"{path}: row {row}: label {label} is out of range {lo}..{hi}")
    return label - 1 if one_based else label


# A lone UTF-16 surrogate: no Unicode character, so no UTF-8 byte sequence. CSV bytes cannot hold one
# (they fail as invalid UTF-8); a JSON escape ("\ud800") or a pickled str can, and the tokenizer
# then fails. Refused like invalid UTF-8, for every format alike.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_text(path: Path, row: int, text: object) -> str:
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


def _csv_rows(path: Path) -> list[list[str]]:
    text = _open_text(path).getvalue()
    previous = csv.field_size_limit(_CSV_FIELD_LIMIT)
    # strict: a quote left open would otherwise swallow the following rows into one field, silently
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
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


def _read_csv(path: Path, num_labels: int) -> Split:
    rows = _csv_rows(path)
    while rows and not rows[-1]:  # blank lines at the end, as editors and spreadsheets leave them
        rows.pop()
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header = [h.strip().lower() for h in rows[0]]
    if "text" in header:
        records = [dict(zip(header, r)) for r in rows[1:]]
        return _from_records(path, records, num_labels, first_row=2)
    # The original AG News format: headerless "class","title","description", classes 1..4.
    texts, labels = [], []
    for i, r in enumerate(rows, start=1):
        if len(r) != 3:
            raise DataError(
                f"{path}: row {i}: expected 3 columns (class,title,description) or a header with "
                f"'text' (and 'label'), got {len(r)} columns: {r[:4]!r}"
            )
        labels.append(_check_label(path, i, r[0], num_labels, one_based=True))
        texts.append(_check_text(path, i, f"{r[1]} {r[2]}"))
    return Split(texts, labels, str(path))


def _from_records(path: Path, records: list[dict], num_labels: int, first_row: int = 1) -> Split:
    if not records:
        raise DataError(f"{path}: no rows")
    keys = set(records[0])
    if "text" not in keys:
        raise DataError(f"{path}: no 'text' column (columns: {sorted(keys)}); name the text column 'text'")
    has_label = "label" in keys
    texts, labels = [], []
    for i, rec in enumerate(records, start=first_row):
        texts.append(_check_text(path, i, rec.get("text")))
        if has_label:
            labels.append(_check_label(path, i, rec.get("label"), num_labels, one_based=False))
    return Split(texts, labels if has_label else None, str(path))


def _read_jsonl(path: Path, num_labels: int) -> Split:
    records = []
    for i, line in enumerate(_open_text(path), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {i}: not valid JSON ({err.msg}): {line[:80]!r}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {i}: expected an object with 'text' (and 'label'), got {rec!r:.80}")
        records.append(rec)
    return _from_records(path, records, num_labels)


def _read_parquet(path: Path, num_labels: int) -> Split:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    return _from_records(path, table.to_pylist(), num_labels)


def _read_pickle(path: Path, num_labels: int) -> Split:
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
    return _from_records(path, _pickle_records(path, obj), num_labels)


def _pickle_records(path: Path, obj: object) -> list[dict]:
    """The supported unpickled shapes as a list of row dicts."""
    if hasattr(obj, "to_pandas"):  # datasets.Dataset
        obj = obj.to_pandas()
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # pandas.DataFrame
        obj = obj.to_dict(orient="records")
    if hasattr(obj, "tolist") and not isinstance(obj, (list, dict)):  # numpy array, pandas Series
        obj = obj.tolist()
    if isinstance(obj, dict) and "text" in obj:
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


def read_file(path: str | Path, num_labels: int = 4) -> Split:
    """Read one local data file.

    Args:
        path: original AG News CSV (headerless class,title,description; 1-based classes),
            or a file with `text` (and optionally `label`, 0-based) columns: CSV, JSONL,
            parquet, or a pickle (the course competition's unlabelled test set) holding a
            datasets.Dataset, a DataFrame, a dict of columns, a list of texts or numpy arrays,
            read by a restricted unpickler that refuses any other global. `.gz` ok for CSV
            and JSONL.
        num_labels: number of classes, for the range check.

    Returns:
        The Split with cleaned texts.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file; name the file itself")
    if not path.is_file():
        raise DataError(f"{path}: no such file; check data.train / data.test or --input")
    kind = _suffixes(path)
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_jsonl,
               ".parquet": _read_parquet, ".pkl": _read_pickle, ".pickle": _read_pickle}
    for ext, reader in readers.items():
        if kind.endswith(ext):
            return reader(path, num_labels)
    raise DataError(f"{path}: unknown file type; use .csv(.gz), .jsonl(.gz), .parquet or .pkl")


def read_files(paths: Sequence[str | Path], num_labels: int = 4) -> Split:
    """Read and concatenate several files (all labelled, or all unlabelled)."""
    parts = [read_file(p, num_labels) for p in paths]
    labelled = {p.labels is not None for p in parts}
    if len(labelled) > 1:
        raise DataError(f"{', '.join(map(str, paths))}: some files have labels and some do not")
    texts = [t for p in parts for t in p.texts]
    labels = None if parts[0].labels is None else [y for p in parts for y in p.labels]
    return Split(texts, labels, ",".join(map(str, paths)))


# ---------------------------------------------------------------- the Hub


def load_hub_split(dataset: str, split: str) -> Split:
    """Load a split of a Hub dataset with `text`/`label` columns (real `datasets` code path)."""
    ensure_hub_reachable(dataset, kind="dataset", hint="set data.train (and data.test) to local files")
    import datasets

    ds = datasets.load_dataset(dataset, split=split)
    return Split([clean_text(t) for t in ds["text"]], list(ds["label"]), f"{dataset}:{split}")


def load_splits(cfg: DataConfig, seed: int, num_labels: int = 4) -> tuple[Split, Split, Split | None]:
    """Return (train, val, test) as the config says: val is carved from train, stratified."""
    if cfg.train:
        full = read_files(cfg.train, num_labels)
        if full.labels is None:
            raise DataError(f"{full.source}: training data needs a 'label' column")
    else:
        full = load_hub_split(cfg.hub_dataset, "train")
    if cfg.test:
        test = read_files(cfg.test, num_labels)
    elif not cfg.train:
        test = load_hub_split(cfg.hub_dataset, "test")
    else:
        test = None
    train, val = split_train_val(full, val_size=cfg.val_size, seed=seed)
    if cfg.max_train_rows and cfg.max_train_rows < len(train):
        train, _ = split_train_val(train, val_size=len(train) - cfg.max_train_rows, seed=seed)
    return train, val, test


def split_train_val(full: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Seeded, stratified split of `val_size` rows out of `full`."""
    if val_size == 0:
        return full, Split([], [], full.source)
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
