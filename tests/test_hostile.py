"""Hostile and careless input (issue 15): no code execution, no silent wrong answers, no lost work.

One test (or a parametrized group) per item of the attack matrix; item numbers in the names.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from agnews_lora.errors import RunDamaged, RunLocked
from agnews_lora import runs
from agnews_lora.cli import main
from agnews_lora.config import ConfigError, load_config
from agnews_lora.data import DataError, read_file
from agnews_lora.predict import Classifier
from agnews_lora.serve import Limits, MicroBatcher, create_app
from agnews_lora.train import train

SRC = Path(__file__).resolve().parents[1] / "src"


class _Evil:
    """Unpickling calls os.system: the attack of item 1."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir, ag_files) -> Path:
    out = tmp_path_factory.mktemp("hostile")
    return train(load_config(overrides=[
        f"model.name={tiny_model_dir}", f"data.train={ag_files['train']}", f"data.test={ag_files['test']}",
        "data.val_size=40", "data.max_length=64", f"data.cache_dir={out / 'cache'}", "train.max_steps=4",
        "train.batch_size=8", "train.eval_every=2", "train.log_every=1", "train.precision=fp32",
        "train.progress=false", "lora.r=4", f"out_dir={out / 'run'}"]))


@pytest.fixture(scope="module")
def clf(run) -> Classifier:
    return Classifier.load(run, precision="fp32")


def _copy_unfinished(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    (dest / "summary.json").unlink()
    return dest


def _resume_cfg(run: Path, *extra: str):
    cfg = runs.read_config(run)
    cfg.out_dir, cfg.train.resume = str(run), True
    for item in extra:
        key, value = item.split("=")
        setattr(cfg.train, key.split(".")[1], int(value))
    return cfg


# ---------------------------------------------------------------- security


def test_01_malicious_pickle_does_not_run_and_names_the_global(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(DataError, match=r"refused to unpickle: it references (posix|os)\.system"):
        read_file(evil)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "nowhere", "--data", str(evil)])
    assert exit_info.value.code == 2 and not marker.exists()


@pytest.mark.parametrize("shape", ["dataset", "dataset_labelled", "dataframe", "dict", "list", "numpy", "dict_numpy"])
def test_01_every_supported_pickle_shape_loads(tmp_path, shape):
    import datasets
    import pandas as pd

    texts, labels = ["Stocks rally as oil falls", "Federer wins in Paris"], [2, 1]
    obj = {"dataset": lambda: datasets.Dataset.from_dict({"text": texts}),
           "dataset_labelled": lambda: datasets.Dataset.from_dict({"text": texts, "label": labels}),
           "dataframe": lambda: pd.DataFrame({"text": texts, "label": labels}),
           "dict": lambda: {"text": texts, "label": labels}, "list": lambda: texts,
           "numpy": lambda: np.array(texts),
           "dict_numpy": lambda: {"text": np.array(texts, dtype=object), "label": np.array(labels)}}[shape]()
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"{shape}-{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        split = read_file(path)
        assert split.texts == texts
        assert split.labels == (labels if "label" in shape or shape in ("dataframe", "dict", "dict_numpy") else None)


def test_02_crafted_optimizer_state_does_not_run_on_resume(run, tmp_path):
    copy = _copy_unfinished(run, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Evil(marker)}, copy / "last" / "optim.pt")
    with pytest.raises(RunDamaged, match="the checkpoint is damaged or unsafe"):
        train(_resume_cfg(copy))
    assert not marker.exists()


def test_02_every_torch_load_is_weights_only():
    sources = [p.read_text() for p in SRC.rglob("*.py")]
    calls = [line for text in sources for line in text.splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for line in calls)


# ---------------------------------------------------------------- the HTTP service


def _post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body at once (one thread each) through the app with its lifespan running."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    def post(body: dict) -> httpx.Response:
        # Encoded here: json.dumps writes a lone surrogate as the escape "\\ud800" (valid JSON),
        # where httpx's own encoder would refuse to send it.
        return client.post("/predict", content=json.dumps(body, separators=(",", ":")),
                           headers={"content-type": "application/json"})

    with TestClient(app) as client, ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_03_a_lone_surrogate_fails_only_its_own_request(clf):
    app = create_app(clf, max_wait_ms=50)
    bodies = [{"texts": ["Stocks rally as oil falls"]}] * 10 + [{"texts": ["ok", "\ud800 x"]}]
    responses = _post_all(app, bodies)
    assert [r.status_code for r in responses[:10]] == [200] * 10
    bad = responses[10]
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "texts", 1]


