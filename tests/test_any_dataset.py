"""Any text-classification dataset (issue 27): the columns, the classes (ids or names, from the
config, the data or a Hub ClassLabel) and their names through training, evaluation, prediction,
export, serving and the model card; a Hub dataset through the real `datasets` code path (a local
dataset folder); runs written before data.labels keep the names they showed."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
import yaml

from agnews_lora import runs
from agnews_lora.cli import main
from agnews_lora.config import ConfigError, class_names, load_config, require_class_count
from agnews_lora.data import Columns, DataError, clean_text, load_splits, read_file, read_files, resolve_labels

from conftest import AG_NEWS, tiny_run_overrides

TOPICS = {1: "world", 2: "sports", 3: "business"}  # AG News classes 1..3 under other names; 4 left out
NAMES = ["business", "sports", "world"]  # what the data tells: the distinct names, sorted


def _topic_file(src: Path, rows: int, dest: Path) -> Path:
    """The first `rows` AG News rows of `src` whose class is 1..3, as JSONL in another shape:
    headline, body, topic (a name)."""
    with gzip.open(src, "rt", newline="", encoding="utf-8") as fh, open(dest, "w", encoding="utf-8") as out:
        for _, (cls, title, desc) in zip(range(rows), csv.reader(fh)):
            if int(cls) in TOPICS:
                out.write(json.dumps({"headline": title, "body": desc, "topic": TOPICS[int(cls)]}) + "\n")
    return dest


@pytest.fixture(scope="module")
def topic_files(tmp_path_factory) -> dict[str, Path]:
    if not AG_NEWS.is_dir():
        pytest.skip("../shared/data/ag_news is absent")
    out = tmp_path_factory.mktemp("topics")
    return {"train": _topic_file(AG_NEWS / "train_extra.csv.gz", 300, out / "train.jsonl"),
            "test": _topic_file(AG_NEWS / "test.csv.gz", 120, out / "test.jsonl")}


COLUMNS = ["data.text_fields=[headline,body]", "data.label_field=topic"]


@pytest.fixture(scope="module")
def topic_run(tiny_model_dir, topic_files, tmp_path_factory) -> Path:
    """`agnews-lora train` on the three-topic JSONL files: no class count or names configured."""
    base = tmp_path_factory.mktemp("topic-run")
    cli("train", *tiny_run_overrides(tiny_model_dir, topic_files, base / "cache", base / "run"), *COLUMNS)
    return base / "run"


# ---------------------------------------------------------------- config


def test_the_default_dataset_names_its_classes_and_others_leave_them_to_the_data(tmp_path):
    cfg = load_config()
    assert cfg.data.labels == [] and cfg.model.num_labels == 0
    assert class_names(cfg) == ["World", "Sports", "Business", "Sci/Tech"] and require_class_count(cfg) == 4
    other = load_config(overrides=[f"data.train={tmp_path / 'x.csv'}"])
    assert class_names(other) is None
    with pytest.raises(ConfigError, match="not known before reading its labels; set data.labels"):
        require_class_count(other)
    named = load_config(overrides=["data.hub_dataset=stanfordnlp/sst2", "data.labels=[negative,positive]"])
    assert class_names(named) == ["negative", "positive"] and require_class_count(named) == 2


@pytest.mark.parametrize("override, message", [
    ("data.labels=[a,a]", "data.labels=.* must be distinct"),
    ("data.labels=[only]", "data.labels=.* must name at least 2 classes"),
    ("data.text_fields=[]", "data.text_fields=.* must name one or more distinct columns"),
    ("data.label_field=text", "data.label_field='text' must name a column that is not one of data.text_fields"),
    ("model.num_labels=1", "model.num_labels=1 must be >= 2"),
])
def test_bad_data_keys_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_num_labels_must_agree_with_the_names():
    with pytest.raises(ConfigError, match=r"model.num_labels=3 must equal the number of data.labels names"):
        load_config(overrides=["model.num_labels=3", "data.labels=[neg,pos]"])


# ---------------------------------------------------------------- reading


def test_string_labels_custom_columns_and_configured_order(topic_files):
    columns = Columns(("headline", "body"), "topic")
    split = read_file(topic_files["train"], columns=columns)
    assert split.names == NAMES and set(split.labels) == {0, 1, 2}
    first = json.loads(topic_files["train"].read_text().splitlines()[0])
    assert split.texts[0] == clean_text(f"{first['headline']} {first['body']}")
    assert split.labels[0] == NAMES.index(first["topic"])
    ordered = read_file(topic_files["train"], names=["world", "sports", "business"], columns=columns)
    assert ordered.names == ["world", "sports", "business"]
    assert [ordered.names[i] for i in ordered.labels] == [split.names[i] for i in split.labels]


def test_a_label_outside_the_classes_names_file_and_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n')
    with pytest.raises(DataError, match=r"t.jsonl: row 2: label 'meh' is not one of the class names \(neg, pos\)"):
        read_file(path, names=["neg", "pos"])
    with pytest.raises(DataError, match=r"the labels name 2 classes \(meh, pos\), not 3"):
        read_file(path, num_labels=3)
    mixed = tmp_path / "mixed.jsonl"  # names and ids in one file: each read as what it is
    mixed.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": 0}\n')
    assert read_file(mixed, names=["neg", "pos"]).labels == [1, 0]
    mixed.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": 2}\n')
    with pytest.raises(DataError, match=r"row 2: label 2 is not one of the class names \(neg, pos\) nor a class id 0..1"):
        read_file(mixed, names=["neg", "pos"])


def test_names_that_look_like_ids_and_glue_style_unlabelled_rows(tmp_path):
    stars = tmp_path / "stars.csv"
    stars.write_text("text,label\ngreat,5\nawful,1\nfine,3\n")
    assert read_file(stars).labels == [5, 1, 3]  # integers are class ids (0-based) ...
    split = read_file(stars, names=["1", "2", "3", "4", "5"])  # ... unless the classes are named so
    assert split.labels == [4, 0, 2] and split.names == ["1", "2", "3", "4", "5"]
    hidden = tmp_path / "hidden.jsonl"
    hidden.write_text('{"text": "a", "label": -1}\n{"text": "b", "label": -1}\n')
    assert read_file(hidden, names=["neg", "pos"]).labels is None  # GLUE's test split: no labels


def test_headerless_csv_of_any_width_and_class_count(tmp_path):
    yelp = tmp_path / "yelp.csv"  # Zhang et al.'s polarity format: class,text
    yelp.write_text('"2","good food"\n"1","cold and late"\n')
    split = read_file(yelp)
    assert split.labels == [1, 0] and split.names == ["class 0", "class 1"]
    dbpedia = tmp_path / "dbpedia.csv"  # class,title,content with 14 classes: not AG News
    dbpedia.write_text('"14","A book","about things"\n"1","A firm","makes things"\n')
    assert read_file(dbpedia).names == [f"class {i}" for i in range(14)]
    ag = read_file(AG_NEWS / "test.csv.gz") if AG_NEWS.is_dir() else None
    if ag is not None:
        assert ag.names == ["World", "Sports", "Business", "Sci/Tech"]


def test_a_file_in_the_plain_text_shape_serves_a_run_with_other_columns(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "Stocks rally", "label": "business"}\n')
    split = read_files([plain], names=NAMES, columns=Columns(("headline", "body"), "topic"))
    assert split.texts == ["Stocks rally"] and split.labels == [0]
    half = tmp_path / "half.jsonl"  # one of the two configured columns: a mistake, not the plain shape
    half.write_text('{"headline": "Stocks", "text": "rally", "topic": "business"}\n')
    with pytest.raises(DataError, match=r"half.jsonl: no 'headline', 'body' column"):
        read_files([half], columns=Columns(("headline", "body"), "topic"))


def test_hub_dataset_through_datasets_with_classlabel_names(tmp_path, monkeypatch):
    """A dataset folder `datasets.load_dataset` reads (parquet with the ClassLabel feature saved in
    it), as a Hub dataset is read: the names come from the ClassLabel; a test split whose labels are
    all -1 is unlabelled."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    folder = tmp_path / "sst2-like"
    (folder / "data").mkdir(parents=True)
    rows = {"sentence": [f"{w} film number {i}" for i, w in enumerate(["good", "bad"] * 20)], "label": [1, 0] * 20}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    datasets.Dataset.from_dict({"sentence": ["a film", "another"], "label": [-1, -1]}, features=features) \
        .to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    cfg = load_config(overrides=[f"data.hub_dataset={folder}", "data.text_fields=[sentence]", "data.val_size=4"])
    resolved = resolve_labels(cfg)
    assert resolved.data.labels == ["negative", "positive"] and resolved.model.num_labels == 2
    assert cfg.data.labels == []  # a copy: the config given is left as it was
    train, val, test = load_splits(resolved.data, seed=0)
    assert (len(train), len(val)) == (36, 4) and train.names == ["negative", "positive"]
    assert sorted(train.texts + val.texts) == sorted(rows["sentence"])
    assert [train.names[i] for i in train.labels] == ["positive" if t.startswith("good") else "negative"
                                                      for t in train.texts]
    assert test is not None and test.labels is None and len(test) == 2


