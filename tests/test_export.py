"""Merged and ONNX exports: parity with the in-memory peft model, folder contents, Python API and CLI.

One tiny run is trained and exported once for the module (`agnews-lora export`, all three kinds).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agnews_lora.cli import main
from agnews_lora.config import ConfigError, load_config
from agnews_lora.data import read_files
from agnews_lora.export import MIN_LABEL_AGREEMENT, SAMPLE_TEXTS, TOLERANCES, ParityError, check_parity, export
from agnews_lora.predict import Classifier, folder_kind, pad_batch
from agnews_lora.runs import EXPORT_META
from agnews_lora.train import train
from conftest import tiny_run_overrides

PARITY_ROWS = 60


def _tiny_run(out: Path, model_dir: Path, ag_files: dict, *extra: str) -> Path:
    return train(load_config(overrides=[*tiny_run_overrides(model_dir, ag_files, out / "cache", out / "run"), *extra]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, ag_files) -> dict[str, Path]:
    """A tiny run and its merged, ONNX and ONNX int8 exports, made with the CLI."""
    run = _tiny_run(tmp_path_factory.mktemp("export"), tiny_model_dir, ag_files)
    for args in (["--format", "merged"], ["--format", "onnx"], ["--format", "onnx", "--quantize", "int8"]):
        main(["export", str(run), *args, "--parity-rows", str(PARITY_ROWS)])
    return {"run": run, "merged": run / "export" / "merged", "onnx": run / "export" / "onnx",
            "onnx-int8": run / "export" / "onnx-int8"}


@pytest.fixture(scope="module")
def texts(ag_files) -> list[str]:
    return read_files([ag_files["test"]]).texts + SAMPLE_TEXTS


@pytest.fixture(scope="module")
def reference(exported, texts) -> np.ndarray:
    """Logits of the in-memory peft model (adapter not merged), fp32."""
    clf = Classifier.load(exported["run"], precision="fp32", merge=False)
    assert hasattr(clf.model, "peft_config")
    return clf.predict_logits(texts)


def test_merged_folder_loads_without_peft_and_matches_the_peft_model(exported, texts, reference):
    folder = exported["merged"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["RobertaForSequenceClassification"]
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert "classifier.dense.weight" in keys and not any("lora" in k or "modules_to_save" in k for k in keys)
    # A fresh interpreter where `import peft` fails, loading with plain transformers.
    code = ("import json, sys; sys.modules['peft'] = None\n"
            "import torch; from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
            f"path, texts = {str(folder)!r}, json.loads(sys.stdin.read())\n"
            "model, tok = AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)\n"
            "enc = tok(texts, truncation=True, max_length=64, padding=True, return_tensors='pt')\n"
            "with torch.no_grad(): print(json.dumps(model(**enc).logits.tolist()))\n")
    sample = texts[:8]
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(sample), capture_output=True, text=True,
                          timeout=300, check=True)
    plain = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    # Padded together here, one by one in `reference`: padding must not change the logits.
    np.testing.assert_allclose(plain, reference[:8], atol=1e-5)


def test_merged_logits_equal_the_peft_model_within_1e_5(exported, texts, reference):
    got = Classifier.load(exported["merged"], precision="fp32").predict_logits(texts, batch_size=7)
    assert np.abs(got - reference).max() <= 1e-5
    assert (got.argmax(-1) == reference.argmax(-1)).all()


@pytest.mark.parametrize("name", ["onnx", "onnx-int8"])
def test_onnx_logits_within_their_tolerance(exported, texts, reference, name):
    clf = Classifier.load(exported[name])
    assert clf.onnx and clf.precision == ("int8" if name == "onnx-int8" else "fp32")
    for batch_size in (1, 7, 64):  # batch and sequence lengths the graph was not traced with
        got = clf.predict_logits(texts, batch_size=batch_size)
        assert np.abs(got - reference).max() <= TOLERANCES[name]
        assert (got.argmax(-1) == reference.argmax(-1)).mean() >= MIN_LABEL_AGREEMENT
    if name == "onnx":
        assert np.abs(got - reference).max() <= 1e-4


def test_onnx_graph_is_one_file_with_dynamic_batch_and_sequence(exported):
    import onnx

    fp32, int8 = (onnx.load(str(exported[n] / "model.onnx")) for n in ("onnx", "onnx-int8"))
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in fp32.graph.input}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [o.name for o in fp32.graph.output] == ["logits"]
    assert max(o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert not list(exported["onnx"].glob("*.data"))  # weights inside model.onnx
    assert "MatMulInteger" in {n.op_type for n in int8.graph.node}
    assert "MatMulInteger" not in {n.op_type for n in fp32.graph.node}
    assert (exported["onnx-int8"] / "model.onnx").stat().st_size < (exported["onnx"] / "model.onnx").stat().st_size


@pytest.mark.parametrize("name", ["merged", "onnx", "onnx-int8"])
def test_each_export_records_its_parity_and_metadata(exported, name):
    folder = exported[name]
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] and parity["export"] == name
    assert parity["rows"] == PARITY_ROWS + len(SAMPLE_TEXTS)
    assert parity["label_agreement"] >= MIN_LABEL_AGREEMENT
    assert 0 <= parity["max_abs_logit_diff"] <= parity["tolerance"] == TOLERANCES[name]
    assert str(PARITY_ROWS) in parity["sample"] and "test.csv" in parity["sample"]
    meta = json.loads((folder / EXPORT_META).read_text())
    summary = json.loads((exported["run"] / "summary.json").read_text())
    assert meta["format"] == name.split("-")[0] and meta["quantize"] == ("int8" if "int8" in name else None)
    assert meta["labels"] == ["World", "Sports", "Business", "Sci/Tech"] and meta["max_length"] == 64
    assert meta["trainable"] == summary["trainable"]["total"]
    assert (folder / "config.yaml").is_file() and (folder / "tokenizer_config.json").is_file()
    assert folder_kind(folder) == meta["format"]


def test_python_api_on_exported_folders(exported, texts):
    run_preds = Classifier.load(exported["run"], precision="fp32").predict(texts)
    for name in ("merged", "onnx"):
        clf = Classifier.load(exported[name], precision="fp32")
        assert clf.predict(texts) == run_preds
        proba = clf.predict_proba(texts[:5])
        np.testing.assert_allclose(proba.sum(-1), 1.0, atol=1e-5)
        assert clf.label_names == ["World", "Sports", "Business", "Sci/Tech"] and clf.cfg.data.max_length == 64
        assert clf.info["format"] == name and clf.info["trainable"] > 0
    assert folder_kind(exported["run"]) == "run"


def test_run_folder_predictor_merges_in_memory_with_unchanged_logits(exported, texts, reference):
    clf = Classifier.load(exported["run"], precision="fp32")
    assert not hasattr(clf.model, "peft_config")  # merged: plain transformers modules
    np.testing.assert_allclose(clf.predict_logits(texts), reference, atol=1e-5)
    # Input order is kept although batches are formed longest first.
    np.testing.assert_allclose(clf.predict_logits(texts[::-1], batch_size=3), reference[::-1], atol=1e-5)


def test_cli_predict_and_evaluate_on_exported_folders(exported, ag_files, tmp_path, capsys):
    expected = Classifier.load(exported["run"], precision="fp32").predict(read_files([ag_files["test"]]).texts)
    out = tmp_path / "pred.csv"
    main(["predict", str(exported["onnx-int8"]), "--input", str(ag_files["test"]), "--output", str(out)])
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["ID", "Label"] and len(rows) == 121
    preds = [int(r[1]) for r in rows[1:]]
    assert np.mean(np.array(preds) == np.array(expected)) >= MIN_LABEL_AGREEMENT
    assert "texts/s" in capsys.readouterr().out

    main(["evaluate", str(exported["merged"]), "--precision", "fp32", "--output", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    labels = read_files([ag_files["test"]]).labels
    assert metrics["n"] == 120 and metrics["data"] == str(ag_files["test"])  # the run's test data, via config.yaml
    assert metrics["accuracy"] == pytest.approx(np.mean(np.array(expected) == np.array(labels)))


def test_cli_refuses_bad_exports_with_one_line(exported, tmp_path, capsys):
    for argv, message in ((["export", str(exported["merged"]), "--format", "onnx"], "is an exported folder"),
                          (["export", str(exported["run"]), "--format", "merged", "--quantize", "int8"],
                           "only --format onnx --quantize int8"),
                          (["predict", str(tmp_path), "--input", "x.csv", "--output", "y.csv"], "not a run folder")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_failed_parity_check_raises_and_leaves_nothing(exported, tmp_path, monkeypatch):
    from agnews_lora import export as export_module

    monkeypatch.setitem(export_module.TOLERANCES, "merged", -1.0)  # no export can pass
    dest = tmp_path / "merged"
    with pytest.raises(ParityError, match=r"merged export fails its parity check on 18 texts.*nothing was written"):
        export(exported["run"], "merged", output=dest, parity_rows=10)
    assert not dest.exists() and not list(tmp_path.iterdir())


def test_check_parity_thresholds():
    expected = np.array([[2.0, 0.0], [0.0, 2.0]] * 50, dtype=np.float32)
    ok = check_parity(expected, expected + 0.01, tolerance=0.02, name="x")
    assert ok["passed"] and ok["label_agreement"] == 1.0 and ok["max_abs_logit_diff"] == pytest.approx(0.01)
    with pytest.raises(ParityError, match="max .logit diff. 0.01 .tolerance 0.001"):
        check_parity(expected, expected + 0.01, tolerance=1e-3, name="x")
    flipped = expected.copy()
    flipped[:2] = flipped[:2, ::-1]  # 2% of the labels change
    with pytest.raises(ParityError, match="labels agree on 98.00%"):
        check_parity(expected, flipped, tolerance=10, name="x")


def test_pad_batch_right_pads_in_row_order():
    ids, mask = pad_batch([np.array([5, 6, 7]), np.array([8]), np.array([9, 4])], pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1], [9, 4, 1]] and ids.dtype == np.int64
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_linear_head_exports_to_onnx_but_not_to_a_merged_folder(tmp_path, tiny_model_dir, ag_files, texts):
    run = _tiny_run(tmp_path, tiny_model_dir, ag_files, "model.head=linear", "train.max_steps=2",
                    "train.eval_every=2")
    with pytest.raises(ConfigError, match="model.head=linear has no plain transformers equivalent.*--format onnx"):
        export(run, "merged", parity_rows=10)
    folder = export(run, "onnx", parity_rows=10)
    expected = Classifier.load(run, precision="fp32", merge=False).predict_logits(texts)
    got = Classifier.load(folder).predict_logits(texts)
    assert np.abs(got - expected).max() <= TOLERANCES["onnx"]
    assert json.loads((folder / "parity.json").read_text())["passed"]
