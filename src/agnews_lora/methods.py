"""PEFT methods at work: their peft configs, sizes, BitFit, merging, and what training needs.

What each method is (its options, size option, placement, peft config builder) is its entry in
registry.py; the sets here (MERGEABLE, PLACED, SIZE_KEYS, NAMES, ...) are views of it. model.py
builds the backbone and calls `peft_config` for every method peft implements; BitFit (biases
only) is no peft method: `apply_bitfit` unfreezes the backbone's biases and the head. The planner
(plan.py) and the experiment scripts change a method's size through `with_size`.

Two things here exist because of the libraries' versions (peft 0.21, transformers 5):
- Prefix tuning: peft hands the prefix to the model as `past_key_values` and first checks the
  model's forward signature for that name; transformers 5 renamed the argument to `cache`
  (RoBERTa/BERT still take the prefix keys/values through it). `accept_past_key_values` gives
  the classifier a forward that takes the old name and passes it on as `cache`. Architectures
  whose attention takes no cache at all (MPNet) cannot do prefix tuning: `check_prefix_support`.
- AdaLoRA: its rank allocation runs only when the loop calls `update_and_allocate` after each
  optimizer step, and its orthogonality penalty is added by peft only when labels go through
  peft's forward, which this tool's loop does not do (losses.py computes the loss from the
  logits). `AdaLoraSteps` does both, keeps the allocator's state in `last/` for resuming, and
  reports the ranks it allocated.
"""

from __future__ import annotations

import copy
import inspect
import types

import torch
from torch import nn

from agnews_lora.config import Config
from agnews_lora.errors import ConfigError
from agnews_lora.registry import METHODS
from agnews_lora.losses import orthogonality_penalty

# Views of the registry (registry.py: one entry per method), for the code that asks one question.
MERGEABLE = frozenset(n for n, m in METHODS.items() if m.mergeable)  # peft folds it into the weights
PROMPT_LEARNING = frozenset(n for n, m in METHODS.items() if m.virtual_tokens)
PLACED = frozenset(n for n, m in METHODS.items() if m.placed)  # on lora.target_modules / lora.layers
SIZE_KEYS = {n: m.size_key for n, m in METHODS.items()}  # the option that sets its size (None: fixed)
SMALLEST_SIZE = {n: m.smallest_size for n, m in METHODS.items()}
NAMES = {n: m.title for n, m in METHODS.items()}
# The largest value of any size option: far past every encoder's width (no useful setting is refused,
# and the planner searches up to it); beyond it a real build needs gigabytes per adapted module and,
# from about 1e16, even a meta tensor's element count overflows.
MAX_SIZE = 1 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes (VeRA's projection_prng_key)


def with_size(cfg: Config, size: int) -> Config:
    """A copy of `cfg` with its method's size option set to `size` (ValueError for a method without one)."""
    key = SIZE_KEYS[cfg.peft.method]
    if key is None:
        raise ValueError(f"peft.method={cfg.peft.method} has no size option")
    c = copy.deepcopy(cfg)
    obj = c
    *parents, leaf = key.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, leaf, size)
    if cfg.peft.method == "adalora":  # the target rank follows the initial one in the same proportion
        a = cfg.peft.adalora
        c.peft.adalora.target_r = max(1, min(size - 1, round(size * a.target_r / a.init_r)))
    return c


def size_of(cfg: Config) -> int | None:
    """The value of the method's size option (None for a method without one)."""
    key = SIZE_KEYS[cfg.peft.method]
    if key is None:
        return None
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check_sizes(cfg: Config) -> None:
    """Raise ConfigError when the method's size option exceeds MAX_SIZE or VeRA's projection_prng_key
    is no 64-bit seed: before peft builds anything (it would fail with an overflow traceback)."""
    size, key = size_of(cfg), SIZE_KEYS[cfg.peft.method]
    if size is not None and size > MAX_SIZE:
        raise ConfigError(f"{key}={size:,} is beyond any useful size; use at most {MAX_SIZE:,} (most methods gain "
                          "nothing past the backbone's width, e.g. 768 for roberta-base)")
    seed = cfg.peft.vera.projection_prng_key
    if cfg.peft.method == "vera" and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"peft.vera.projection_prng_key={seed} is not a 64-bit seed; use an integer in "
                          f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}] (e.g. 0)")