# ---------------------------------------------------------------- the run end to end


def test_train_settles_the_classes_into_the_run(topic_run):
    cfg = runs.read_config(topic_run)
    assert cfg.data.labels == NAMES and cfg.model.num_labels == 3
    saved = yaml.safe_load((topic_run / runs.CONFIG).read_text())
    assert saved["data"]["labels"] == NAMES and saved["model"]["num_labels"] == 3
    test = runs.read_json(topic_run / runs.TEST_METRICS)
    assert list(test["per_class"]) == NAMES and len(test["confusion"]) == 3
    assert "business" in (topic_run / runs.REPORT).read_text()


def cli(*args) -> None:
    main([str(a) for a in args])


def test_evaluate_and_predict_speak_the_run_s_class_names(topic_run, topic_files, tmp_path, capsys):
    cli("evaluate", topic_run, "--output", tmp_path / "eval.json")
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)
    cli("predict", topic_run, "--input", topic_files["test"], "--output", tmp_path / "p.csv", "--names", "--probs")
    assert "accuracy" in capsys.readouterr().out  # the file's string labels read with the run's classes
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["Label"] for r in rows} <= set(NAMES)
    header = (tmp_path / "p.probs.csv").read_text().splitlines()[0]
    assert header == "ID," + ",".join(f"p_{n}" for n in NAMES)
    cli("predict", topic_run, "--input", topic_files["test"], "--output", tmp_path / "ids.csv")
    with open(tmp_path / "ids.csv", newline="") as fh:
        ids = [r["Label"] for r in csv.DictReader(fh)]
    assert [NAMES[int(i)] for i in ids] == [r["Label"] for r in rows]  # ids by default, the same classes


