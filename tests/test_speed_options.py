"""Speed options keep the recipe: fast dropout is unbiased dropout, frozen-weight casting is
bit-identical under autocast, regional compile keeps checkpoints, epochs reshuffle, and the
training log carries the counters the speed benchmark reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from agnews_lora import data as data_mod
from agnews_lora import speed
from agnews_lora import train as train_mod
from agnews_lora.checkpoint import read_jsonl
from agnews_lora.config import load_config
from agnews_lora.model import build_model, load_tokenizer


def test_fast_dropout_is_unbiased_bernoulli_dropout():
    torch.manual_seed(0)
    x = torch.ones(1_000_003, requires_grad=True)  # odd size: the last 64-bit draw is cut
    y = speed.fast_dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 65536 / (65536 - 6554)))
    assert abs(y.mean().item() - 1.0) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = mask * scale
    assert speed.fast_dropout(x, 0.0) is x
    assert torch.count_nonzero(speed.fast_dropout(x, 1.0)) == 0
    z = speed.fast_dropout(torch.ones(4, 5, 6, dtype=torch.bfloat16), 0.5)
    assert z.shape == (4, 5, 6) and z.dtype == torch.bfloat16 and set(z.unique().tolist()) <= {0.0, 2.0}


def test_fast_dropout_masks_follow_torch_seed():
    x = torch.ones(64, 33)
    torch.manual_seed(3)
    a = speed.fast_dropout(x, 0.3)
    torch.manual_seed(3)
    b = speed.fast_dropout(x, 0.3)
    c = speed.fast_dropout(x, 0.3)  # the generator moved on: a new mask
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_fast_dropout_attention_matches_sdpa_without_drops(mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    mask = None
    if mask_kind != "none":
        keep = torch.ones(2, 1, 7, 7, dtype=torch.bool)
        keep[0, ..., 5:] = False
        mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -1e9)
    module = nn.Module()
    module.is_causal = False
    want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    # A drop probability below 1/65536 takes the math path yet drops nothing: same numbers.
    got, _ = speed.sdpa_fast_dropout_attention(module, q, k, v, mask, dropout=1e-7, scaling=0.3)
    assert got.shape == want.shape == (2, 7, 3, 8)
    assert torch.allclose(got, want, atol=1e-5)


def _tiny_cfg(tiny_model_dir, *extra):
    return load_config(overrides=[f"model.name={tiny_model_dir}", "lora.r=4", *extra])


def test_use_fast_dropout_swaps_every_dropout_and_keeps_eval_outputs(tiny_model_dir):
    cfg = _tiny_cfg(tiny_model_dir)
    stock, fast = build_model(cfg).eval(), build_model(cfg).eval()
    n = speed.use_fast_dropout(fast)
    assert n > 0 and not any(type(m) is nn.Dropout for m in fast.modules())
    assert sum(isinstance(m, speed.FastDropout) for m in fast.modules()) == n
    assert fast.base_model.model.config._attn_implementation == speed.ATTN_IMPLEMENTATION
    ids = torch.randint(3, 1000, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        want = stock(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    fast.train()
    with torch.no_grad():  # training mode drops: outputs now differ from the eval outputs
        assert not torch.equal(fast(input_ids=ids, attention_mask=mask).logits, want)


def test_cast_frozen_linears_is_bit_identical_under_autocast(tiny_model_dir):
    cfg = _tiny_cfg(tiny_model_dir)
    ref, cast = build_model(cfg).eval(), build_model(cfg).eval()
    n = speed.cast_frozen_linears(cast, torch.bfloat16)
    assert n >= 2 * 6  # every frozen Linear of both layers at least
    assert all(p.dtype == torch.float32 for p in cast.parameters() if p.requires_grad)
    assert cast.base_model.model.roberta.embeddings.word_embeddings.weight.dtype == torch.float32
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cast(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_cast_inputs_once_keeps_forward_and_casts_each_shared_input_once(tiny_model_dir):
    cfg = _tiny_cfg(tiny_model_dir, "lora.target_modules=[query,value,dense]")
    ref, hooked = build_model(cfg).eval(), build_model(cfg).eval()
    torch.manual_seed(0)
    for param in ref.parameters():
        if param.requires_grad:  # LoRA B starts at zero: make the adapters count
            param.data.normal_(0, 0.05)
    hooked.load_state_dict(ref.state_dict())
    for m in (ref, hooked):
        speed.cast_frozen_linears(m, torch.bfloat16)
    # 2 attention blocks + LoRA on query, value and the 3 dense layers of each of the 2 layers
    assert speed.cast_inputs_once(hooked) == 2 + 2 * 5
    seen = []
    attention = hooked.base_model.model.roberta.encoder.layer[0].attention.self
    for proj in (attention.query.base_layer, attention.key, attention.query.lora_A["default"]):
        proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = hooked(input_ids=ids).logits, ref(input_ids=ids).logits
    assert seen == [torch.bfloat16] * 3  # one cast upstream, none in peft or autocast
    assert torch.equal(got, want)  # the same casts autocast makes, made once
    plain, fp32 = build_model(cfg).eval(), build_model(cfg).eval()
    plain.load_state_dict(fp32.state_dict())
    speed.cast_inputs_once(fp32)
    with torch.no_grad():  # outside autocast the hooks step aside
        assert torch.equal(fp32(input_ids=ids).logits, plain(input_ids=ids).logits)
    # Gradients: the shared input's three gradients are summed in bf16: close, not identical.
    grads = []
    for m in (ref, hooked):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(input_ids=ids).logits.float().square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
    # measured: max difference 1e-5 of the largest gradient
    assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-3 * grads[0].abs().max().item())


def test_first_token_last_layer_keeps_logits_and_trains(tiny_model_dir):
    cfg = _tiny_cfg(tiny_model_dir)
    ref, fast = build_model(cfg).eval(), build_model(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    keys = list(fast.state_dict())
    assert speed.first_token_last_layer(fast)
    assert list(fast.state_dict()) == keys
    ids = torch.randint(3, 1000, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding must still be masked out of the keys
    encoder = lambda m: m.base_model.model.roberta  # noqa: E731
    seen = []  # a strided [batch, 1, hidden] query input made matmul copy the weight per row
    encoder(fast).encoder.layer[-1].attention.self.query.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].shape, args[0].is_contiguous())))
    with torch.no_grad():
        assert encoder(fast)(input_ids=ids, attention_mask=mask).last_hidden_state.shape == (3, 1, 32)
        want = ref(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(fast(input_ids=ids, attention_mask=mask).logits, want, atol=1e-6)
        assert seen[0] == ((3, 1, 32), True)
        for m in (ref, fast):  # also on the fast-dropout attention path and under autocast
            speed.use_fast_dropout(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(fast(input_ids=ids, attention_mask=mask).logits,
                                  ref(input_ids=ids, attention_mask=mask).logits, atol=1e-2)
    fast.train()
    fast(input_ids=ids, attention_mask=mask).logits.sum().backward()
    lora = [p for n, p in fast.named_parameters() if "lora_" in n and ".layer.1." in n]
    assert lora and all(p.grad is not None for p in lora)
    assert not speed.first_token_last_layer(nn.Sequential(nn.Linear(2, 2)))  # nothing to change


def test_compile_layers_keeps_names_and_outputs(tiny_model_dir):
    cfg = _tiny_cfg(tiny_model_dir)
    ref, compiled = build_model(cfg).eval(), build_model(cfg).eval()
    keys = list(compiled.state_dict())
    assert speed.compile_layers(compiled, backend="eager") == 2
    assert list(compiled.state_dict()) == keys
    ids = torch.randint(3, 1000, (2, 9))
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-6)


def test_train_compile_flag_runs_compiled_layers(tiny_overrides, monkeypatch):
    calls = []
    real = speed.compile_layers

    def compile_eager(model):
        calls.append(real(model, backend="eager"))
        return calls[-1]

    monkeypatch.setattr(speed, "compile_layers", compile_eager)
    # Short: every new guard (train/eval, first layer, ...) retraces the layer.
    overrides = [o for o in tiny_overrides if not o.startswith(("train.max_steps", "train.eval_every", "data.test"))]
    run = train_mod.train(load_config(overrides=overrides + ["train.compile=true", "train.max_steps=2"]))
    assert calls == [2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(read_jsonl(run / "train_log.jsonl")[-1]["loss"])


def test_epochs_reshuffle_and_log_counts_tokens(tiny_overrides, monkeypatch):
    seen = []
    original = data_mod.LengthGroupedSampler.batches

    def spy(self):
        out = original(self)
        if self.shuffle:
            seen.append((self.epoch, out))
        return out

    monkeypatch.setattr(data_mod.LengthGroupedSampler, "batches", spy)
    overrides = [o for o in tiny_overrides if not o.startswith(("train.max_steps", "train.eval_every"))]
    # 360 training rows, batch 64: 6 batches per epoch, 2 epochs.
    run = train_mod.train(load_config(overrides=overrides + ["train.epochs=2", "train.batch_size=64",
                                                             "train.log_every=1", "train.precision=bf16"]))
    epochs = [e for e, _ in seen]
    assert 0 in epochs and 1 in epochs
    first = next(b for e, b in seen if e == 0)
    second = next(b for e, b in seen if e == 1)
    assert first != second  # a fresh order each epoch
    log = read_jsonl(run / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["examples"] == 2 * 360
    assert all(b["tokens"] > a["tokens"] and b["train_seconds"] > a["train_seconds"] for a, b in zip(log, log[1:]))
    cfg = load_config(overrides=overrides)
    train_split, _, _ = data_mod.load_splits(cfg.data, seed=cfg.train.seed)
    ids = data_mod.tokenize(train_split.texts, load_tokenizer(cfg.model.name), cfg.data.max_length)
    assert log[-1]["tokens"] == 2 * sum(len(x) for x in ids)  # real (non-pad) tokens of two epochs
    assert all(np.isfinite(r["loss"]) for r in log)
