"""What a user reads: loading a run does not claim its head is MISSING, a checkpoint that really
lacks encoder weights is named, and train's console output is a short summary, not a JSON dump."""

from __future__ import annotations

import json
import warnings

import pytest


@pytest.fixture(scope="module")
def headless_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model saved without its classification head: like a pretrained encoder checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("headless")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    weights = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def test_loading_a_run_does_not_report_the_head_missing(headless_model_dir, ag_files, tmp_path, capfd):
    from agnews_lora.config import load_config
    from agnews_lora.predict import Classifier
    from agnews_lora.train import train
    from conftest import tiny_run_overrides

    overrides = tiny_run_overrides(headless_model_dir, ag_files, tmp_path / "cache", tmp_path / "run")
    run = train(load_config(overrides=[*overrides, "train.max_steps=2", "train.eval_every=2"]))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = Classifier.load(run)
        clf.predict(["Stocks fall"])
    err = capfd.readouterr().err
    assert "MISSING" not in err and "LOAD REPORT" not in err and "not sharded" not in err
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert not [w for w in caught if "initialized at random" in str(w.message)]


def test_missing_encoder_weights_are_named(headless_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from agnews_lora.model import load_backbone_config, load_pretrained

    broken = tmp_path / "broken"
    shutil.copytree(headless_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    gone = "roberta.encoder.layer.1.attention.self.query.weight"
    del weights[gone]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 encoder weights are not in the checkpoint.*attention\.self\.query"):
        load_pretrained(str(broken), load_backbone_config(str(broken), 4))


def test_train_prints_a_short_summary(tiny_overrides, capsys):
    from agnews_lora.cli import main

    capsys.readouterr()
    main(["train", *tiny_overrides])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    summary = json.loads((tiny_overrides_out(tiny_overrides) / "summary.json").read_text())
    assert "{" not in out  # no JSON dump: summary.json has every figure
    assert f"trainable parameters: {summary['trainable']['total']:,} of 1,000,000" in out
    assert f"best validation accuracy: {summary['best_val_accuracy']:.4f}" in out
    assert f"test accuracy: {summary['test_accuracy']:.4f}" in out
    assert "not applied" not in out  # fp32 skips the autocast patches, as the user asked
    assert sum(line.startswith("step ") for line in lines) == 2  # one line per evaluation
    assert all(line.startswith("step ") for line in lines if "val loss" in line)
    assert len(lines) < 15


def tiny_overrides_out(overrides: list[str]):
    from pathlib import Path

    return Path(next(o for o in overrides if o.startswith("out_dir=")).split("=", 1)[1])