def test_exports_and_the_service_name_the_classes(topic_run, tmp_path):
    from agnews_lora.export import export
    from agnews_lora.predict import Classifier

    out = export(topic_run, "merged", output=tmp_path / "merged", parity_rows=8)
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(NAMES)}
    assert Classifier.load(out).label_names == NAMES
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from agnews_lora.serve import create_app

    with TestClient(create_app(Classifier.load(topic_run))) as client:
        info = client.get("/info").json()
        body = client.post("/predict", json={"texts": ["Federer wins in Paris"]}).json()
    assert info["labels"] == NAMES and body["label_names"] == NAMES and body["names"][0] in NAMES


def test_the_card_names_the_dataset_and_its_classes(topic_run):
    card = (topic_run / runs.BEST / "README.md").read_text()
    assert "classifies texts into 3 classes (business, sports, world)" in card
    assert "trained on train.jsonl" in card and "ag-news" not in card and "AG News" not in card


def test_budget_counts_the_head_of_the_data_s_classes(tiny_model_dir, topic_files, capsys):
    def total(*extra: str) -> int:
        cli("budget", "--json", f"model.name={tiny_model_dir}", "lora.r=4", *extra)
        return json.loads(capsys.readouterr().out)["total"]

    three = total(f"data.train={topic_files['train']}", *COLUMNS)
    four = total()  # the default dataset: AG News' four classes, without reading it
    assert four - three == 32 + 1  # one output row of the head (hidden 32 + bias) per class