def describe(cfg: Config) -> str:
    """One line: the method and the options it uses (placement included)."""
    entry, lora = METHODS[cfg.peft.method], cfg.lora
    layers = "all" if lora.layers is None else ",".join(map(str, lora.layers))
    place = f", modules={','.join(lora.target_modules)}, layers={layers}" if entry.placed else ""
    return f"{entry.title} {entry.describe(cfg)}{place}"


# ---------------------------------------------------------------- building


def peft_config(cfg: Config, target: str | None, feedforward: str | None, modules_to_save: list[str],
                meta: bool):
    """The peft config of cfg.peft.method (not bitfit).

    Args:
        cfg: the resolved config.
        target: the target_modules regex of the placement (methods in PLACED).
        feedforward: IA3's feedforward_modules regex (None: none of the targets).
        modules_to_save: the head modules peft trains and saves.
        meta: the model lives on the meta device (counting only): initialisations that read
            weights or tokenizers are skipped; the parameter count does not depend on them.

    Returns:
        A peft config for `get_peft_model`.

    Raises:
        ConfigError: a size option or VeRA's seed out of range (`check_sizes`).
    """
    check_sizes(cfg)
    build = METHODS[cfg.peft.method].build
    if build is None:
        raise ValueError(f"peft.method={cfg.peft.method} is not a peft method")
    common = {"task_type": "SEQ_CLS", "modules_to_save": modules_to_save}
    return build(cfg, target=target, feedforward=feedforward, common=common, meta=meta)


def apply_bitfit(model: nn.Module, head_modules: list[str]) -> nn.Module:
    """BitFit in place: train every bias of the backbone and the whole head, freeze the rest.

    Args:
        model: a transformers classifier with its head attached (model.attach_head).
        head_modules: the head's module names ("classifier", and "pooler" for BERT's RoBERTa-shaped head).

    Returns:
        The model.
    """
    prefix = model.base_model_prefix
    for name, param in model.named_parameters():
        in_head = any(name.startswith(f"{h}.") or name.startswith(f"{prefix}.{h}.") for h in head_modules)
        param.requires_grad_(in_head or (name.startswith(f"{prefix}.") and name.endswith(".bias")))
    return model