@pytest.mark.parametrize("text", ["", "   ", "\\ \t"])
def test_03_empty_texts_are_refused_as_by_the_cli(clf, text):
    response = _post_all(create_app(clf), [{"texts": ["fine", text]}])[0]
    assert response.status_code == 422 and "texts[1] is empty" in response.json()["detail"][0]["msg"]


def test_03_a_failing_shared_batch_is_retried_request_by_request():
    def predict(texts):
        if "poison" in texts:
            raise RuntimeError("tokenizer failed")
        return np.array([[float(len(t))] for t in texts])

    async def go():
        batcher = MicroBatcher(predict, max_batch=64, max_wait_ms=50)
        results = await asyncio.gather(batcher.submit(["ab"]), batcher.submit(["poison"]), batcher.submit(["abc"]),
                                       return_exceptions=True)
        await batcher.close()
        return results

    good1, bad, good2 = asyncio.run(go())
    assert good1.tolist() == [[2.0]] and good2.tolist() == [[3.0]] and isinstance(bad, RuntimeError)


def test_04_a_huge_list_is_answered_at_once_and_briefly(clf):
    app = create_app(clf, limits=Limits(max_body_bytes=2_000_000))
    start = time.perf_counter()
    response = _post_all(app, [{"texts": [1] * 330_000}])[0]  # 660 KB of JSON
    assert response.status_code == 413 and "330000 texts in one request" in response.json()["detail"]
    assert time.perf_counter() - start < 3 and len(response.content) < 1000
    many_errors = _post_all(create_app(clf, limits=Limits(max_texts=500)), [{"texts": list(range(400))}])[0]
    assert many_errors.status_code == 422 and len(many_errors.json()["detail"]) == 20


def test_05_port_range_info_without_paths_and_docs_switch(clf, run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(run), "--port", "99999"])
    assert exit_info.value.code == 2 and "not a TCP port" in capsys.readouterr().err
    from fastapi.testclient import TestClient

    with TestClient(create_app(clf)) as client:
        info = client.get("/info").json()
        assert str(run.parent) not in json.dumps(info) and info["source"] == run.name
        assert client.get("/docs").status_code == 200
    with TestClient(create_app(clf, docs=False)) as client:
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


# ---------------------------------------------------------------- silent wrong answers, lost work


@pytest.mark.parametrize("option", [["--batch-size", "-1"], ["--batch-size", "0"], ["--threads", "-1"],
                                    ["--threads", "0"]])
def test_06_numeric_options_have_ranges(run, ag_files, tmp_path, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(tmp_path / "o.csv"), *option])
    assert exit_info.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_06_library_batch_size_is_checked(clf):
    with pytest.raises(ConfigError, match="batch_size=-1: must be >= 1"):
        clf.predict(["a text"], batch_size=-1)


def test_07_output_that_is_an_input_or_inside_a_run_is_refused(run, ag_files, tmp_path, capsys):
    labelled = tmp_path / "labelled.csv"
    shutil.copy(ag_files["test"], labelled)
    before = labelled.read_bytes(), (run / "config.yaml").read_bytes()
    for output, message in ((labelled, "is also an input file"), (run / "config.yaml", "lies inside the run"),
                            (run / "best" / "x.csv", "lies inside the run")):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", str(run), "--input", str(labelled), "--output", str(output)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert (labelled.read_bytes(), (run / "config.yaml").read_bytes()) == before


