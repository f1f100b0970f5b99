"""Build backbone + LoRA + head; count trainable parameters exactly; enforce the budget."""

from __future__ import annotations

import logging
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from agnews_lora import lora_init, methods
from agnews_lora.config import Config, ConfigError, class_count, class_names, require_class_count
from agnews_lora.data import resolve_labels
from agnews_lora.errors import BudgetError
from agnews_lora.registry import METHODS
from agnews_lora.hub import resolve_model_path  # noqa: F401  (re-exported: where a model comes from)

# Canonical module names (RoBERTa's) -> path inside one encoder layer, per architecture.
_BERT_LIKE = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
}
_MPNET = {
    "query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
    "attn_out": "attention.attn.o", "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
}
MODULE_PATHS = {"roberta": _BERT_LIKE, "xlm-roberta": _BERT_LIKE, "bert": _BERT_LIKE,
                "camembert": _BERT_LIKE, "electra": _BERT_LIKE, "mpnet": _MPNET}
# "dense" means every dense projection of a layer, as people say it for RoBERTa.
GROUPS = {"dense": ["attn_out", "ffn_in", "ffn_out"], "attention": ["query", "key", "value", "attn_out"],
          "all": ["query", "key", "value", "attn_out", "ffn_in", "ffn_out"]}




# ---------------------------------------------------------------- loading


@contextmanager
def quiet_logger(name: str):
    """Raise a logger's level to ERROR for the duration (library progress and advice lines)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@contextmanager
def _without_records(name: str, text: str):
    """Drop the records of one logger whose message contains `text`, for the duration."""
    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    log = logging.getLogger(name)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@contextmanager
def peft_notes_silenced():
    """peft's model wrapper reads a transformers attribute that transformers deprecates: a
    FutureWarning on every model built or loaded that no user of this tool can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        # lora.init=eva: advice for models too large to hold twice; LoRA-GA's gradient pass: torch's note
        # that the frozen inputs get no gradient (the weights' gradients are what it collects)
        warnings.filterwarnings("ignore", message=r".*eva initialization used with low_cpu_mem_usage", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Full backward hook is firing when gradients are computed",
                                category=UserWarning)
        yield


# The head's weights: new (or restored from the run) when a pretrained encoder is loaded, so their
# absence from the encoder's checkpoint is expected. BERT's pooler belongs to the head here.
_HEAD_PREFIXES = ("classifier.", "score.", "pooler.", "bert.pooler.")


def load_pretrained(name: str, config):
    """The pretrained encoder with its sequence-classification head, without transformers' load
    report: that report calls the head MISSING and newly initialized, which is expected (train
    initializes it, a run restores it). Encoder weights missing from the checkpoint are not
    expected: they are named in a warning."""
    from transformers import AutoModelForSequenceClassification

    # A filter, not a higher level: transformers checks a tensor-parallel plan (and warns) when this
    # logger's level is raised.
    with _without_records("transformers.modeling_utils", "LOAD REPORT"):
        # a checkpoint with a head for other classes (a fine-tuned model) has head weights of
        # other shapes: the head is new here anyway
        model, info = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(name), config=config, output_loading_info=True, ignore_mismatched_sizes=True)
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    missing = [k for k in [*info.get("missing_keys", []), *mismatched] if not k.startswith(_HEAD_PREFIXES)
               and not k.split(".", 1)[-1].startswith(_HEAD_PREFIXES)]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        warnings.warn(f"model.name={name}: {len(missing)} encoder weights are not in the checkpoint and were "
                      f"initialized at random ({shown}); the encoder is not the pretrained one", stacklevel=3)
    return model



def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def load_backbone_config(name: str, num_labels: int, names: list[str] | None = None):
    """The backbone's transformers config with a `num_labels`-class head; `names` (class names by
    label id) become its id2label/label2id, so that a merged or ONNX export names its classes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name), num_labels=num_labels)
    if names and len(names) == num_labels:
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
    return config


# Models whose position ids start after the padding index (fairseq style): positions 0..pad are
# never used for tokens.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text")


def position_limit(config) -> int | None:
    """The longest sequence (special tokens included) the model's position embeddings cover."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def virtual_tokens(cfg: Config) -> int:
    """Positions that prompt or prefix tuning put before every input's tokens (0 for other methods)."""
    entry = METHODS[cfg.peft.method]
    return methods.size_of(cfg) if entry.virtual_tokens else 0