# ---------------------------------------------------------------- older runs


@pytest.mark.parametrize("num_labels, data, names", [
    (4, {"train": ["x.csv"]}, ["World", "Sports", "Business", "Sci/Tech"]),
    (3, {"train": ["x.csv"]}, ["class 0", "class 1", "class 2"]),
    (4, {}, ["World", "Sports", "Business", "Sci/Tech"]),
])
def test_a_run_from_before_data_labels_keeps_the_names_it_showed(tmp_path, num_labels, data, names):
    (tmp_path / runs.CONFIG).write_text(yaml.safe_dump({"model": {"num_labels": num_labels}, "data": data}))
    cfg = runs.read_config(tmp_path)
    assert cfg.data.labels == names and cfg.model.num_labels == num_labels


def test_resuming_a_run_from_before_the_new_data_keys(tiny_model_dir, ag_files, tmp_path):
    """A run whose config.yaml has none of the data keys this version added, nor data.labels,
    resumes under the same settings (the keys it lacks were at their defaults)."""
    from agnews_lora.train import train

    out = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_model_dir, ag_files, tmp_path / "cache", out)
    train(load_config(overrides=overrides))
    saved = yaml.safe_load((out / runs.CONFIG).read_text())
    for key in ("labels", "text_fields", "label_field", "hub_config", "train_split", "test_split"):
        saved["data"].pop(key)
    saved["model"]["num_labels"] = 4
    (out / runs.CONFIG).write_text(yaml.safe_dump(saved, sort_keys=False))
    (out / runs.SUMMARY).unlink()
    train(load_config(overrides=[*overrides, "train.resume=true", "train.max_steps=8"]))
    assert runs.read_config(out).data.labels == ["World", "Sports", "Business", "Sci/Tech"]


def test_gz_jsonl_with_names_reads_like_the_plain_file(topic_files, tmp_path):
    gz = tmp_path / "train.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(topic_files["train"].read_text())
    columns = Columns(("headline", "body"), "topic")
    assert read_file(gz, columns=columns).labels == read_file(topic_files["train"], columns=columns).labels


# ---------------------------------------------------------------- bad data: one line before any training