def check_prefix_support(model: nn.Module) -> None:
    """Raise ConfigError when the backbone's forward takes no key/value cache to put a prefix in."""
    backbone = getattr(model, model.base_model_prefix)
    params = inspect.signature(backbone.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise ConfigError(f"peft.method=prefix: {model.config.model_type}'s attention takes no past keys and values "
                          f"(transformers' {type(backbone).__name__} has no cache argument), so prefix tuning has "
                          "nowhere to put its prefix; use peft.method=prompt (virtual input tokens) instead")


def accept_past_key_values(model: nn.Module) -> nn.Module:
    """Give `model` (in place) a forward that takes peft's `past_key_values` and passes it on as
    transformers 5's `cache` (see the module docstring). Returns the model."""
    params = inspect.signature(model.forward).parameters
    if "past_key_values" in params:
        return model  # a transformers version that still names it so

    def forward(self, *args, past_key_values=None, **kwargs):
        return type(self).forward(self, *args, cache=past_key_values, **kwargs)

    model.forward = types.MethodType(forward, model)  # a bound method: deepcopy rebinds it to the copy
    return model


def merge(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapters folded into its weights (`merge_and_unload`).

    peft 0.21's generic unloading (IA3, VeRA, LoHa, LoKr; LoRA has its own) copies `.weight` from
    each module it unwraps and fails on a trained head without one (the RoBERTa and linear heads,
    BERT's pooler: "'RobertaClassificationHead' object has no attribute 'weight'"; peft PR 3213).
    So the trained heads are put in their place first, as the unloading would, then peft merges.

    Args:
        model: a peft model of a method in MERGEABLE.

    Returns:
        The merged model (the peft model is used up).
    """
    from peft.utils import ModulesToSaveWrapper

    inner = model.get_base_model()
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent) if parent else inner, child,
                    module.modules_to_save[module.active_adapter])
    return model.merge_and_unload()


# ---------------------------------------------------------------- AdaLoRA in the loop


class AdaLoraSteps:
    """What AdaLoRA needs from the training loop, for a peft AdaLoRA model (unwrapped).

    `start(total_steps)` once the run knows its optimizer steps; `penalty()` added to each loss;
    `after_step(step)` after each optimizer step (before the gradients are cleared); `state_dict`
    / `load_state_dict` for `last/`; `ranks()` for the summary.
    """

    def __init__(self, model: nn.Module, cfg: Config):
        self.model = model
        self.tuner = model.base_model  # AdaLoraModel: owns update_and_allocate and the rank allocator
        self.config = model.peft_config["default"]
        self.weight = cfg.peft.adalora.orth_reg_weight

    def start(self, total_steps: int) -> None:
        """Set AdaLoRA's total_step to the run's, after checking that its schedule has a phase that
        allocates ranks (config.py checks this before anything loads when train.max_steps is set)."""
        a = self.config
        if a.tinit >= total_steps - a.tfinal:
            raise ConfigError(f"peft.adalora.tinit={a.tinit} and tfinal={a.tfinal} leave no rank allocation phase in "
                              f"{total_steps} optimizer steps (need tinit < steps - tfinal)")
        self.tuner.rankallocator.set_total_step(total_steps)

    def penalty(self) -> torch.Tensor | float:
        """orth_reg_weight x the orthogonality penalty of the singular vectors (losses.py)."""
        if self.weight == 0:
            return 0.0
        left = [p for n, p in self.model.named_parameters() if ".lora_A." in n and p.requires_grad]
        right = [p for n, p in self.model.named_parameters() if ".lora_B." in n and p.requires_grad]
        return self.weight * orthogonality_penalty(left, right)

    def after_step(self, step: int) -> None:
        """peft's rank allocation for optimizer step `step` (1-based): update the importance scores,
        mask singular values to the scheduled budget, fix the final ranks."""
        self.tuner.update_and_allocate(step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The allocator's importance averages and the rank pattern, as tensors (safetensors-ready)."""
        allocator = self.tuner.rankallocator
        out = {}
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            out.update({f"{kind}/{n}": t.detach().contiguous() for n, t in getattr(allocator, kind).items()})
        for n, keep in (self.config.rank_pattern or {}).items():
            out[f"rank_pattern/{n}"] = torch.tensor(keep, dtype=torch.bool)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        allocator = self.tuner.rankallocator
        for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, kind, {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{kind}/")})
        pattern = {k.split("/", 1)[1]: v.tolist() for k, v in state.items() if k.startswith("rank_pattern/")}
        self.config.rank_pattern = pattern or None

    def ranks(self) -> dict[str, int]:
        """Rank per adapted module now: its singular values not masked to zero (lora_E entries)."""
        return {n.replace(".lora_E.default", ""): int(torch.count_nonzero(p.detach()))
                for n, p in self.model.named_parameters() if ".lora_E." in n}


def adalora_steps(model: nn.Module, cfg: Config) -> AdaLoraSteps | None:
    """An AdaLoraSteps for an AdaLoRA run's (unwrapped) model, None for every other method."""
    return AdaLoraSteps(model, cfg) if cfg.peft.method == "adalora" else None


def at_initial_ranks(model: nn.Module):
    """Context for saving and loading an AdaLoRA adapter at its initial ranks (pruned singular
    values are zeros), so that it loads back into the training model and with plain
    `PeftModel.from_pretrained`.

    With a rank pattern in its config, peft cuts the saved tensors to it, and loading into a model
    resizes that model's modules to it: the optimizer would hold the old parameters, and a
    checkpoint of an earlier pattern would not fit. The zeroed entries make both forms compute
    the same. Other methods: no change.
    """
    import contextlib

    configs = [c for c in getattr(model, "peft_config", {}).values() if str(c.peft_type.value) == "ADALORA"]
    saved = [c.rank_pattern for c in configs]

    @contextlib.contextmanager
    def block():
        for c in configs:
            c.rank_pattern = None
        try:
            yield
        finally:
            for c, pattern in zip(configs, saved):
                c.rank_pattern = pattern

    return block()
