"""Every PEFT method (peft.method) on the tiny RoBERTa: exact counts equal peft's, a few training
steps, reload and merge parity, over-budget and inapplicable settings refused, AdaLoRA's ranks
allocated in the loop, the speed patches, the planner's sizes, and distillation with a non-LoRA
student."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from agnews_lora import checkpoint as ckpt
from agnews_lora.config import PEFT_METHODS, ConfigError, load_config
from agnews_lora.data import read_files
from agnews_lora.methods import MERGEABLE, PLACED, SIZE_KEYS, with_size
from agnews_lora.model import BudgetError, budget_breakdown, build_model, count_trainable
from agnews_lora.predict import Classifier
from agnews_lora.speed import speed_up
from agnews_lora.train import train

from conftest import ROBERTA_BASE

# A small size of each method on the tiny model (hidden 32, 2 layers, 4 labels; positions 128).
SIZES = {"lora": ["lora.r=4"], "dora": ["lora.r=4"],
         "adalora": ["peft.adalora.init_r=4", "peft.adalora.target_r=2", "peft.adalora.tfinal=1"],
         "ia3": ["lora.target_modules=all"], "vera": ["peft.vera.r=16"], "loha": ["peft.loha.r=2"],
         "lokr": ["peft.lokr.r=2"], "prompt": ["peft.prompt.num_virtual_tokens=4"],
         "prefix": ["peft.prefix.num_virtual_tokens=4"], "bitfit": []}
STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only cost time on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def method_cfg(tiny_model_dir, ag_files, tmp_path_factory):
    cache = tmp_path_factory.mktemp("token-cache")

    def make(method: str, out: Path, *extra: str):
        return load_config(overrides=[
            f"model.name={tiny_model_dir}", f"data.train={ag_files['train']}", f"data.test={ag_files['test']}",
            "data.val_size=40", "data.max_length=48", f"data.cache_dir={cache}", f"train.max_steps={STEPS}",
            "train.batch_size=8", "train.eval_every=2", "train.log_every=1", "train.lr=1e-2",
            "train.precision=fp32", "train.progress=false", f"out_dir={out}", f"peft.method={method}",
            *SIZES[method], *extra])

    return make


@pytest.fixture(scope="module")
def runs(method_cfg, tmp_path_factory) -> dict[str, Path]:
    """One 4-step run per method (evaluation and checkpoints at steps 2 and 4)."""
    base = tmp_path_factory.mktemp("methods")
    return {m: train(method_cfg(m, base / m)) for m in PEFT_METHODS}


def _peft_count(model) -> int:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()[0]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # BitFit: no peft


# ---------------------------------------------------------------- counting


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_meta_count_equals_the_built_model_and_peft(method, method_cfg, tmp_path):
    cfg = method_cfg(method, tmp_path / "run")
    meta = budget_breakdown(cfg)
    model = build_model(cfg)
    b = count_trainable(model)
    assert meta.total == b.total == _peft_count(model)
    assert b.method == method and not b.other  # every trainable parameter is attributed
    assert b.total == b.lora + b.prompt_total + b.bias_total + b.head_total
    assert b.head == {"classifier.dense": 32 * 32 + 32, "classifier.out_proj": 32 * 4 + 4}
    if method in PLACED:
        assert sum(b.lora_by_layer.values()) == b.lora > 0 and set(b.lora_by_layer) == {0, 1}
    if method in ("prompt", "prefix"):
        per_token = 32 if method == "prompt" else 2 * 2 * 32  # prefix: a key and a value per layer
        assert b.prompt == {"prompt_encoder.embedding": 4 * per_token}
    if method == "bitfit":  # every bias: q, k, v, attn_out, 2 LayerNorms, ffn_in (64), ffn_out; embeddings' LayerNorm
        assert b.bias_by_layer == {0: 6 * 32 + 64 + 32, 1: 6 * 32 + 64 + 32} and b.bias_total == 2 * 288 + 32


@pytest.mark.skipif(not ROBERTA_BASE.is_dir(), reason="../shared/models/roberta-base is absent")
def test_roberta_base_counts_by_hand():
    def total(*overrides: str) -> int:
        return budget_breakdown(load_config(overrides=[f"model.name={ROBERTA_BASE}", *overrides])).total

    head = 593_668
    assert total("peft.method=vera") == 24 * (256 + 768) + head  # q, v of 12 layers: lambda_d (r) + lambda_b (out)
    # IA3: q, k, v, attn_out and ffn_in scale their outputs, ffn_out its 3,072 inputs
    assert total("peft.method=ia3", "lora.target_modules=all") == 12 * (4 * 768 + 3072 + 3072) + head
    assert total("peft.method=prefix") == 20 * 12 * 2 * 768 + head
    assert total("peft.method=prompt", "model.head=linear") == 20 * 768 + 3_076
    assert total("peft.method=adalora") == 24 * 12 * (768 + 768 + 1) + head  # A, B, E at init_r=12
    assert total("peft.method=dora") == 888_580 + 24 * 768  # LoRA r=8 + a magnitude per output
    assert total("peft.method=bitfit") == 12 * (6 * 768 + 3072 + 768) + 768 + head


# ---------------------------------------------------------------- training, reloading, merging


def _test_texts(ag_files) -> list[str]:
    return read_files([ag_files["test"]]).texts[:40]


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_trained_run_reloads_with_the_same_predictions_and_merges(method, runs, ag_files):
    run, texts = runs[method], _test_texts(ag_files)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["peft_method"] == method
    assert summary["trainable"]["total"] == budget_breakdown(load_config(run / "config.yaml")).total
    clf = Classifier.load(run, precision="fp32", merge=False)
    # The training side's loader (resume, self-training, the final test score) against the
    # readers' (peft's from_pretrained, BitFit's plain state dict): the same logits.
    cfg = clf.cfg
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt.load_adapter_weights(model, run / "best")
    trained = Classifier(model, clf.tokenizer, cfg, precision="fp32")
    np.testing.assert_allclose(trained.predict_logits(texts), clf.predict_logits(texts), atol=1e-6)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("classifier" not in n for n in changed), "training left the method's own parameters untouched"
    test = json.loads((run / "test_metrics.json").read_text())
    preds = clf.predict(read_files([cfg.data.test[0]]).texts)
    assert test["confusion"] == _confusion(read_files([cfg.data.test[0]]).labels, preds)
    if method in MERGEABLE or method == "bitfit":  # merged: a plain transformers model, the same logits
        merged = Classifier.load(run, precision="fp32")
        assert not hasattr(merged.model, "peft_config")
        np.testing.assert_allclose(merged.predict_logits(texts), clf.predict_logits(texts), atol=1e-5)


def _confusion(labels: list[int], preds: list[int]) -> list[list[int]]:
    matrix = np.zeros((4, 4), dtype=int)
    np.add.at(matrix, (labels, preds), 1)
    return matrix.tolist()


def test_merged_export_of_a_non_lora_method_passes_its_parity_check(runs, tmp_path):
    from agnews_lora.export import export

    folder = export(runs["loha"], fmt="merged", output=tmp_path / "merged", parity_rows=20)
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_logit_diff"] <= 1e-4
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(folder)  # plain transformers loads it


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_export_is_refused_with_the_unmerged_folder_named(method, runs, tmp_path):
    from agnews_lora.export import export

    with pytest.raises(ConfigError, match=rf"peft.method={method} .* cannot be exported as merged.*best"):
        export(runs[method], fmt="merged", output=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_bitfit_saves_biases_and_head_in_safetensors(runs):
    from safetensors.torch import load_file

    best = runs["bitfit"] / "best"
    saved = load_file(str(best / ckpt.ADAPTER_FILE))
    assert all(k.endswith(".bias") or k.startswith("classifier.") for k in saved)
    assert sum(t.numel() for t in saved.values()) == json.loads((best / ckpt.BITFIT_FILE).read_text())["parameters"]
    assert not (best / "adapter_config.json").exists()  # no peft adapter


@pytest.mark.parametrize("method", ["adalora", "bitfit"])  # its allocator state; plain safetensors
def test_resume_after_interruption_matches_the_uninterrupted_run(method, runs, method_cfg, tmp_path, monkeypatch):
    from conftest import train_interrupted

    run = tmp_path / "run"
    train_interrupted(method_cfg(method, run), monkeypatch, at_call=4)  # after the step-2 checkpoint
    train(method_cfg(method, run, "train.resume=true"))
    got = ckpt.load_training_state(run / "last")
    assert got["state"]["step"] == STEPS
    from safetensors.torch import load_file

    a, b = load_file(str(run / "last" / ckpt.ADAPTER_FILE)), load_file(str(runs[method] / "last" / ckpt.ADAPTER_FILE))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), method


# ---------------------------------------------------------------- AdaLoRA


def test_adalora_ranks_are_allocated_during_training(runs):
    s = json.loads((runs["adalora"] / "summary.json").read_text())["adalora"]
    modules = 2 * 2  # query and value of both layers
    assert set(s["ranks"]) and len(s["ranks"]) == modules
    # init_r 4 per module at the start; after the final allocation target_r 2 on average
    assert s["total_rank"] == 2 * modules < 4 * modules and sum(s["ranks"].values()) == s["total_rank"]
    from safetensors.torch import load_file

    saved = load_file(str(runs["adalora"] / "last" / ckpt.ADAPTER_FILE))
    e = [t for k, t in saved.items() if "lora_E" in k]
    assert all(t.shape[0] == 4 for t in e)  # stored at the initial rank, pruned values as zeros
    assert sum(int(torch.count_nonzero(t)) for t in e) == 2 * modules
    # last/ keeps the final rank pattern (the importance averages are dropped by peft once it is fixed;
    # the resume test covers them)
    state = load_file(str(runs["adalora"] / "last" / "adalora.safetensors"))
    pattern = [t for k, t in state.items() if k.startswith("rank_pattern/")]
    assert len(pattern) == modules and sum(int(t.sum()) for t in pattern) == 2 * modules


def test_adalora_penalty_equals_the_one_peft_adds_with_labels(method_cfg, tmp_path):
    from agnews_lora.losses import cross_entropy
    from agnews_lora.methods import adalora_steps

    cfg = method_cfg("adalora", tmp_path / "run")
    assert cfg.peft.adalora.orth_reg_weight > 0
    model = build_model(cfg).eval()
    ids = torch.randint(3, 1000, (2, 9))
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)  # peft adds its penalty
        ours = cross_entropy(out.logits, labels) + adalora_steps(model, cfg).penalty()
    assert torch.allclose(out.loss, ours, atol=1e-6)


def test_adalora_schedule_without_allocation_is_refused_before_loading(method_cfg, tmp_path):
    with pytest.raises(ConfigError, match="peft.adalora.tinit=3"):
        method_cfg("adalora", tmp_path / "run", "peft.adalora.tinit=3")  # 3 >= 4 steps - tfinal 1
    with pytest.raises(ConfigError, match=r"peft.adalora.target_r=4 must be in \[1, peft.adalora.init_r=4\)"):
        method_cfg("adalora", tmp_path / "run", "peft.adalora.target_r=4")  # nothing to allocate


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_over_budget_is_refused_before_anything_loads(method, method_cfg, tmp_path):
    cfg = method_cfg(method, tmp_path / "run", "budget.max_trainable=1200")  # the RoBERTa head alone is 1,188
    with pytest.raises(BudgetError, match="exceed budget.max_trainable=1,200"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("method", "override", "key"), [
    ("prompt", "lora.layers=[0]", "lora.layers"),
    ("prefix", "lora.target_modules=all", "lora.target_modules"),
    ("bitfit", "lora.dropout=0.2", "lora.dropout"),
    ("adalora", "lora.r=4", "lora.r"),
    ("vera", "lora.alpha=32", "lora.alpha"),
    ("lora", "peft.vera.r=4", "peft.vera.r"),
    ("ia3", "peft.loha.alpha=2", "peft.loha.alpha"),
    ("prompt", "peft.prefix.num_virtual_tokens=3", "peft.prefix.num_virtual_tokens"),
    ("prompt", "peft.prompt.init=text", "peft.prompt.init_text"),
])
def test_inapplicable_options_are_refused_naming_the_key(method, override, key, tiny_model_dir):
    overrides = [f"model.name={tiny_model_dir}", f"peft.method={method}", override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_unknown_ia3_feedforward_module_is_refused(method_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"peft\.ia3\.feedforward_modules=\['nope'\]"):
        budget_breakdown(method_cfg("ia3", tmp_path, "peft.ia3.feedforward_modules=[nope]"))


def test_virtual_tokens_beyond_the_positions_are_refused_before_loading(method_cfg, tmp_path):
    cfg = method_cfg("prompt", tmp_path / "run", "peft.prompt.num_virtual_tokens=100")  # 48 + 100 > 128
    with pytest.raises(ConfigError, match="peft.prompt.num_virtual_tokens=100"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_prefix_tuning_on_mpnet_is_refused_with_the_reason(tmp_path):
    from transformers import MPNetConfig

    MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=130).save_pretrained(tmp_path)
    cfg = load_config(overrides=[f"model.name={tmp_path}", "peft.method=prefix"])
    with pytest.raises(ConfigError, match="mpnet's attention takes no past keys and values"):
        budget_breakdown(cfg)
    assert budget_breakdown(load_config(overrides=[f"model.name={tmp_path}", "peft.method=prompt"])).prompt_total == 640


# ---------------------------------------------------------------- speed patches


def _pair(cfg):
    """Two identical models of `cfg`, every trainable parameter made non-zero (adapters start at zero)."""
    ref, fast = build_model(cfg).eval(), build_model(cfg).eval()
    torch.manual_seed(1)
    for p in ref.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _batch():
    torch.manual_seed(3)
    ids = torch.randint(3, 1000, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch, autocast: bool):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(**batch).logits.float()


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_speed_patches_keep_each_methods_logits(method, method_cfg, tmp_path):
    from agnews_lora import speed

    cfg = method_cfg(method, tmp_path / "run", "train.precision=bf16")
    ref, fast = _pair(cfg)
    batch = _batch()
    cast = speed.cast_frozen_linears(ref, torch.bfloat16)
    plain, _ = _pair(cfg)
    assert torch.equal(_logits(ref, batch, autocast=True), _logits(plain, batch, autocast=True))  # bit-identical
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16", print=lambda *a: None)
    results = {r.name: r for r in speed_up(fast, cfg, accelerator)}
    assert results["first_token_last_layer"] and results["fast_dropout"] and results["cast_frozen_linears"]
    # DoRA's weight norm, and IA3's/VeRA's layers (peft cannot switch their input casting off), forbid it
    assert results["cast_inputs_once"].applied == (method not in ("dora", "ia3", "vera"))
    if method == "dora":
        assert "weight norm" in results["cast_inputs_once"].detail
        dora_bases = [m.get_base_layer() for m in ref.modules() if hasattr(m, "lora_magnitude_vector")]
        assert len(dora_bases) == 4 and all(b.weight.dtype == torch.float32 for b in dora_bases)  # read by DoRA
        assert cast >= 12 - 4
    if method in ("ia3", "vera"):
        assert "cast_input_dtype_enabled" in results["cast_inputs_once"].detail
    assert torch.allclose(_logits(fast, batch, autocast=True), _logits(ref, batch, autocast=True), atol=2e-2)
    fp32_ref, fp32_fast = _pair(cfg)
    speed.first_token_last_layer(fp32_fast)
    assert torch.allclose(_logits(fp32_fast, batch, autocast=False), _logits(fp32_ref, batch, autocast=False),
                          atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_is_padding_invariant_with_the_first_token_layer(method, method_cfg, tmp_path):
    from agnews_lora import speed

    ref, fast = _pair(method_cfg(method, tmp_path / "run"))
    assert speed.first_token_last_layer(fast)
    batch = _batch()
    together = _logits(fast, batch, autocast=False)
    alone = _logits(fast, {"input_ids": batch["input_ids"][1:2, :5], "attention_mask": batch["attention_mask"][1:2, :5]},
                    autocast=False)
    assert torch.allclose(together[1:2], alone, atol=1e-5)  # padding (length-sorted batches) changes nothing
    fast.train()
    fast(**batch).logits.sum().backward()  # the shortened last layer passes gradients to the virtual tokens
    assert fast.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- planner


def test_planned_sizes_are_the_largest_that_fit(tiny_model_dir):
    from agnews_lora.plan import plan_methods

    cfg = load_config(overrides=[f"model.name={tiny_model_dir}", "budget.max_trainable=6000", "data.max_length=48"])
    names = ["lora", "lokr", "prompt", "ia3"]  # linear, jumping then saturating, positions, fixed
    rows = plan_methods(cfg, names)
    assert {r.method for r in rows} == set(names)
    from agnews_lora.plan import method_config

    for row in rows:
        c = method_config(cfg, row.method, modules=row.modules, layers=row.layers, head=row.head)
        if SIZE_KEYS[row.method] is None:
            assert row.limit == "fixed" and row.total == budget_breakdown(c).total <= 6000
            continue
        if row.max_size is None:
            assert budget_breakdown(with_size(c, 1)).total > 6000
            continue
        b = budget_breakdown(with_size(c, row.max_size))
        assert (b.total, b.head_total) == (row.total, row.head_params) and b.total <= 6000, row
        bigger = budget_breakdown(with_size(c, row.max_size + 1)).total
        if row.limit == "budget":
            assert bigger > 6000, row
        elif row.limit == "saturates":
            assert bigger == b.total and budget_breakdown(with_size(c, row.max_size - 1)).total != b.total, row
        else:
            assert row.limit == "positions" and row.max_size == 128 - 48, row
    lora = next(r for r in rows if r.method == "lora" and r.placement == "query+value" and r.head == "linear")
    assert lora.max_size == (6000 - 132) // 256


def test_budget_plan_methods_cli(tiny_model_dir, capsys):
    from agnews_lora.cli import main

    main(["budget", "--plan", "--methods", "vera,prompt", "--json", f"model.name={tiny_model_dir}",
          "data.max_length=48"])
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"vera", "prompt"} and all(r["total"] <= 1_000_000 for r in rows)
    assert {r["limit"] for r in rows if r["method"] == "prompt"} == {"positions"}
    with pytest.raises(SystemExit) as exit_:
        main(["budget", "--plan", "--methods", "nope", f"model.name={tiny_model_dir}"])
    assert exit_.value.code == 2
    assert "--methods 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------- distillation


def test_distillation_trains_an_adalora_student(runs, method_cfg, tmp_path):
    from agnews_lora.distill import distill

    cfg = method_cfg("adalora", tmp_path / "student", f"distill.teacher={runs['lora']}")
    run = distill(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distill"]["teacher"] and summary["adalora"]["total_rank"] == 2 * 4
