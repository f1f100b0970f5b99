"""Model: exact trainable counts on the meta device, the breakdown, both heads on RoBERTa and
BERT, the budget refusal, and failing fast on Hub ids without network."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from agnews_lora.config import ConfigError, load_config
from agnews_lora.hub import HubUnreachable
from agnews_lora.model import (BudgetError, budget_breakdown, build_model, check_budget, count_trainable,
                               format_breakdown)

from conftest import ROBERTA_BASE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_roberta_base = pytest.mark.skipif(not ROBERTA_BASE.is_dir(), reason="../shared/models/roberta-base is absent")


def _roberta_base(*overrides: str):
    return load_config(overrides=[f"model.name={ROBERTA_BASE}", "model.init=random", *overrides])


# ---------------------------------------------------------------- roberta-base shapes (meta device)


@needs_roberta_base
def test_paper_lora_only_is_888580():
    b = budget_breakdown(_roberta_base("lora.r=8", "lora.target_modules=query,value"))
    assert b.total == 888_580
    assert b.head == {"classifier.dense": 768 * 768 + 768, "classifier.out_proj": 768 * 4 + 4}
    assert b.head_total == 593_668 and b.lora == 294_912 and not b.other
    assert b.lora_by_module == {"attention.self.query": 147_456, "attention.self.value": 147_456}
    assert b.lora_by_layer == {i: 2 * 8 * (768 + 768) for i in range(12)}


@needs_roberta_base
def test_paper_targeted_is_777988():
    b = budget_breakdown(_roberta_base("lora.r=12", "lora.target_modules=query,key", "lora.layers=0,1,5,10,11"))
    assert b.total == 777_988
    assert b.lora_by_layer == {i: 2 * 12 * (768 + 768) for i in (0, 1, 5, 10, 11)}
    assert b.lora_by_module == {"attention.self.query": 92_160, "attention.self.key": 92_160}
    assert b.head_total == 593_668


@needs_roberta_base
def test_shipped_paper_presets_count_as_documented():
    for name, total in (("paper-lora-only.yaml", 888_580), ("paper-targeted.yaml", 777_988)):
        cfg = load_config(CONFIGS / name, [f"model.name={ROBERTA_BASE}", "model.init=random"])
        b = budget_breakdown(cfg)
        assert b.total == total, name
        check_budget(b, cfg.budget.max_trainable)  # both are within the 1,000,000 budget


@needs_roberta_base
def test_linear_head_and_breakdown_sums():
    b = budget_breakdown(_roberta_base("model.head=linear"))
    assert b.head == {"classifier.out_proj": 3_076} and b.total == 294_912 + 3_076
    b = budget_breakdown(_roberta_base("lora.r=4", "lora.target_modules=all", "lora.layers=[2,3]"))
    assert sum(b.lora_by_layer.values()) == sum(b.lora_by_module.values()) == b.lora
    assert b.total == b.lora + b.head_total
    assert b.lora_by_module == {"attention.self.query": 2 * 4 * 1536, "attention.self.key": 2 * 4 * 1536,
                                "attention.self.value": 2 * 4 * 1536, "attention.output.dense": 2 * 4 * 1536,
                                "intermediate.dense": 2 * 4 * (768 + 3072), "output.dense": 2 * 4 * (3072 + 768)}
    assert b.to_dict()["lora_by_layer"] == {"2": b.lora // 2, "3": b.lora // 2}


@needs_roberta_base
def test_count_matches_peft_and_needs_no_memory():
    model = build_model(_roberta_base(), device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert count_trainable(model).total == model.get_nb_trainable_parameters()[0] == 888_580


def test_mpnet_shapes_count_like_roberta(tmp_path):
    from transformers import MPNetConfig

    MPNetConfig().save_pretrained(tmp_path)  # mpnet-base shapes: config only, no weights
    b = budget_breakdown(load_config(overrides=[f"model.name={tmp_path}", "model.init=random"]))
    assert b.total == 888_580
    assert set(b.lora_by_module) == {"attention.attn.q", "attention.attn.v"}


@needs_roberta_base
@pytest.mark.parametrize("override, message", [
    ("lora.layers=0,12", r"lora.layers: \[12\] do not exist; the model has layers 0..11"),
    ("lora.target_modules=query,qkv", r"lora.target_modules=\['query', 'qkv'\]: qkv matches no Linear layer"),
    ("lora.target_modules=q", r"matches no Linear layer of roberta"),
])
def test_bad_lora_placement_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        budget_breakdown(_roberta_base(override))


@needs_roberta_base
def test_check_budget_refuses_with_the_breakdown():
    b = budget_breakdown(_roberta_base("lora.r=16", "lora.target_modules=query,key,value"))
    assert b.total == 3 * 12 * 16 * 1536 + 593_668
    with pytest.raises(BudgetError) as err:
        check_budget(b, 1_000_000)
    msg = str(err.value)
    assert f"{b.total:,} trainable parameters exceed budget.max_trainable=1,000,000" in msg
    assert "attention.self.key" in msg and "layer 11" in msg and "classifier.dense" in msg
    assert f"EXCEEDS by {b.total - 1_000_000:,}" in msg
    check_budget(b, b.total)  # exactly at the budget fits
    assert "-> fits" in format_breakdown(b, b.total)


# ---------------------------------------------------------------- tiny models with weights


def _tiny_cfg(model_dir, *overrides: str):
    return load_config(overrides=[f"model.name={model_dir}", "lora.r=4", "train.seed=0", *overrides])


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=4)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    return out


def _ids():
    torch.manual_seed(1)
    return torch.randint(3, 99, (3, 12)), torch.ones(3, 12, dtype=torch.long)


def test_bert_family_both_heads(tiny_bert_dir):
    lora = 2 * 2 * 4 * (32 + 32)  # query + value, 2 layers, r=4
    roberta_head = budget_breakdown(_tiny_cfg(tiny_bert_dir, "model.head=roberta"))
    # BERT's pooler (dense + tanh) and classifier play RoBERTa's dense and out_proj.
    assert roberta_head.head == {"pooler.dense": 32 * 32 + 32, "classifier": 32 * 4 + 4}
    assert roberta_head.total == lora + 1056 + 132
    linear = budget_breakdown(_tiny_cfg(tiny_bert_dir, "model.head=linear"))
    assert linear.head == {"classifier": 132} and linear.total == lora + 132

    ids, mask = _ids()
    for head in ("roberta", "linear"):
        model = build_model(_tiny_cfg(tiny_bert_dir, f"model.head={head}")).eval()
        assert count_trainable(model).total == (roberta_head if head == "roberta" else linear).total
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    # The linear head reads the first token's final hidden state: no pooler in between.
    inner = model.base_model.model
    hidden = inner.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    assert torch.allclose(logits, inner.classifier(hidden), atol=1e-6)


def test_pretrained_init_loads_the_folders_weights_and_lora_starts_as_identity(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    model = build_model(_tiny_cfg(tiny_model_dir)).eval()
    ids, mask = _ids()
    ids = ids + 1000  # tiny model: real vocabulary
    # LoRA's B starts at zero and the head comes from the folder: the same function as the base.
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                          plain(input_ids=ids, attention_mask=mask).logits, atol=1e-6)
    random_init = build_model(_tiny_cfg(tiny_model_dir, "model.init=random", "train.seed=1"))
    emb = "base_model.model.roberta.embeddings.word_embeddings.weight"
    assert not torch.equal(dict(random_init.named_parameters())[emb], dict(model.named_parameters())[emb])


def test_roberta_linear_head_reads_the_first_token(tiny_model_dir):
    model = build_model(_tiny_cfg(tiny_model_dir, "model.head=linear")).eval()
    assert count_trainable(model).head == {"classifier.out_proj": 132}
    ids, mask = _ids()
    inner = model.base_model.model
    hidden = inner.roberta(input_ids=ids + 1000, attention_mask=mask).last_hidden_state[:, 0]
    logits = model(input_ids=ids + 1000, attention_mask=mask).logits
    assert torch.allclose(logits, inner.classifier.out_proj(hidden), atol=1e-6)


def test_train_refuses_over_budget_before_loading_data(tiny_model_dir, tmp_path):
    """A config that names its classes (data.labels) is checked before any data is read; one that
    leaves them to the data reads the labels first (the head's size depends on them)."""
    from agnews_lora.train import train

    cfg = _tiny_cfg(tiny_model_dir, f"data.train={tmp_path / 'does-not-exist.csv'}", "budget.max_trainable=1000",
                    "data.labels=[World,Sports,Business,Sci/Tech]", f"out_dir={tmp_path / 'run'}")
    with pytest.raises(BudgetError, match=r"exceed budget.max_trainable=1,000") as err:
        train(cfg)
    assert "Total trainable" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_hub_model_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnreachable) as err:
        budget_breakdown(load_config(overrides=["model.name=agnews-lora-tests/not-a-cached-model"]))
    assert time.monotonic() - start < 10
    assert "agnews-lora-tests/not-a-cached-model" in str(err.value) and "local model folder" in str(err.value)


def test_hub_dataset_offline_fails_fast(monkeypatch, tiny_model_dir, tmp_path):
    from agnews_lora.train import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _tiny_cfg(tiny_model_dir, "data.hub_dataset=agnews-lora-tests/not-a-cached-dataset",
                    f"out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert cfg.data.train == []
    start = time.monotonic()
    with pytest.raises(HubUnreachable) as err:
        train(cfg)
    assert time.monotonic() - start < 10
    assert "dataset 'agnews-lora-tests/not-a-cached-dataset'" in str(err.value)
    assert "set data.train (and data.test) to local files" in str(err.value)


def test_missing_local_model_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name: folder .*nope does not exist"):
        budget_breakdown(load_config(overrides=[f"model.name={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match=r"has no config.json"):
        budget_breakdown(load_config(overrides=[f"model.name={tmp_path}"]))
