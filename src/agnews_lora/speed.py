"""Training speed-ups that keep the recipe: fast CPU dropout, frozen weights stored in the
autocast dtype, one cast per shared input, a last layer computed for the first token only, a
larger oneDNN kernel cache, and optional regional torch.compile.

Each is a named patch behind its own `train.*` flag; `speed_up` applies them and `record_patches`
records in the run folder (speed_patches.json) which were applied and why any was not. Each has a
logits-parity test against the unpatched model on RoBERTa, BERT and MPNet, with SDPA and eager
attention (tests/test_speed_patches.py).

Dropout. torch's CPU dropout draws its mask with a serial `bernoulli_` (one Mersenne-Twister
draw and a float compare per element: ~5.5 ms per 16x64x768 activation on this machine, whatever
the thread count). A LoRA step on a frozen encoder runs about five dropouts per layer
(embeddings, attention probabilities, attention output, FFN output, each LoRA input), so on CPU
the masks cost more time than the matrix products. Here each 64-bit draw makes the masks of four
elements (keep when a 16-bit slice is at or above round(p * 65536) - 32768): ~3x faster per
dropout, ~1.4x per roberta-base step. The keep probability is 1 - round(p * 65536) / 65536 (p
rounded to 1/65536) and survivors are scaled by its inverse, so the layer stays unbiased. The
64-bit draws come from numpy's SFC64 (2-4x faster here than torch's serial Mersenne Twister),
seeded by one draw of torch's generator per call, so `torch.manual_seed` and a checkpointed torch
RNG state still fix every mask. On other devices the stock (fused) dropout runs.

Casts. Under CPU autocast every Linear casts its fp32 input to bf16: an attention block casts
the same hidden states three times (query, key, value), and peft casts a LoRA layer's bf16 input
back to fp32 for the adapter (then autocast casts it to bf16 again, and the adapter's dropout
runs on fp32). `cast_inputs_once` casts each such input once, before the projections, and lets
the adapter take it as it comes; forward values are those autocast computes, the gradients of
the shared input are summed in bf16 before the one cast back.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import types
from dataclasses import dataclass

from pathlib import Path

import numpy as np
import torch
from torch import nn

from agnews_lora import runs
from agnews_lora.config import Config
from agnews_lora.precision import autocast_dtype, resolve_precision

ATTN_IMPLEMENTATION = "sdpa_fast_dropout"
_LEVELS = 1 << 16
KERNEL_CACHE_VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


@dataclass(frozen=True)
class PatchResult:
    """What one speed patch did: applied or not, and what it changed or why it changed nothing."""

    name: str
    applied: bool
    detail: str = ""

    def __bool__(self) -> bool:
        return self.applied

    def to_dict(self) -> dict:
        return {"patch": self.name, "applied": self.applied, "detail": self.detail}


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of `x` with drop probability `p` (rounded to 1/65536), autograd-safe.

    Args:
        x: any tensor (CPU is where this pays).
        p: drop probability in [0, 1].

    Returns:
        x * mask / keep_probability, a new tensor.
    """
    dropped = round(p * _LEVELS)
    if dropped == 0:
        return x
    if dropped >= _LEVELS:
        return x * 0.0
    n = x.numel()
    bits = _random_words((n + 3) // 4, x.device).view(torch.int16)[:n].view(x.shape)
    # bool -> float casts are slow on CPU; the uint8 view of the same bytes casts 5x faster.
    keep = (bits >= dropped - _LEVELS // 2).view(torch.uint8).to(x.dtype)
    return x * keep.mul_(_LEVELS / (_LEVELS - dropped))


def _random_words(n: int, device: torch.device) -> torch.Tensor:
    """`n` uniform random int64 words: numpy SFC64 on CPU, seeded from torch's generator."""
    if device.type != "cpu":  # the excluded top value biases p by < 2**-48
        return torch.empty(n, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


class FastDropout(nn.Dropout):
    """nn.Dropout with `fast_dropout` on CPU in training mode; stock dropout elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu":
            return fast_dropout(x, self.p)
        return super().forward(x)


def sdpa_fast_dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs):
    """transformers attention function: SDPA, except CPU training with attention dropout.

    There SDPA itself falls back to its unfused math path with a serial `bernoulli_`; this
    runs the same math with `fast_dropout`. Signature and return as transformers'
    `sdpa_attention_forward` ([batch, seq, heads, head_dim], None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not (dropout > 0 and query.device.type == "cpu") or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(fast_dropout(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every nn.Dropout of `model` for FastDropout (same p), and route SDPA attention
    through `sdpa_fast_dropout_attention`, in place.

    Args:
        model: a transformers (or peft-wrapped) model.

    Returns:
        The number of dropout modules swapped.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Dropout:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FastDropout(module.p).train(module.training))
            swapped += 1
    _route_attention(model)
    return swapped


def _route_attention(model: nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # transformers' public hook for a custom attention function is a named entry in its
    # process-wide registry. Registering a name changes no model: only those switched to it
    # below (the ones this patch is applied to) use it.
    AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_fast_dropout_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(module, "set_attn_implementation"):
            module.set_attn_implementation(ATTN_IMPLEMENTATION)


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of frozen nn.Linear layers in `dtype`, in place.

    Under autocast every Linear casts its weight to the autocast dtype on each call; storing
    frozen ones in that dtype gives bit-identical results without the per-step casts (and
    halves their memory). Trainable weights (LoRA, head) stay fp32: they are the master copy
    the optimizer updates; a trainable bias of a frozen weight (BitFit) stays fp32 beside it.
    Embeddings and LayerNorms are left alone (autocast does not cast them). Weights an adapter
    reads itself (DoRA's weight norm, computed in its input's dtype) are left alone too.

    Args:
        model: the model to change.
        dtype: the autocast dtype (torch.bfloat16 or torch.float16).

    Returns:
        The number of layers cast.
    """
    cast, read = 0, _weights_read_by_adapters(model)
    for module in model.modules():
        if type(module) is not nn.Linear or module.weight.requires_grad or id(module) in read:
            continue
        if module.bias is not None and module.bias.requires_grad:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
        else:
            module.to(dtype)
        cast += 1
    return cast


def _weights_read_by_adapters(model: nn.Module) -> set[int]:
    """ids of the base Linear layers whose weight a DoRA adapter reads in its forward."""
    from peft.tuners.lora import LoraLayer

    return {id(m.get_base_layer()) for m in model.modules()
            if isinstance(m, LoraLayer) and any(getattr(m, "use_dora", {}).values())}


_QKV_NAMES = ({"query", "key", "value"}, {"q", "k", "v"})  # BERT/RoBERTa, MPNet


def _autocast_dtype(x) -> torch.dtype | None:
    """The autocast dtype when `x` is an fp32 tensor that autocast would cast, else None."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _cast_first_input(module, args, kwargs):
    if args:
        dtype = _autocast_dtype(args[0])
        return None if dtype is None else ((args[0].to(dtype), *args[1:]), kwargs)
    dtype = _autocast_dtype(kwargs.get("hidden_states"))
    return None if dtype is None else (args, {**kwargs, "hidden_states": kwargs["hidden_states"].to(dtype)})


def _disable_peft_input_casting(model: nn.Module) -> None:
    """During each forward of `model`, peft's LoRA layers take their input as it comes
    (`peft.helpers.disable_input_dtype_casting`, entered by a pre-hook, left by a hook that also
    runs when the forward raises)."""
    from peft.helpers import disable_input_dtype_casting

    active = []

    def enter(module, args):
        active.append(disable_input_dtype_casting(model))
        active[-1].__enter__()

    def leave(module, args, output):
        active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def cast_inputs_once_blocker(model: nn.Module) -> str | None:
    """Why `cast_inputs_once` must not be applied to `model`, or None when it may.

    DoRA computes its weight norm in its input's dtype: a bf16 input would round the norm, which
    autocast keeps in fp32. peft's `disable_input_dtype_casting` reads a switch that some tuner
    layers do not have (IA3, VeRA in peft 0.21) and fails on them."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and any(getattr(module, "use_dora", {}).values()):
            return "DoRA computes its weight norm in its input's dtype, which a bf16 input would round"
        if isinstance(module, BaseTunerLayer) and not hasattr(module, "cast_input_dtype_enabled"):
            return (f"peft's disable_input_dtype_casting does not support {type(module).__module__.split('.')[-2]} "
                    "layers (they have no cast_input_dtype_enabled switch)")
    return None


def cast_inputs_once(model: nn.Module) -> int:
    """Under autocast, cast the input of each attention block (the module holding the
    query/key/value or q/k/v projections) and of each LoRA layer to the autocast dtype once,
    in place: forward pre-hooks that do nothing outside autocast or on non-fp32 inputs. During
    the model's forward, LoRA layers also skip peft's cast of their input to the adapter's fp32
    (autocast casts it anyway), through peft's `disable_input_dtype_casting`.

    The residual paths keep their fp32 inputs: the hooks change only what the projections see.

    Args:
        model: a transformers (or peft-wrapped) model.

    Returns:
        The number of hooked modules.
    """
    from peft.tuners.lora import LoraLayer

    hooked = 0
    for module in model.modules():
        children = {name for name, _ in module.named_children()}
        if isinstance(module, LoraLayer) or any(names <= children for names in _QKV_NAMES):
            module.register_forward_pre_hook(_cast_first_input, with_kwargs=True)
            hooked += 1
    if hooked:
        _disable_peft_input_casting(model)
    return hooked


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder's layers in order (modules named ...encoder.layer.<i>)."""
    return [m for name, m in model.named_modules() if re.search(r"encoder\.layer\.\d+$", name)]


def _first_token_layer_forward(self, hidden_states, attention_mask=None, *args, eager_attention=None, cache=None,
                               **kwargs):
    """A BERT/RoBERTa encoder layer's forward for the first token only: keys and values from
    every token (after a key/value cache's, which prefix tuning fills with its prefix), the query,
    attention output, FFN and norms for token 0. Returns [batch, 1, hidden].
    `eager_attention` is the layer's own modeling module's eager attention function."""
    attention, sa = self.attention, self.attention.self
    dtype = _autocast_dtype(hidden_states)
    x = hidden_states if dtype is None else hidden_states.to(dtype)  # one cast for q, k and v
    batch, length = x.shape[:2]
    heads = (batch, length, -1, sa.attention_head_size)
    # contiguous: a strided [batch, 1, hidden] input makes matmul expand the weight per row (bmm)
    query = sa.query(x[:, :1].contiguous()).view(batch, 1, -1, sa.attention_head_size).transpose(1, 2)
    key = sa.key(x).view(heads).transpose(1, 2)
    value = sa.value(x).view(heads).transpose(1, 2)
    if cache is not None:  # as the layer's own attention does: the cached keys/values come first
        key, value = getattr(cache, "self_attention_cache", cache).update(key, value, sa.layer_idx)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] != 1:
        attention_mask = attention_mask[:, :, :1]
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # As transformers' own layers look it up: "eager" is not in the registry but the default.
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention)
    context, _ = interface(sa, query, key, value, attention_mask, dropout=sa.dropout.p if sa.training else 0.0,
                           scaling=sa.scaling)
    first = attention.output(context.reshape(batch, 1, -1).contiguous(), hidden_states[:, :1])
    return self.output(self.intermediate(first), first)


def first_token_last_layer(model: nn.Module) -> PatchResult:
    """Make the last encoder layer compute the first token's output only, in place.

    Every head here reads only the first token (<s>/[CLS]) of the last layer, so that layer needs
    the keys and values of all tokens but the query, attention output, feed-forward and norms of
    token 0 alone: on roberta-base that skips ~7% of a step's matrix products (~14% of MiniLM-L6's),
    forward and backward, with the same logits (up to rounding: [batch, 1] products instead of
    rows of [batch, length] ones). The model's last hidden state becomes [batch, 1, hidden].
    Parameter names do not change. transformers has no hook for a layer's forward, so the last
    layer's `forward` is replaced: only for BERT/RoBERTa-style layers (attention.self with
    query/key/value, attention.output, intermediate, output) whose modeling module defines
    `eager_attention_forward` (transformers' attention interface); anything else (MPNet's
    relative-position attention, decoders) is left as it is, with the reason in the result.

    Args:
        model: a transformers (or peft-wrapped) encoder classifier.

    Returns:
        A PatchResult, true when the last layer was changed.
    """
    name = "first_token_last_layer"
    layers = _encoder_layers(model)
    if not layers:
        return PatchResult(name, False, "no encoder layers (modules named ...encoder.layer.<i>)")
    last = layers[-1]
    sa = getattr(getattr(last, "attention", None), "self", None)
    needed = ("query", "key", "value", "attention_head_size", "scaling", "dropout", "config")
    if (sa is None or not all(hasattr(sa, n) for n in needed)
            or not all(hasattr(last, n) for n in ("intermediate", "output"))):
        return PatchResult(name, False, f"the last layer ({type(last).__name__}) is not a BERT/RoBERTa-style "
                                        "layer (attention.self.query/key/value, intermediate, output)")
    if getattr(last, "is_decoder", False):
        return PatchResult(name, False, "the model is a decoder: every token's output is needed")
    eager = getattr(sys.modules.get(type(sa).__module__), "eager_attention_forward", None)
    if eager is None:
        return PatchResult(name, False, f"{type(sa).__module__} has no eager_attention_forward "
                                        "(not on transformers' attention interface)")
    last.forward = types.MethodType(functools.partial(_first_token_layer_forward, eager_attention=eager), last)
    return PatchResult(name, True, f"layer {len(layers) - 1} ({type(last).__name__}, "
                                   f"{sa.config._attn_implementation} attention)")


def set_kernel_cache(capacity: int) -> PatchResult:
    """Raise oneDNN's kernel cache to `capacity` kernels for this process, unless already set.

    bf16 matrix products on CPU run oneDNN kernels built for each shape (2-6 ms per build on the
    2-core dev machine, against 0.1-2 ms per call), kept in a cache of 1,024 by default. A training
    run meets about 26 kernel shapes per batch width and, on AG News, 65-100 widths: the default
    cache thrashes and kernels are rebuilt step after step (benchmarks/kernel_cache.py: 1.25x).
    oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY once, when the process builds its first kernel,
    so this is process-wide and works only before the first bf16 product; entry points call it
    (`train`, the CLI), never an import. A value already in the environment wins.

    Args:
        capacity: kernels to keep; 0 leaves oneDNN's default.

    Returns:
        A PatchResult saying whether the capacity is now set, and to what.
    """
    name = "kernel_cache"
    given = os.environ.get(KERNEL_CACHE_VAR)
    if capacity == 0:
        return PatchResult(name, False, "train.kernel_cache=0: oneDNN's default")
    if given is not None and given != str(capacity):
        return PatchResult(name, False, f"{KERNEL_CACHE_VAR}={given} was already set in the environment (it wins)")
    os.environ[KERNEL_CACHE_VAR] = str(capacity)
    return PatchResult(name, True, f"{KERNEL_CACHE_VAR}={capacity}")


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """Regional torch.compile: compile each encoder layer in place, with dynamic shapes.

    The layers share one compiled graph (plus variants, e.g. for the first layer, whose input
    needs no gradient), so compiling takes far less than compiling the whole model, and the
    in-place `Module.compile` keeps parameter names, so checkpoints do not change.

    Args:
        model: a transformers (or peft-wrapped) encoder model.
        backend: the torch.compile backend.

    Returns:
        The number of layers compiled.
    """
    layers = _encoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


# ---------------------------------------------------------------- applying them to a run


def speed_up(model, cfg: Config, accelerator) -> list[PatchResult]:
    """Same recipe, less time: apply the speed patches that `cfg.train` switches on.

    Args:
        model: the model `build_model` returned, before `accelerator.prepare`.
        cfg: the run's config (train.kernel_cache, first_token_last_layer, fast_dropout,
            cast_frozen_linears, cast_inputs_once, compile).
        accelerator: the run's Accelerator (its device and mixed precision).

    Returns:
        One PatchResult per patch, in the order applied: what it changed, or why it did not
        apply (its flag is off, or the device, precision or architecture does not allow it).
    """
    t, cpu = cfg.train, accelerator.device.type == "cpu"
    dtype = autocast_dtype(resolve_precision(accelerator.mixed_precision, accelerator.device))
    expected: list[PatchResult] = []  # skipped by the run's own settings (flag, device, precision)

    def off(name: str, why: str) -> PatchResult:
        expected.append(PatchResult(name, False, why))
        return expected[-1]

    flag_off = lambda name: off(name, f"train.{name}=false")  # noqa: E731
    results = [set_kernel_cache(t.kernel_cache) if cpu else off("kernel_cache", "not a CPU run")]
    results.append(first_token_last_layer(model) if t.first_token_last_layer else flag_off("first_token_last_layer"))
    if not t.fast_dropout:
        results.append(flag_off("fast_dropout"))
    else:
        results.append(_fast_dropout(model) if cpu else off("fast_dropout", "not a CPU run: torch's fused dropout"))
    if not t.cast_frozen_linears:
        results.append(flag_off("cast_frozen_linears"))
    else:
        results.append(_counted("cast_frozen_linears", cast_frozen_linears(model, dtype), "frozen Linear layers")
                       if dtype else off("cast_frozen_linears", "no autocast (fp32)"))
    if not t.cast_inputs_once:
        results.append(flag_off("cast_inputs_once"))
    elif dtype and cpu and cast_inputs_once_blocker(model):
        results.append(off("cast_inputs_once", f"peft.method={cfg.peft.method}: {cast_inputs_once_blocker(model)}"))
    else:
        results.append(_counted("cast_inputs_once", cast_inputs_once(model), "attention blocks and LoRA layers")
                       if dtype and cpu else off("cast_inputs_once", "only under CPU autocast"))
    results.append(_counted("compile", compile_layers(model), "encoder layers") if t.compile else flag_off("compile"))
    for r in results:  # say only what the settings do not explain (speed_patches.json has all)
        if not r.applied and not any(r is e for e in expected):
            accelerator.print(f"speed patch {r.name} not applied: {r.detail}")
    return results


def _counted(name: str, count: int, what: str) -> PatchResult:
    return PatchResult(name, count > 0, f"{count} {what}" if count else f"no {what} in the model")


def _fast_dropout(model) -> PatchResult:
    swapped = use_fast_dropout(model)
    impl = getattr(model.config, "_attn_implementation", None)
    note = "" if impl == ATTN_IMPLEMENTATION else f"; {impl} attention keeps torch's attention-probability dropout"
    return PatchResult("fast_dropout", swapped > 0, f"{swapped} dropout modules, {impl} attention{note}")


def record_patches(run_dir: Path, patches: list[PatchResult], accelerator) -> None:
    """Write what `speed_up` did to RUN_DIR/speed_patches.json (main process)."""
    if accelerator.is_main_process:
        runs.write_speed_patches(run_dir, [p.to_dict() for p in patches])