def check_max_length(cfg: Config) -> None:
    """Raise ConfigError when data.max_length (plus the virtual tokens of prompt or prefix tuning,
    which take positions before the input's) exceeds the backbone's positions: before training,
    not as an indexing error inside transformers at the first long batch."""
    limit = position_limit(load_backbone_config(cfg.model.name, class_count(cfg) or 2))  # positions only
    extra = virtual_tokens(cfg)
    if limit is not None and cfg.data.max_length + extra > limit:
        if extra:
            key = METHODS[cfg.peft.method].size_key
            raise ConfigError(f"data.max_length={cfg.data.max_length} + {key}={extra} exceeds what {cfg.model.name} "
                              f"can read ({limit} positions); keep their sum <= {limit}")
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds what {cfg.model.name} can read "
                          f"({limit} positions); use data.max_length<={limit}")


class FirstTokenLinearHead(nn.Module):
    """The lean head: dropout on the first token's (<s>/[CLS]) final hidden state, one Linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.out_proj(self.dropout(features[:, 0, :]))


class FirstToken(nn.Module):
    """Stands in for BERT's pooler: returns the first token's hidden state, no parameters."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0]


def _head_kind(model: nn.Module) -> str:
    clf = getattr(model, "classifier", None)
    if clf is not None and hasattr(clf, "dense") and hasattr(clf, "out_proj"):
        return "roberta-style"
    backbone = getattr(model, model.base_model_prefix, None)
    if isinstance(clf, nn.Linear) and getattr(backbone, "pooler", None) is not None:
        return "bert-style"
    raise ConfigError(f"model.name: unsupported architecture {type(model).__name__}: expected a "
                      "RoBERTa/MPNet-style (classifier.dense + out_proj) or BERT-style (pooler + classifier) head")


def attach_head(model: nn.Module, head: str, pooled_dropout: float) -> list[str]:
    """Shape the classification head in place; return the module names peft must train and save."""
    kind = _head_kind(model)
    if head == "roberta":
        if kind == "roberta-style":
            model.classifier.dropout.p = pooled_dropout
        else:
            model.dropout.p = pooled_dropout
        # BERT's pooler (dense + tanh) + classifier is the same shape as RoBERTa's dense + out_proj.
        return ["classifier"] if kind == "roberta-style" else ["pooler", "classifier"]
    hidden, labels = model.config.hidden_size, model.config.num_labels
    if kind == "roberta-style":
        with torch.device(next(model.parameters()).device):
            model.classifier = FirstTokenLinearHead(hidden, labels, pooled_dropout)
    else:
        getattr(model, model.base_model_prefix).pooler = FirstToken()
        model.dropout = nn.Dropout(pooled_dropout)
    return ["classifier"]


def lora_target_regex(model_type: str, modules: list[str], layers: list[int] | None, num_layers: int) -> str:
    """The peft `target_modules` regex for the chosen modules in the chosen encoder layers."""
    paths = MODULE_PATHS.get(model_type, _BERT_LIKE)
    names: list[str] = []
    for m in modules:
        names += GROUPS.get(m, [m])
    resolved = []
    for m in dict.fromkeys(names):
        resolved.append(re.escape(paths.get(m, m)))
    if layers is not None:
        bad = [i for i in layers if i >= num_layers]
        if bad:
            raise ConfigError(f"lora.layers: {bad} do not exist; the model has layers 0..{num_layers - 1}")
        layer_re = "|".join(str(i) for i in sorted(set(layers)))
    else:
        layer_re = r"\d+"
    return rf"(?:.*\.)?encoder\.layer\.({layer_re})\.({'|'.join(resolved)})"


