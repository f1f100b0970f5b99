"""Data: every input format read exactly; bad input names file, row and value; the seeded,
stratified validation split; the token cache; length-grouped batches; dynamic padding."""

from __future__ import annotations

import gzip
import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from agnews_lora.config import DataConfig
from agnews_lora.data import (DataError, LengthGroupedSampler, Split, load_splits, make_collate, make_loader,
                              read_file, read_files, split_train_val, tokenize)

from conftest import AG_NEWS, ROBERTA_BASE, needs_shared

ORIGINAL = ('"3","Wall St. Bears Claw Back (Reuters)","Reuters - Short-sellers, Wall Street\'s dwindling\\band '
            'of ultra-cynics, are seeing green again."\n'
            '"1","Iraq  vote","A \\\\ double backslash, and ""quotes"" inside."\n'
            '"4","Space","NASA #39;s probe &lt;b&gt;"\n')
ORIGINAL_TEXTS = ["Wall St. Bears Claw Back (Reuters) Reuters - Short-sellers, Wall Street's dwindling band of "
                  "ultra-cynics, are seeing green again.",
                  'Iraq vote A double backslash, and "quotes" inside.',
                  "Space NASA #39;s probe &lt;b&gt;"]
ORIGINAL_LABELS = [2, 0, 3]  # classes 1..4 -> 0..3
RECORDS = [{"text": "Stocks rally as oil falls", "label": 2}, {"text": "Federer wins in Paris", "label": 1},
           {"text": "New chip doubles speed", "label": 3}]


# ---------------------------------------------------------------- formats


def test_original_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(ORIGINAL, encoding="utf-8")
    split = read_file(path)
    assert split.texts == ORIGINAL_TEXTS and split.labels == ORIGINAL_LABELS and split.source == str(path)


def test_original_csv_gz_and_trailing_blank_lines(tmp_path):
    path = tmp_path / "train.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(ORIGINAL + "\n\n")  # blank lines at the end, as editors leave them
    split = read_file(path)
    assert split.texts == ORIGINAL_TEXTS and split.labels == ORIGINAL_LABELS


def test_hf_style_csv_with_and_without_labels(tmp_path):
    path = tmp_path / "hf.csv"
    path.write_text("label,text\n" + "".join(f'{r["label"]},"{r["text"]}"\n' for r in RECORDS))
    split = read_file(path)
    assert split.texts == [r["text"] for r in RECORDS] and split.labels == [2, 1, 3]  # 0-based kept
    path.write_text("text\n" + "".join(f'"{r["text"]}"\n' for r in RECORDS))
    split = read_file(path)
    assert split.texts == [r["text"] for r in RECORDS] and split.labels is None


def test_jsonl_and_jsonl_gz(tmp_path):
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS) + "\n"
    (tmp_path / "d.jsonl").write_text(lines)
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write(lines)
    for name in ("d.jsonl", "d.jsonl.gz"):
        split = read_file(tmp_path / name)
        assert split.texts == [r["text"] for r in RECORDS] and split.labels == [2, 1, 3]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    split = read_file(tmp_path / "d.parquet")
    assert split.texts == [r["text"] for r in RECORDS] and split.labels == [2, 1, 3]


def test_unlabelled_pickles(tmp_path):
    import datasets

    texts = ["Stocks\\rally  as oil falls", "Federer wins in Paris"]
    with open(tmp_path / "test.pkl", "wb") as fh:
        pickle.dump(datasets.Dataset.from_dict({"text": texts}), fh)  # the competition's format
    with open(tmp_path / "list.pkl", "wb") as fh:
        pickle.dump(texts, fh)
    for name in ("test.pkl", "list.pkl"):
        split = read_file(tmp_path / name)
        assert split.texts == ["Stocks rally as oil falls", "Federer wins in Paris"] and split.labels is None


def test_several_files_concatenate_in_order(tmp_path):
    (tmp_path / "a.csv").write_text(ORIGINAL)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    split = read_files([tmp_path / "a.csv", tmp_path / "b.jsonl"])
    assert split.texts == ORIGINAL_TEXTS + [r["text"] for r in RECORDS]
    assert split.labels == ORIGINAL_LABELS + [2, 1, 3]
    (tmp_path / "c.jsonl").write_text('{"text": "no label here"}\n')
    with pytest.raises(DataError, match="some files have labels and some do not"):
        read_files([tmp_path / "a.csv", tmp_path / "c.jsonl"])