def _train_refused(capsys, tiny_model_dir, tmp_path, train: Path, *extra: str) -> str:
    """`agnews-lora train` on `train`: the one-line error it exits with (2), no checkpoint written."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        cli("train", f"model.name={tiny_model_dir}", f"data.train={train}", "data.val_size=4",
            f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.progress=false", "lora.r=4",
            f"out_dir={out}", *extra)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not (out / runs.BEST).exists()
    return err


def _jsonl(path: Path, labels: list) -> Path:
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    return path


def _parquet(path: Path, columns: dict) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_training_rows_of_one_class_are_refused(tiny_model_dir, tmp_path, capsys):
    err = _train_refused(capsys, tiny_model_dir, tmp_path, _jsonl(tmp_path / "one.jsonl", ["pos"] * 20))
    assert "one.jsonl: the training rows hold one class ('pos', 20 rows)" in err and "add rows of the other" in err
    named = _train_refused(capsys, tiny_model_dir, tmp_path, _jsonl(tmp_path / "ids.jsonl", [1] * 20),
                           "data.labels=[neg,pos]")  # two classes named, the rows hold one
    assert "ids.jsonl: the training rows hold one class ('pos', 20 rows)" in named


def test_a_class_too_small_for_the_validation_split_is_named(tiny_model_dir, tmp_path, capsys):
    path = _jsonl(tmp_path / "small.jsonl", ["pos"] * 10 + ["neg"] * 9 + ["rare"])
    err = _train_refused(capsys, tiny_model_dir, tmp_path, path)
    assert ("small.jsonl: class 'rare' has 1 training row, too few for the stratified validation split "
            "(data.val_size=4)") in err
    assert "add rows of 'rare' (2 or more), or remove its row" in err
    path.write_text(path.read_text() + json.dumps({"text": "one more", "label": "rare"}) + "\n")
    train, val, _ = load_splits(resolve_labels(load_config(overrides=[f"data.train={path}", "data.val_size=4"])).data,
                                seed=0)  # two rows of it: it splits
    assert (len(train), len(val)) == (17, 4) and "rare" in {train.names[i] for i in train.labels}


@pytest.mark.parametrize("labels, message", [
    ([1.5, 0], r"row 1: label 1.5 is a fractional number, not a class id \(an integer\) or a class name"),
    (["1.5", "0"], r"row 1: label '1.5' is a fractional number.*name the classes with data.labels"),
    ([None, 0], r"row 1: label \(column 'label'\) is missing or empty; fill it in or remove the row"),
    (["pos", " "], r"row 2: label \(column 'label'\) is missing or empty"),
    ([0, float("nan")], r"row 2: label \(column 'label'\) is missing or empty"),
])
def test_fractional_and_missing_labels_are_refused(tmp_path, labels, message):
    with pytest.raises(DataError, match=r"t.jsonl: " + message):
        read_file(_jsonl(tmp_path / "t.jsonl", labels))
    with pytest.raises(DataError, match=r"t.parquet: " + message):
        read_file(_parquet(tmp_path / "t.parquet", {"text": ["a", "b"], "label": labels}))


def test_integral_floats_are_class_ids_and_a_row_without_its_label_is_an_error(tmp_path):
    assert read_file(_parquet(tmp_path / "f.parquet", {"text": ["a", "b"], "label": [1.0, 0.0]})).labels == [1, 0]
    written = tmp_path / "pandas.csv"  # an id column pandas wrote as floats
    written.write_text("text,label\na,1.0\nb,0.0\n")
    split = read_file(written)
    assert split.labels == [1, 0] and split.names == ["class 0", "class 1"]
    first = tmp_path / "first.jsonl"  # the first row's label missing: not an unlabelled file
    first.write_text('{"text": "a"}\n{"text": "b", "label": 0}\n')
    with pytest.raises(DataError, match=r"first.jsonl: row 1: label \(column 'label'\) is missing or empty"):
        read_file(first)
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\na,1\nb,\n")
    with pytest.raises(DataError, match=r"empty.csv: row 3: label \(column 'label'\) is missing or empty"):
        read_file(empty)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_missing_text_or_label_column_lists_the_columns_found(tmp_path, fmt):
    def write(name: str, cols: dict) -> Path:
        path = tmp_path / f"{name}.{fmt}"
        rows = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
        if fmt == "parquet":
            return _parquet(path, cols)
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            path.write_text(",".join(cols) + "\n" + "".join(",".join(map(str, r.values())) + "\n" for r in rows))
        return path

    no_label = write("nolabel", {"text": ["a", "b"], "lab": [0, 1]})
    cfg = load_config(overrides=[f"data.train={no_label}", "data.label_field=topic"])
    with pytest.raises(DataError, match=rf"nolabel.{fmt}: training data needs a 'topic' column \(columns: lab, text\)"
                                        r".*data.label_field"):
        resolve_labels(cfg)
    no_text = write("notext", {"body": ["a", "b"], "label": [0, 1]})
    with pytest.raises(DataError, match=rf"notext.{fmt}: no 'headline' column \((columns|header): .*body.*label"
                                        r".*data.text_fields"):
        read_file(no_text, columns=Columns(("headline",), "label"))


def test_a_test_or_predict_label_training_never_saw_is_refused(topic_run, topic_files, tmp_path, capsys):
    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text(json.dumps({"headline": "Rain", "body": "all week", "topic": "weather"}) + "\n")
    cfg = load_config(overrides=[f"data.train={topic_files['train']}", f"data.test={unseen}", "data.val_size=4",
                                 *COLUMNS])
    with pytest.raises(DataError, match=r"unseen.jsonl: row 1: label 'weather' is not one of the class names "
                                        r"\(business, sports, world\)"):
        load_splits(resolve_labels(cfg).data, seed=0)
    with pytest.raises(SystemExit) as exit_:
        cli("predict", topic_run, "--input", unseen, "--output", tmp_path / "p.csv")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "unseen.jsonl: row 1: label 'weather' is not one of the class names" in err
    assert not (tmp_path / "p.csv").exists()


# ---------------------------------------------------------------- three regrouped classes, parquet, end to end

REGROUPED = {1: "world", 2: "sports", 3: "economy", 4: "economy"}  # Business and Sci/Tech as one class
THREE = ["economy", "sports", "world"]


def _regrouped_parquet(src: Path, rows: int, dest: Path) -> Path:
    """The first `rows` AG News rows of `src`, all four classes regrouped into three named ones, as
    parquet with headline, body and topic columns."""
    with gzip.open(src, "rt", newline="", encoding="utf-8") as fh:
        records = [(title, desc, REGROUPED[int(cls)]) for _, (cls, title, desc) in zip(range(rows), csv.reader(fh))]
    headline, body, topic = map(list, zip(*records))
    return _parquet(dest, {"headline": headline, "body": body, "topic": topic})


def test_three_regrouped_classes_from_parquet_train_evaluate_predict_export_and_serve(tiny_model_dir, tmp_path,
                                                                                      capsys):
    if not AG_NEWS.is_dir():
        pytest.skip("../shared/data/ag_news is absent")
    files = {"train": _regrouped_parquet(AG_NEWS / "train_extra.csv.gz", 300, tmp_path / "train.parquet"),
             "test": _regrouped_parquet(AG_NEWS / "test.csv.gz", 120, tmp_path / "test.parquet")}
    run = tmp_path / "run"
    cli("train", *tiny_run_overrides(tiny_model_dir, files, tmp_path / "cache", run), *COLUMNS)
    cfg = runs.read_config(run)
    assert cfg.data.labels == THREE and cfg.model.num_labels == 3
    assert list(runs.read_json(run / runs.TEST_METRICS)["per_class"]) == THREE

    cli("evaluate", run, "--output", tmp_path / "eval.json")
    out = capsys.readouterr().out
    assert all(name in out for name in THREE), out
    cli("predict", run, "--input", files["test"], "--output", tmp_path / "p.csv", "--names", "--probs")
    with open(tmp_path / "p.csv", newline="") as fh:
        labels = [r["Label"] for r in csv.DictReader(fh)]
    assert len(labels) == 120 and set(labels) <= set(THREE)
    with open(tmp_path / "p.probs.csv", newline="") as fh:
        probs = list(csv.DictReader(fh))
    assert list(probs[0]) == ["ID"] + [f"p_{n}" for n in THREE] and len(probs) == 120

    from agnews_lora.export import export
    from agnews_lora.predict import Classifier

    merged = export(run, "merged", output=tmp_path / "merged", parity_rows=8)
    assert json.loads((merged / "config.json").read_text())["id2label"] == {"0": "economy", "1": "sports",
                                                                           "2": "world"}
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from agnews_lora.serve import create_app

    with TestClient(create_app(Classifier.load(run))) as client:
        info = client.get("/info").json()
        body = client.post("/predict", json={"texts": ["Federer wins in Paris", "Oil prices rise"]}).json()
    assert info["labels"] == THREE and body["label_names"] == THREE
    assert len(body["names"]) == 2 and set(body["names"]) <= set(THREE)


# ---------------------------------------------------------------- a folder datasets.Dataset.save_to_disk wrote


def test_a_saved_dataset_folder_serves_as_train_and_test_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    rows = {"sentence": [f"{w} film number {i}" for i, w in enumerate(["good", "bad"] * 10)], "label": [1, 0] * 10}
    train = datasets.Dataset.from_dict(rows, features=features)
    test = datasets.Dataset.from_dict({"sentence": ["a good film", "a bad film"], "label": [1, 0]}, features=features)
    train.save_to_disk(str(tmp_path / "train"))
    test.save_to_disk(str(tmp_path / "test"))
    cfg = resolve_labels(load_config(overrides=[f"data.train={tmp_path / 'train'}", f"data.test={tmp_path / 'test'}",
                                                "data.text_fields=[sentence]", "data.val_size=4"]))
    assert cfg.data.labels == ["negative", "positive"] and cfg.model.num_labels == 2  # the ClassLabel's names
    tr, val, te = load_splits(cfg.data, seed=0)
    assert (len(tr), len(val)) == (16, 4) and sorted(tr.texts + val.texts) == sorted(rows["sentence"])
    assert [tr.names[i] for i in tr.labels] == ["positive" if t.startswith("good") else "negative" for t in tr.texts]
    assert te.texts == ["a good film", "a bad film"] and te.labels == [1, 0]
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataError, match=r"both: a saved DatasetDict \(splits: test, train\); name one split's folder"):
        read_file(tmp_path / "both", columns=Columns(("sentence",)))
    with pytest.raises(DataError, match=r"train: no 'text' column \(columns: \['label', 'sentence'\]\)"):
        read_file(tmp_path / "train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: is a folder, not a data file"):
        read_file(tmp_path / "plain")


# ---------------------------------------------------------------- more sources: TSV, JSON arrays, hf:NAME


def _tsv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, delimiter="\t").writerows([("headline", "summary", "kind"), *rows])
    return path


def test_tsv_and_json_arrays_with_any_column_names(tmp_path):
    rows = [("Stocks fall, again", "Markets, in brief", "business"), ("Team wins", "A final", "sports")]
    tsv = read_file(_tsv(tmp_path / "a.tsv", rows), columns=Columns(("headline", "summary"), "kind"))
    assert tsv.texts == ["Stocks fall, again Markets, in brief", "Team wins A final"]  # commas stay in the text
    assert tsv.names == ["business", "sports"] and tsv.labels == [0, 1]
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"headline": h, "summary": s, "kind": k} for h, s, k in rows]), encoding="utf-8")
    assert read_file(array, columns=Columns(("headline", "summary"), "kind")) == tsv.__class__(
        tsv.texts, tsv.labels, str(array), tsv.names, ["headline", "kind", "summary"])
    with gzip.open(tmp_path / "a.tsv.gz", "wt", encoding="utf-8", newline="") as fh:
        fh.write((tmp_path / "a.tsv").read_text(encoding="utf-8"))
    assert read_file(tmp_path / "a.tsv.gz", columns=Columns(("headline", "summary"), "kind")).texts == tsv.texts
    weird = tmp_path / "rows [1] *.jsonl"  # glob characters in the name mean themselves
    weird.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n', encoding="utf-8")
    assert read_file(weird).texts == ["a", "b"]


@pytest.mark.parametrize("content, message", [
    ('[{"text": "a", "label": 1}, 3]', r"a.json: item 2: expected an object"),
    ('[{"text": "a", "label": 1},\n {"text": }]', r"a.json: line 2: not valid JSON"),
    ('{"text": "a", "label": 1}\n{"text": "b\\ud800", "label": 0}\n', r"a.json: row 2: text holds a lone surrogate"),
    ("", r"a.json: no rows"),
])
def test_json_the_loader_cannot_read_is_named_by_line(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_file(path)


def test_a_broken_tsv_row_is_named_not_merged(tmp_path):
    path = tmp_path / "b.tsv"
    path.write_text('text\tlabel\n"opens here\t1\nsecond\t0\nthird" and more\t1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b.tsv: line 2: a quoted field opens here and is not closed on its line"):
        read_file(path)


def _dataset_folder(root: Path) -> Path:
    """A dataset folder as `datasets.load_dataset` reads a Hub repository's files: train and test
    CSVs with string labels under other column names."""
    folder = root / "reviews"
    folder.mkdir()
    kinds = ["good", "bad", "odd"]
    with open(folder / "train.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("body", "verdict"), *((f"a {kinds[i % 3]} film, number {i}", kinds[i % 3])
                                                         for i in range(30))])
    with open(folder / "test.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("body", "verdict"), *((f"{k} again", k) for k in kinds)])
    return folder


@pytest.mark.parametrize("text, expected", [
    ("hf:fancyzhx/ag_news", ("fancyzhx/ag_news", "", "train")),
    ("hf:nyu-mll/glue:sst2", ("nyu-mll/glue", "sst2", "train")),
    ("hf:nyu-mll/glue:sst2:validation[:50%]", ("nyu-mll/glue", "sst2", "validation[:50%]")),
    ("hf:fancyzhx/ag_news::test[10:20]", ("fancyzhx/ag_news", "", "test[10:20]")),
])
def test_hub_sources_parse_name_config_and_split(text, expected):
    from agnews_lora.data import HubSource

    source = HubSource.parse(text, "train")
    assert (source.name, source.config, source.split) == expected
    assert HubSource.parse(str(source), "test") == source  # the form messages show reads back the same


@pytest.mark.parametrize("text", ["hf:", "hf::sst2", "hf:fancyzhx/ag_news:train[:90%]"])
def test_a_malformed_hub_source_shows_the_forms(text):
    with pytest.raises(DataError, match=r"write a Hub dataset as hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT"):
        read_file(text)


def test_an_unreachable_hub_source_is_one_clear_line(monkeypatch):
    from agnews_lora.errors import HubUnreachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachable, match=r"cannot download dataset 'someone/tickets'.*name local files"):
        read_files(["hf:someone/tickets::train[:90%]"])


def test_hub_sources_with_split_slices_in_train_test_and_predict(tiny_model_dir, tmp_path, capsys):
    """hf: sources in data.train and data.test (the split slices carve train and dev rows from one
    split) and in predict --input, through the real `datasets` path (a local dataset folder)."""
    folder = _dataset_folder(tmp_path)
    source = f"hf:{folder}"
    cols = Columns(("body",), "verdict")
    head, tail = (read_files([f"{source}::train[:80%]"], columns=cols), read_files([f"{source}::train[80%:]"],
                                                                                     columns=cols))
    assert (len(head), len(tail)) == (24, 6) and set(head.texts).isdisjoint(tail.texts)
    with pytest.raises(DataError, match=r"reviews::nope: .*nope"):  # datasets names the splits there are
        read_files([f"{source}::nope"], columns=cols)
    files = {"train": f"{source}::train[:80%]", "test": f"{source}::train[80%:]"}
    cli("train", *tiny_run_overrides(tiny_model_dir, files, tmp_path / "cache", tmp_path / "run"),
        "data.text_fields=[body]", "data.label_field=verdict", "data.val_size=6")
    run = runs.RunFolder(tmp_path / "run")
    assert run.config().data.labels == ["bad", "good", "odd"]
    cli("predict", tmp_path / "run", "--input", source, "--output", tmp_path / "p.csv", "--names")
    lines = (tmp_path / "p.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "ID,Label" and len(lines) == 4  # its default split for --input: test (3 rows)
    assert {line.split(",")[1] for line in lines[1:]} <= {"bad", "good", "odd"}


def test_settling_the_classes_then_loading_the_splits_reads_each_file_once(tmp_path, monkeypatch):
    """resolve_labels then load_splits (what train does) reads the training file once; a file
    changed since is read again."""
    import os

    from agnews_lora import data

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": ["a", "b"][i % 2]}) + "\n" for i in range(20)),
                    encoding="utf-8")
    reads = []
    real = data._read_part
    monkeypatch.setattr(data, "_read_part", lambda p, *a: reads.append(str(p)) or real(p, *a))
    cfg = resolve_labels(load_config(overrides=[f"data.train={path}", "data.val_size=4"]))
    train, val, _ = load_splits(cfg.data, seed=0)
    assert cfg.data.labels == ["a", "b"] and len(train) + len(val) == 20 and reads == [str(path)]
    path.write_text(path.read_text(encoding="utf-8").replace('"b"', '"c"'), encoding="utf-8")
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    assert read_file(path).names == ["a", "c"] and len(reads) == 2
