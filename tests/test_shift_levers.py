"""Levers against distribution shift in training: augmentation (training rows only), label
smoothing, weight averaging, selection on perturbed validation rows, self-training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agnews_lora import train as train_mod
from agnews_lora.averaging import WeightAverage
from agnews_lora.checkpoint import read_jsonl
from agnews_lora.config import ConfigError
from agnews_lora.data import read_file
from agnews_lora.losses import cross_entropy
from agnews_lora.selftrain import select_pseudo_labels
from conftest import train_interrupted


@pytest.fixture(scope="module")
def unlabelled_file(ag_files, tmp_path_factory) -> Path:
    """60 test texts in a text/label CSV: the labels are there but must never be read."""
    split = read_file(ag_files["test"])
    path = tmp_path_factory.mktemp("unlabelled") / "pool.csv"
    rows = ["text,label"] + [f'"{t.replace(chr(34), "")}",{y}' for t, y in zip(split.texts[:60], split.labels[:60])]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_augmentation_perturbs_training_inputs_only(make_cfg, ag_files, tmp_path, monkeypatch):
    seen = []
    real = train_mod.tokenize

    def spy(texts, *args, **kwargs):
        seen.append(list(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(train_mod, "tokenize", spy)
    run = train_mod.train(make_cfg(tmp_path / "run", "data.augment=[uppercase]", "data.augment_prob=1.0"))
    train_texts, val_texts, test_texts = seen[0], seen[1], seen[-1]
    assert len(val_texts) == 40 and len(test_texts) == 120
    assert test_texts == read_file(ag_files["test"]).texts  # test rows as read
    assert any(t != t.upper() for t in val_texts)  # validation rows not perturbed
    augmented = [texts for texts in seen[2:-1] if len(texts) == len(train_texts)]
    assert augmented and augmented[0] == [t.upper() for t in train_texts]  # training rows perturbed
    assert json.loads((run / "summary.json").read_text())["shift_levers"]["augment"] == ["uppercase"]


def test_augmentation_share_and_determinism():
    from agnews_lora.perturb import augment_texts, parse_specs

    texts = [f"Word{i} and another sentence here" for i in range(400)]
    specs = parse_specs(["uppercase"])
    a, changed = augment_texts(texts, specs, prob=0.25, seed=3)
    b, _ = augment_texts(texts, specs, prob=0.25, seed=3)
    assert a == b and 70 <= changed <= 130 and sum(x != y for x, y in zip(a, texts)) == changed
    assert augment_texts(texts, specs, prob=0.25, seed=4)[0] != a  # another epoch, other rows


def test_unknown_augmentation_names_the_valid_ones(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"data.augment: unknown perturbation 'typo'; valid: typos, delete_words"):
        make_cfg(tmp_path / "run", "data.augment=[typo]")


def test_label_smoothing_matches_its_definition():
    logits, labels = torch.tensor([[2.0, 0.0, -1.0, 0.5]]), torch.tensor([0])
    eps = 0.1
    target = torch.full((1, 4), eps / 4)
    target[0, 0] += 1 - eps
    want = -(target * torch.log_softmax(logits, -1)).sum()
    assert torch.allclose(cross_entropy(logits, labels, label_smoothing=eps), want)


def test_weight_average_is_an_ema_and_swaps_back():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    avg = WeightAverage(model, decay=0.5)
    w0 = model.weight.detach().clone()
    history = [w0]
    for k in range(1, 4):
        with torch.no_grad():
            model.weight.add_(float(k))
        history.append(model.weight.detach().clone())
        avg.update()
    want = w0.clone()
    for t, w in enumerate(history[1:]):
        d = min(0.5, (1 + t) / (10 + t))
        want = d * want + (1 - d) * w
    assert torch.allclose(avg.average[0], want) and len(avg.average) == 1
    current = model.weight.detach().clone()
    with avg.swapped_in():
        assert torch.allclose(model.weight, want)
    assert torch.equal(model.weight, current)


def test_ema_run_keeps_the_average_in_best_and_resumes(make_cfg, tmp_path, monkeypatch):
    ref = train_mod.train(make_cfg(tmp_path / "ref", "train.ema=0.9"))
    state = load_file(str(ref / "last" / "average.safetensors"))
    best = load_file(str(ref / "best" / "adapter_model.safetensors"))
    lora_key = next(k for k in best if "lora_A" in k)
    avg_key = next(k for k in state if k.endswith(lora_key.replace(".weight", ".default.weight").split("base_model.model.")[-1]))
    if read_jsonl(ref / "metrics.jsonl")[-1].get("best"):  # best/ is step 6: the final average
        assert torch.allclose(best[lora_key], state[avg_key])

    run = tmp_path / "run"
    train_interrupted(make_cfg(run, "train.ema=0.9"), monkeypatch, at_call=5)
    train_mod.train(make_cfg(run, "train.ema=0.9", "train.resume=true"))
    got = load_file(str(run / "last" / "average.safetensors"))
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in got)


def test_select_on_perturbed_validation(make_cfg, tmp_path):
    run = train_mod.train(make_cfg(tmp_path / "run", "train.select=perturbed_val_accuracy"))
    records = read_jsonl(run / "metrics.jsonl")
    assert all(0 <= r["val_perturbed_accuracy"] <= 1 for r in records)
    best = max(records, key=lambda r: (r["val_perturbed_accuracy"], -r["step"]))
    marked = [r for r in records if r.get("best")]
    assert marked[-1]["step"] == best["step"]


def test_select_needs_validation_rows(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"train.select='perturbed_val_accuracy' needs validation rows"):
        make_cfg(tmp_path / "run", "train.select=perturbed_val_accuracy", "data.val_size=0")


def test_self_training_threshold_one_adds_no_rows(make_cfg, unlabelled_file, tmp_path):
    run = train_mod.train(make_cfg(tmp_path / "run", f"data.unlabelled={unlabelled_file}",
                                   "self_train.threshold=1.0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["self_train"]["rows"] == 0 and summary["steps"] == 6
    assert summary["self_train"]["unlabelled_rows"] == 60


def test_self_training_round_trains_on_pseudo_labels_and_resumes(make_cfg, unlabelled_file, tmp_path, monkeypatch):
    extra = (f"data.unlabelled={unlabelled_file}", "self_train.threshold=0.0", "self_train.steps=4",
             "self_train.balance=false", "self_train.train_ratio=0.5")
    ref = train_mod.train(make_cfg(tmp_path / "ref", *extra))
    summary = json.loads((ref / "summary.json").read_text())
    st = summary["self_train"]
    assert st["rows"] == 60 and st["train_rows"] == 30 and summary["steps"] == 10 and st["steps"] == 4
    pseudo = json.loads((ref / "pseudo_labels.json").read_text())
    assert sum(st["per_class"]) == 60 and len(pseudo["labels"]) == 60
    assert [r["step"] for r in read_jsonl(ref / "metrics.jsonl")] == [3, 6, 9, 10]
    assert json.loads((ref / "last" / "state.json").read_text())["round"] == 1

    run = tmp_path / "run"
    # Loss call 10 is step 10: inside the further round, after its step-9 checkpoint.
    train_interrupted(make_cfg(run, *extra), monkeypatch, at_call=10)
    train_mod.train(make_cfg(run, *extra, "train.resume=true"))
    for folder in ("last", "best"):
        got = load_file(str(run / folder / "adapter_model.safetensors"))
        want = load_file(str(ref / folder / "adapter_model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_pseudo_label_selection():
    probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.02, 0.98], [0.97, 0.03], [0.99, 0.01]])
    idx, labels = select_pseudo_labels(probs, threshold=0.8, balance=False)
    assert idx.tolist() == [0, 2, 3, 4, 5] and labels.tolist() == [0, 1, 1, 0, 0]
    idx, labels = select_pseudo_labels(probs, threshold=0.8, balance=True)  # two per class, most confident
    assert idx.tolist() == [2, 3, 4, 5] and labels.tolist() == [1, 1, 0, 0]
    assert len(select_pseudo_labels(probs, threshold=1.0, balance=True)[0]) == 0


def test_summary_records_calibration_and_prior(make_cfg, tmp_path):
    run = train_mod.train(make_cfg(tmp_path / "run"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["calibration"]["temperature"] > 0
    assert summary["calibration"]["val_nll_after"] <= summary["calibration"]["val_nll_before"] + 1e-9
    assert abs(sum(summary["class_prior"]) - 1) < 1e-5 and len(summary["class_prior"]) == 4
    test = json.loads((run / "test_metrics.json").read_text())
    assert 0 <= test["ece"] <= 1 and 0 <= test["ece_calibrated"] <= 1