def test_08_bad_output_fails_before_predicting_and_leaves_no_debris(run, ag_files, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    monkeypatch.setattr(Classifier, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    for output, message in ((folder, "is a folder"), (Path("/sys/x.csv"), "cannot write there")):
        with pytest.raises(SystemExit):
            main(["predict", str(run), "--input", str(ag_files["test"]), "--output", str(output)])
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())


def test_08_a_failed_atomic_write_removes_its_temporary_file(tmp_path, monkeypatch):
    from agnews_lora import checkpoint

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write_text(tmp_path / "preds.csv", "ID,Label\n")
    assert list(tmp_path.iterdir()) == []


def test_09_a_second_writer_into_one_run_folder_is_refused(run, tmp_path):
    import subprocess
    import sys

    copy = _copy_unfinished(run, tmp_path / "run")
    code = ("import sys,time; from agnews_lora import runs\n"
            "with runs.writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(copy)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert child.stdout.readline().strip() == "held"
        before = (copy / "metrics.jsonl").read_text()
        with pytest.raises(RunLocked, match=rf"is being written by pid {child.pid}"):
            train(_resume_cfg(copy))
        assert (copy / "metrics.jsonl").read_text() == before
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("override,key", [
    ("train.log_every=0", "train.log_every"), ("train.eval_batch_size=0", "train.eval_batch_size"),
    ("train.max_steps=-1", "train.max_steps"), ("data.max_train_rows=-5", "data.max_train_rows"),
    ("train.eval_every=-1", "train.eval_every"), ("train.seed=-1", "train.seed"), ("lora.alpha=0", "lora.alpha"),
    ("train.weight_decay=-0.1", "train.weight_decay"), ("budget.max_trainable=0", "budget.max_trainable"),
    ("distill.probe_steps=0", "distill.probe_steps"), ("train.max_grad_norm=-1", "train.max_grad_norm"),
])
def test_10_every_numeric_key_has_a_range(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(overrides=[override])


def test_10_max_length_is_checked_against_the_model_before_training(tiny_model_dir, ag_files, tmp_path):
    cfg = load_config(overrides=[f"model.name={tiny_model_dir}", f"data.train={ag_files['train']}",
                                 "data.max_length=1000", f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"data.max_length=1000 exceeds .* \(128 positions\)"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- files


def test_11_a_csv_field_over_the_csv_limit_is_read(tmp_path):
    import csv

    path = tmp_path / "long.csv"
    path.write_text(f'"1","title","{"word " * 200_000}"\n"2","short","row"\n')
    split = read_file(path)
    assert len(split.texts) == 2 and len(split.texts[0]) > 131_072
    assert csv.field_size_limit() == 131_072  # the process-wide setting is left as found


def test_12_broken_gzip_files_and_folders_give_clear_errors(ag_files, tmp_path, capsys):
    good = gzip.compress(ag_files["test"].read_bytes())
    (tmp_path / "cut.csv.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.csv.gz").write_bytes(ag_files["test"].read_bytes())
    with pytest.raises(DataError, match="cut.csv.gz: the file is truncated"):
        read_file(tmp_path / "cut.csv.gz")
    with pytest.raises(DataError, match="plain.csv.gz: the file is not gzip data"):
        read_file(tmp_path / "plain.csv.gz")
    with pytest.raises(DataError, match="is a folder, not a data file"):
        read_file(tmp_path)
    with pytest.raises(ConfigError, match="is a folder; pass the YAML file itself"):
        load_config(tmp_path)


def test_13_14_torn_log_lines_and_stale_temporaries_do_not_block_resume(run, tmp_path, capsys):
    copy = _copy_unfinished(run, tmp_path / "run")
    state = json.loads((copy / "last" / "state.json").read_text())
    for name in ("metrics.jsonl", "train_log.jsonl"):
        with open(copy / name, "a") as fh:
            fh.write('{"step": 99, "lo')  # power loss mid-write
    (copy / ".last.tmpdead").mkdir()
    (copy / ".best.tmpdead").mkdir()
    train(_resume_cfg(copy, "train.max_steps=6"))
    assert "dropped an unfinished last line" in capsys.readouterr().err
    assert [r["step"] for r in runs.read_records(copy / "metrics.jsonl")] == [2, 4, 6] and state["step"] == 4
    assert not [p.name for p in copy.iterdir() if p.name.startswith(".") and p.name != runs.MARKER]


def test_15_a_reader_never_moves_a_half_swapped_checkpoint(run, clf, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "best").rename(copy / ".best.old")  # the trainer is between its two renames
    texts = ["Stocks rally as oil falls", "Federer wins in Paris"]
    assert Classifier.load(copy, precision="fp32").predict(texts) == clf.predict(texts)
    assert (copy / ".best.old").is_dir() and not (copy / "best").exists()


def test_16_a_damaged_run_is_named_as_damaged(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    adapter = copy / "best" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(RunDamaged, match=r"adapter_model.safetensors: the run is damaged|best: the run is damaged"):
        Classifier.load(copy)
    (copy / "config.yaml").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(copy)])
    assert exit_info.value.code == 2 and "config.yaml: the run is damaged" in capsys.readouterr().err