@needs_shared
def test_real_shared_files():
    test = read_file(AG_NEWS / "test.csv.gz")
    assert len(test) == 7600 and Counter(test.labels) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    assert not any("\\" in t for t in test.texts)
    assert test.texts[0].startswith("Fears for T N pension after talks Unions representing workers at Turner")
    hf = read_file(AG_NEWS / "train_extra_text.csv.gz")
    assert len(hf) == 15175 and set(hf.labels) == {0, 1, 2, 3}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, content, message", [
    ("wrong.csv", "label,content\n1,hello\n", r"wrong.csv: no 'text' column \(header: label, content\)"),
    ("ragged.csv", '"3","a","b"\n"1","c"\n', r"ragged.csv: row 2: expected 3 columns .* got 2 columns"),
    ("range.csv", '"3","a","b"\n"5","c","d"\n', r"range.csv: row 2: label 5 is out of range 1..4"),
    ("zero.csv", '"0","a","b"\n', r"zero.csv: row 1: label 0 is out of range: the classes of a headerless CSV"),
    ("notint.csv", '"3","a","b"\n"x2","c","d"\n', r"notint.csv: row 2: label 'x2' is not an integer"),
    ("empty_text.csv", '"3","a","b"\n"2"," ","\\\\"\n', r"empty_text.csv: row 2: text is empty"),
    ("hfrange.csv", "text,label\nhello,1\nworld,4\n", r"hfrange.csv: row 3: label 4 is out of range 0..3"),
    ("hffloat.csv", "text,label\nhello,1.5\n", r"hffloat.csv: row 2: label '1.5' is not one of the class names "
     r"\(World, Sports, Business, Sci/Tech\) nor a class id"),
    ("hfempty.csv", 'text,label\nhello,1\n"",2\n', r"hfempty.csv: row 3: text is empty"),
    ("cols.jsonl", '{"content": "x", "label": 1}\n',
     r"cols.jsonl: no 'text' column \(columns: \['content', 'label'\]\)"),
    ("range.jsonl", '{"text": "x", "label": 0}\n{"text": "y", "label": -1}\n', r"range.jsonl: row 2: label -1"),
    ("broken.jsonl", '{"text": "x", "label": 0}\n{"text": \n', r"broken.jsonl: line 2: not valid JSON"),
    ("empty.csv", "", r"empty.csv: the file is empty"),
    ("data.txt", "hello\n", r"data.txt: unknown file type"),
])
def test_bad_input_names_file_row_and_value(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):  # four named classes, as AG News
        read_file(tmp_path / name, names=("World", "Sports", "Business", "Sci/Tech"))