def build_model(cfg: Config, device: str | torch.device = "cpu", with_lora: bool = True,
                init_data: Iterable[dict] | None = None) -> nn.Module:
    """Backbone (pretrained or random from config.json) + head + the adapters of cfg.peft.method, seeded.

    Args:
        cfg: the resolved config (model.*, lora.*, peft.*, train.seed are used).
        device: "meta" builds shapes only, for exact parameter counts without weights.
        with_lora: False returns the backbone with its head and no adapters (for loading
            a saved adapter with `PeftModel.from_pretrained`, or BitFit's saved biases).
        init_data: batches of training rows (input_ids, attention_mask, labels on `device`) for the
            initialisations that read data (lora.init eva, corda, lora_ga); not read by the others.

    Returns:
        A peft model (BitFit: the transformers model with only its biases and head trainable; or
        the bare model when with_lora is False).
    """
    from transformers import AutoModelForSequenceClassification

    if not class_count(cfg):
        cfg = resolve_labels(cfg)  # the head's size: the classes of the training data
    config = load_backbone_config(cfg.model.name, require_class_count(cfg), class_names(cfg))
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init == "random" or str(device) == "meta":
        with torch.device(device):
            model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = load_pretrained(cfg.model.name, config).to(device)
    modules_to_save = attach_head(model, cfg.model.head, cfg.model.pooled_dropout)
    if cfg.peft.method == "prefix":
        methods.check_prefix_support(model)
        methods.accept_past_key_values(model)
    if not with_lora:
        return model
    with peft_notes_silenced():
        return add_adapters(model, cfg, modules_to_save, meta=str(device) == "meta", init_data=init_data)


def add_adapters(model: nn.Module, cfg: Config, modules_to_save: list[str], meta: bool = False,
                 init_data: Iterable[dict] | None = None) -> nn.Module:
    """Put cfg.peft.method's adapters on `model` (peft), or unfreeze its biases (bitfit); LoRA's
    initialisations that read data get `init_data` (lora_init.py)."""
    from peft import get_peft_model

    method = cfg.peft.method
    if METHODS[method].build is None:  # BitFit: no peft adapters, the backbone's own biases
        return methods.apply_bitfit(model, modules_to_save)
    target = feedforward = None
    if method in methods.PLACED:
        target = _placement_regex(model, cfg, cfg.lora.target_modules, key="lora.target_modules")
        if method == "ia3":
            feedforward = _ia3_feedforward(model, cfg)
    config = methods.peft_config(cfg, target=target, feedforward=feedforward, modules_to_save=modules_to_save,
                                 meta=meta)
    # peft creates new adapter tensors (VeRA's shared projections, LoRA's A/B, prompt embeddings) on
    # the default device and only then moves them beside their layer: for a meta count that default
    # must be meta too, or counting allocates memory in proportion to the size options.
    init = "kaiming" if meta else lora_init.init_of(cfg)
    batches = lora_init.check_batches(init, init_data)
    lora_init.prepare(model, config, init=init, batches=batches)  # CorDA, LoRA-GA: before the adapters exist
    with torch.device("meta") if meta else nullcontext():
        model = get_peft_model(model, config)
    lora_init.finish(model, init=init, batches=batches)  # EVA: after
    if method == "adalora":
        # AdaLoRA's rank counter is a frozen Parameter; moved to the meta device it comes back
        # trainable, and a meta count would exceed the real model's by one per adapted module.
        for name, param in model.named_parameters():
            if ".ranknum." in name:
                param.requires_grad_(False)
    return model


def _placement_regex(model: nn.Module, cfg: Config, modules: list[str], key: str) -> str:
    """The target_modules regex of `modules` in lora.layers, each name checked to match a Linear."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    regex = lambda names: lora_target_regex(model.config.model_type, names, cfg.lora.layers,  # noqa: E731
                                            model.config.num_hidden_layers)
    # Checked name by name: one typo among several names would otherwise be dropped silently.
    unmatched = [m for m in modules if not any(re.fullmatch(regex([m]), n) for n in linears)]
    if unmatched:
        example = next(n for n in linears if ".layer.0." in n)
        raise ConfigError(f"{key}={modules}: {', '.join(unmatched)} matches no "
                          f"Linear layer of {model.config.model_type}; use query,key,value,attn_out,ffn_in,"
                          f"ffn_out,dense or a path such as '{example.split('.layer.0.')[1]}'")
    return regex(modules)


def _ia3_feedforward(model: nn.Module, cfg: Config) -> str | None:
    """IA3's feedforward_modules: those of peft.ia3.feedforward_modules that lora.target_modules places."""
    paths = MODULE_PATHS.get(model.config.model_type, _BERT_LIKE)
    expand = lambda names: {paths.get(n, n) for m in names for n in GROUPS.get(m, [m])}  # noqa: E731
    wanted = cfg.peft.ia3.feedforward_modules
    if wanted:
        _placement_regex(model, cfg, wanted, key="peft.ia3.feedforward_modules")  # every name is a module
    chosen = expand(wanted) & expand(cfg.lora.target_modules)
    if not chosen:
        return None
    return lora_target_regex(model.config.model_type, sorted(chosen), cfg.lora.layers, model.config.num_hidden_layers)


# ---------------------------------------------------------------- counting


@dataclass
class Breakdown:
    """Trainable parameters by part; `total` is the one number the budget is checked against.

    Adapter parameters of every method placed on Linear layers (LoRA's A/B, DoRA's magnitudes,
    AdaLoRA's singular values, IA3's and VeRA's vectors, LoHa's and LoKr's factors) are in
    `lora_by_module` / `lora_by_layer` (the names predate the other methods); prompt and prefix
    tuning's embeddings (and prefix MLP) in `prompt`; BitFit's biases in `bias_by_module` /
    `bias_by_layer`.
    """

    lora_by_module: dict[str, int] = field(default_factory=dict)
    lora_by_layer: dict[int, int] = field(default_factory=dict)
    head: dict[str, int] = field(default_factory=dict)
    other: dict[str, int] = field(default_factory=dict)
    method: str = "lora"
    prompt: dict[str, int] = field(default_factory=dict)
    bias_by_module: dict[str, int] = field(default_factory=dict)
    bias_by_layer: dict[int, int] = field(default_factory=dict)  # embeddings' biases are in no layer

    @property
    def lora(self) -> int:
        return sum(self.lora_by_module.values())

    @property
    def head_total(self) -> int:
        return sum(self.head.values())

    @property
    def prompt_total(self) -> int:
        return sum(self.prompt.values())

    @property
    def bias_total(self) -> int:
        return sum(self.bias_by_module.values())

    @property
    def total(self) -> int:
        return self.lora + self.prompt_total + self.bias_total + self.head_total + sum(self.other.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "lora": self.lora, "head": self.head_total,
                "lora_by_module": self.lora_by_module,
                "lora_by_layer": {str(k): v for k, v in self.lora_by_layer.items()},
                "head_by_module": self.head, "other": self.other, "method": self.method,
                "prompt": self.prompt_total, "prompt_by_module": self.prompt, "bias": self.bias_total,
                "bias_by_module": self.bias_by_module,
                "bias_by_layer": {str(k): v for k, v in self.bias_by_layer.items()}}


_ADAPTER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+?)\.(?:"
                         + "|".join(sorted({re.escape(m.adapter_marker) for m in METHODS.values() if m.adapter_marker}))
                         + ")")
_LAYER_BIAS_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.bias$")
# peft's type of a config -> the method (the first entry of a type: LORA is lora, or dora by use_dora)
_PEFT_METHODS = {m.peft_type: name for name, m in reversed(METHODS.items()) if m.peft_type}


def _method_of(model: nn.Module) -> str:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return "bitfit" if any(p.requires_grad for p in model.parameters()) else "none"
    if getattr(config, "use_dora", False):
        return "dora"
    return _PEFT_METHODS.get(str(config.peft_type.value), str(config.peft_type.value).lower())


def _head_part(model: nn.Module, name: str) -> str | None:
    """'classifier.dense', 'pooler.dense', ... when the parameter belongs to the head, else None."""
    if ".modules_to_save." in name:
        module, rest = name.split(".modules_to_save.")
        sub = rest.split(".", 1)[1].rsplit(".", 1)  # drop the adapter name, split off weight/bias
        return ".".join([module.split(".")[-1]] + sub[:-1])
    if hasattr(model, "peft_config"):
        return None
    prefix = f"{model.base_model_prefix}."
    plain = name[len(prefix):] if name.startswith(prefix) else name
    if plain.startswith(("classifier.", "pooler.")):  # BitFit: the head is trained as it is
        return plain.rsplit(".", 1)[0]
    return None