def test_invalid_utf8_names_the_line_and_bytes(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes('"3","a","b"\n"2","caf\xe9 cr\xe8me","x"\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: line 2: bytes b'\\xe9 cr\\xe8me\"' are not valid UTF-8"):
        read_file(path)


def test_missing_file_and_bad_parquet_and_pickle(tmp_path):
    with pytest.raises(DataError, match=r"nope.csv: no such file"):
        read_file(tmp_path / "nope.csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable parquet file"):
        read_file(tmp_path / "bad.parquet")
    with open(tmp_path / "ints.pkl", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(DataError, match=r"ints.pkl: pickle holds list"):
        read_file(tmp_path / "ints.pkl")


def test_training_data_needs_labels(tmp_path):
    (tmp_path / "u.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"u.jsonl: training data needs a 'label' column"):
        load_splits(DataConfig(train=[str(tmp_path / "u.jsonl")], val_size=0), seed=0)


# ---------------------------------------------------------------- validation split


def _balanced(n_per_class: int, weights=(1, 1, 1, 1)) -> Split:
    labels = [c for c, w in enumerate(weights) for _ in range(n_per_class * w)]
    return Split([f"row {i}" for i in range(len(labels))], labels)


def test_val_split_is_seeded_stratified_and_sized():
    full = _balanced(50, weights=(1, 2, 3, 4))  # 500 rows: 10/20/30/40 %
    train, val = split_train_val(full, val_size=100, seed=7)
    assert len(val) == 100 and len(train) == 400
    assert Counter(val.labels) == {0: 10, 1: 20, 2: 30, 3: 40}  # proportions kept exactly
    assert sorted(train.texts + val.texts) == sorted(full.texts)  # a partition, nothing lost
    again_train, again_val = split_train_val(full, val_size=100, seed=7)
    assert again_val.texts == val.texts and again_train.texts == train.texts
    _, other = split_train_val(full, val_size=100, seed=8)
    assert other.texts != val.texts
    assert len(split_train_val(full, val_size=0, seed=7)[1]) == 0
    with pytest.raises(DataError, match="data.val_size=500 must be smaller than the 500 training rows"):
        split_train_val(full, val_size=500, seed=7)


def test_load_splits_from_local_files(ag_files):
    cfg = DataConfig(train=[str(ag_files["train"])], test=[str(ag_files["test"])], val_size=40, max_train_rows=100)
    train, val, test = load_splits(cfg, seed=3)
    assert (len(train), len(val), len(test)) == (100, 40, 120)
    full = read_file(ag_files["train"])
    expected = Counter(full.labels)
    for label, count in Counter(val.labels).items():
        assert abs(count - 40 * expected[label] / len(full)) <= 1
    assert not set(val.texts) & set(train.texts)
    cfg.test = []
    assert load_splits(cfg, seed=3)[2] is None  # local train without test: no test split


# ---------------------------------------------------------------- tokenization cache


@pytest.fixture(scope="module")
def tokenizer():
    if not ROBERTA_BASE.is_dir():
        pytest.skip("../shared/models/roberta-base (real tokenizer) is absent")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROBERTA_BASE)


def test_tokenize_cache_hit_and_keys(tmp_path, tokenizer, monkeypatch):
    texts = ["Hello world", "Stocks rally as oil falls " * 10]
    first = tokenize(texts, tokenizer, max_length=16, cache_dir=str(tmp_path))
    assert first[0].tolist() == [0, 31414, 232, 2] and len(first[1]) == 16 and first[1][-1] == 2
    files = list((tmp_path / "tokens").glob("*.npz"))
    assert len(files) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer ran although the cache holds these texts")

    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "__call__", no_tokenizing)
        second = tokenize(texts, tokenizer, max_length=16, cache_dir=str(tmp_path))
    assert [a.tolist() for a in second] == [a.tolist() for a in first]
    tokenize(["Hello world!", texts[1]], tokenizer, max_length=16, cache_dir=str(tmp_path))  # changed text
    tokenize(texts, tokenizer, max_length=32, cache_dir=str(tmp_path))  # changed length
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 3
    assert not [p for p in (tmp_path / "tokens").iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------- batching


def test_length_grouped_sampler_covers_each_index_once_deterministically():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=1003)
    sampler = LengthGroupedSampler(lengths, batch_size=10, shuffle=True, seed=5, chunk_batches=20)
    epoch0 = sampler.batches()
    assert len(epoch0) == len(sampler) == 101
    assert sorted(i for b in epoch0 for i in b) == list(range(1003))
    assert sum(len(b) < 10 for b in epoch0) == 1  # only the very last rows form a short batch
    assert LengthGroupedSampler(lengths, batch_size=10, shuffle=True, seed=5, chunk_batches=20).batches() == epoch0
    sampler.set_epoch(1)
    epoch1 = list(iter(sampler))
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(1003))
    sampler.set_epoch(0)
    assert sampler.batches() == epoch0
    assert LengthGroupedSampler(lengths, batch_size=10, shuffle=True, seed=6, chunk_batches=20).batches() != epoch0
    # Length-homogeneous: the spread inside a batch is a small part of a random batch's.
    spread = np.mean([np.ptp(lengths[b]) for b in epoch0])
    random_spread = np.mean([np.ptp(lengths[rng.permutation(1003)[:10]]) for _ in range(100)])
    assert spread < 0.15 * random_spread
    # The longest row comes in the first batch of every epoch (memory peaks at step 1).
    for batches in (epoch0, epoch1):
        assert lengths[batches[0]].max() == lengths.max()
        assert batches[1:] != sorted(batches[1:], key=lambda b: -lengths[b].max())  # the rest stay shuffled


def test_collate_pads_to_a_multiple_when_asked():
    items = [(np.array([0, 5, 6, 2], dtype=np.int32), 3, 10), (np.array([0, 7, 2], dtype=np.int32), 1, 11)]
    batch = make_collate(pad_id=1, multiple=8)(items)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 2] + [1] * 4, [0, 7, 2] + [1] * 5]
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 3]
    # already a multiple: no extra column
    assert make_collate(pad_id=1, multiple=2)(items)["input_ids"].shape == (2, 4)


def test_eval_batches_are_sorted_longest_first():
    lengths = np.array([3, 9, 1, 7, 5])
    sampler = LengthGroupedSampler(lengths, batch_size=2, shuffle=False)
    assert sampler.batches() == [[1, 3], [4, 0], [2]]


def test_collate_pads_dynamically_with_the_pad_id():
    items = [(np.array([0, 5, 6, 2], dtype=np.int32), 3, 10), (np.array([0, 7, 2], dtype=np.int32), 1, 11)]
    batch = make_collate(pad_id=1)(items)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 2], [0, 7, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [3, 1] and batch["index"].tolist() == [10, 11]
    assert batch["input_ids"].dtype == torch.long


def test_loader_pads_each_batch_to_its_own_longest_row():
    ids = [np.arange(n, dtype=np.int32) + 3 for n in (4, 30, 5, 28, 6, 29)]
    loader = make_loader(ids, labels=None, batch_size=2, pad_id=1, shuffle=False)
    batches = list(loader)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 30), (2, 28), (2, 5)]
    assert all((b["labels"] == -100).all() for b in batches)  # unlabelled rows
    seen = {}
    for b in batches:
        for row, i in zip(b["input_ids"], b["index"].tolist()):
            seen[i] = row[row != 1].tolist()
    assert seen == {i: x.tolist() for i, x in enumerate(ids)}