def count_trainable(model: nn.Module) -> Breakdown:
    """Count every parameter with requires_grad, split into adapters (by module, by layer), prompt
    or prefix embeddings, biases (BitFit, by module and layer) and the head."""
    b = Breakdown(method=_method_of(model))
    by_module: dict[str, int] = defaultdict(int)
    by_layer: dict[int, int] = defaultdict(int)
    bias_module: dict[str, int] = defaultdict(int)
    bias_layer: dict[int, int] = defaultdict(int)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = p.numel()
        m = _ADAPTER_RE.search(name)
        head = None if m else _head_part(model, name)
        if m:
            by_layer[int(m.group(1))] += n
            by_module[m.group(2)] += n
        elif head is not None:
            b.head[head] = b.head.get(head, 0) + n
        elif name.startswith("prompt_encoder."):
            part = name.replace(".default.", ".", 1).rsplit(".", 1)[0]
            b.prompt[part] = b.prompt.get(part, 0) + n
        elif b.method == "bitfit" and name.endswith(".bias"):
            layer = _LAYER_BIAS_RE.search(name)
            if layer:
                bias_layer[int(layer.group(1))] += n
                bias_module[layer.group(2)] += n
            else:  # embeddings' LayerNorm: in no layer
                bias_module[name.split(".", 1)[1].rsplit(".", 1)[0]] += n
        else:
            b.other[name] = n
    b.lora_by_module = dict(by_module)
    b.lora_by_layer = dict(sorted(by_layer.items()))
    b.bias_by_module = dict(bias_module)
    b.bias_by_layer = dict(sorted(bias_layer.items()))
    return b


def format_breakdown(b: Breakdown, max_trainable: int | None = None) -> str:
    """A human-readable table of the breakdown (and the verdict against the budget)."""
    name = methods.NAMES.get(b.method, b.method)
    lines = []
    if b.lora_by_module or b.method in methods.PLACED:
        lines.append(f"{name} by module:")
        lines += [f"  {k:<28} {v:>10,}" for k, v in sorted(b.lora_by_module.items())]
        lines.append(f"{name} by layer:")
        lines += [f"  layer {k:<22} {v:>10,}" for k, v in b.lora_by_layer.items()]
        lines.append(f"  {name + ' total':<28} {b.lora:>10,}")
    if b.prompt:
        lines.append(f"{name} (virtual tokens):")
        lines += [f"  {k:<28} {v:>10,}" for k, v in b.prompt.items()]
        lines.append(f"  {'virtual tokens total':<28} {b.prompt_total:>10,}")
    if b.bias_by_module:
        lines.append("Biases by module:")
        lines += [f"  {k:<28} {v:>10,}" for k, v in sorted(b.bias_by_module.items())]
        lines.append("Biases by layer:")
        lines += [f"  layer {k:<22} {v:>10,}" for k, v in b.bias_by_layer.items()]
        lines.append(f"  {'biases total':<28} {b.bias_total:>10,}")
    lines.append("Head:")
    lines += [f"  {k:<28} {v:>10,}" for k, v in b.head.items()]
    lines.append(f"  {'head total':<28} {b.head_total:>10,}")
    if b.other:
        lines.append("Other trainable:")
        lines += [f"  {k:<28} {v:>10,}" for k, v in b.other.items()]
    lines.append(f"{'Total trainable':<30} {b.total:>10,}")
    if max_trainable is not None:
        verdict = "fits" if b.total <= max_trainable else f"EXCEEDS by {b.total - max_trainable:,}"
        lines.append(f"{'Budget':<30} {max_trainable:>10,}  -> {verdict}")
    return "\n".join(lines)


def check_budget(b: Breakdown, max_trainable: int) -> None:
    """Raise BudgetError (with the breakdown) when the total exceeds the budget."""
    if b.total > max_trainable:
        raise BudgetError(
            f"{b.total:,} trainable parameters exceed budget.max_trainable={max_trainable:,}; "
            f"{_smaller_hint(b.method)} or use model.head=linear.\n"
            + format_breakdown(b, max_trainable))


def _smaller_hint(method: str) -> str:
    key = methods.SIZE_KEYS.get(method)
    hints = [f"lower {key}"] if key else []
    if method in methods.PLACED:
        hints.append("target fewer modules/layers (lora.target_modules, lora.layers)")
    if method == "bitfit":
        hints.append("BitFit's size is fixed by the backbone: use a method with a size option")
    return ", ".join(hints) or "choose a smaller configuration"


def budget_breakdown(cfg: Config) -> Breakdown:
    """Exact trainable count for a config, built on the meta device (no weights, no memory)."""
    return count_trainable(build_model(cfg, device="meta"))
