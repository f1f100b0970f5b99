"""Typed configuration: dataclass defaults <- YAML file <- dotted ``key=value`` overrides.

One dataclass tree is the single source of defaults. Unknown keys and values of the wrong
type fail at load time with the key's dotted name.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from agnews_lora import registry
from agnews_lora.calibration import parse_prior
from agnews_lora.calibration import CALIBRATIONS
from agnews_lora.errors import ConfigError, finite  # noqa: F401  (ConfigError: re-exported)
from agnews_lora.hub import ensure_hub_reachable
from agnews_lora.perturb import parse_specs


# The default dataset's classes in label order: known without reading it, so that `budget`, `plan` and
# the paper's configurations work offline.
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


@dataclass
class DataConfig:
    hub_dataset: str = "fancyzhx/ag_news"  # Hub id or a local dataset folder; used when `train` is empty
    hub_config: str = ""  # the Hub dataset's configuration (subset), e.g. "sst2" of nyu-mll/glue
    train_split: str = "train"  # the Hub dataset's split to train on (validation rows are carved from it)
    test_split: str = "test"  # its split to test on ("" = none); all labels -1 (GLUE's hidden test) = unlabelled
    # Files (CSV, TSV, JSON(L), parquet, pickle), save_to_disk folders or hf:NAME[:CONFIG[:SPLIT]], concatenated
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)  # as train; empty + hub_dataset -> its test_split
    # When not one of the local files train and test name exists: error; or hub = read hub_dataset
    # instead (a preset naming an offline copy then runs online as well; config.yaml records it)
    if_missing: Literal["error", "hub"] = "error"
    # The column(s) holding a row's text, joined by a space (the original AG News CSV is headerless)
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    label_field: str = "label"  # the column holding a row's label: a class id (0-based) or a class name
    # Class names in label-id order; empty = from the data: the Hub dataset's ClassLabel names, the
    # names in the label column (sorted), AG News' for its original CSV, else "class i"
    labels: list[str] = field(default_factory=list)
    val_size: int = 640  # rows carved (stratified, seeded) from train for validation
    max_train_rows: int = 0  # 0 = all; otherwise a stratified, seeded subsample of train
    max_length: int = 128  # tokens per text; longer texts are cut
    # Batches pad up to a multiple of this many tokens (1 = to the longest row). 8 suits GPU
    # tensor cores and torch.compile (fewer shapes); on CPU it only adds padding (measured: -5%).
    pad_to_multiple_of: int = 1
    cache_dir: str = "~/.cache/agnews-lora"  # tokenized rows and teacher logits, keyed by content
    # Training-time augmentation (perturb.py): each epoch, this share of the training rows is
    # replaced by one of these perturbations (`name` or `name:value`, e.g. typos:0.05).
    # Validation and test rows are never perturbed.
    augment: list[str] = field(default_factory=list)
    augment_prob: float = 0.5  # share of the training rows perturbed each epoch (data.augment)
    # Self-training: unlabelled texts (files) pseudo-labelled by the trained model for a further
    # round (see SelfTrainConfig); empty = off. Their labels, if any, are never read.
    unlabelled: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = "roberta-base"  # Hub id, local folder, or pkg:PACKAGE/path (a folder in a package)
    init: Literal["pretrained", "random"] = "pretrained"  # random: the architecture only (counts, speed tests)
    # roberta: the backbone's classification head (dense + out_proj, loadable by plain transformers);
    # linear: one Linear(hidden, num_labels), far fewer parameters, leaving more budget to adapters
    head: Literal["roberta", "linear"] = "roberta"
    pooled_dropout: float = 0.1  # dropout on the pooled first token, before either head
    num_labels: int = 0  # classes: the head's size (the budget counts it); 0 = as data.labels (or the data) says


@dataclass
class LoraConfig:
    r: int = 8  # rank of each adapter (trainable: r x (in + out) per module)
    alpha: float = 16.0  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.1  # dropout on the adapter's input
    # modules of each layer: query, key, value, attn_out, ffn_in, ffn_out, or the groups dense
    # (attn_out, ffn_in, ffn_out), attention (query, key, value, attn_out) and all
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    layers: list[int] | None = None  # encoder layers that get adapters; None = all
    # How A and B start (peft's init_lora_weights; peft.method=lora). None adds a parameter.
    # kaiming: A kaiming-uniform, B zero (the LoRA paper's code; peft's default); gaussian: A Gaussian,
    # B zero; pissa: A, B from the weight's top singular vectors; olora: from its QR decomposition;
    # eva: A from the SVD of the layer's inputs on training batches, B zero; corda: the weight's SVD
    # weighted by the inputs' covariance on training batches; lora_ga: A, B from the SVD of the weight's
    # gradient on training batches. pissa, olora, corda and lora_ga take A B out of the frozen weight:
    # best/ holds them converted to a plain LoRA adapter of rank 2r for the original backbone.
    init: Literal[registry.LORA_INITS] = "kaiming"
    init_batches: int = 16  # eva, corda, lora_ga: batches of training rows (train.batch_size each) they read
    rslora: bool = False  # rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r (lora, dora)


# ---------------------------------------------------------------- PEFT methods
# `peft.method` picks the method; each method reads its own `peft.<method>.*` options and, where it
# places adapters on Linear layers, the placement keys `lora.target_modules` / `lora.layers`. What
# each method is (its options, the lora.* keys it reads, its ranges) is its entry in registry.py:
# the `peft` section below is built from the entries.

PEFT_METHODS = registry.NAMES
PeftMethodConfig = dataclasses.make_dataclass(
    "PeftMethodConfig",
    [("method", Literal[PEFT_METHODS], field(default="lora"))]
    + [(m.name, m.options, field(default_factory=m.options)) for m in registry.METHODS.values() if m.options],
)
PeftMethodConfig.__module__ = __name__
PeftMethodConfig.__doc__ = "peft.method and every method's own options (peft.<method>.*), from registry.py."


@dataclass
class TrainConfig:
    epochs: int = 3  # passes over the training rows (unless max_steps is set)
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    batch_size: int = 16  # training rows per step and process (before grad_accum)
    eval_batch_size: int = 64  # rows per forward pass in evaluation
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate of AdamW
    # LoRA+: LoRA's B matrices learn at train.lr x this ratio (e.g. 16), the rest at train.lr; 0 = off
    # (peft.method=lora or dora)
    loraplus_lr_ratio: float = 0.0
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    warmup_ratio: float = 0.06  # share of the steps with a linear warm-up to lr
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0  # gradient clipping by global norm; 0 = off
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 42  # seeds the split, the subsample, the initialisation and the batch order
    eval_every: int = 0  # optimizer steps between evaluations; 0 = once per epoch
    log_every: int = 10  # optimizer steps per log line (and per divergence check)
    resume: bool = False  # continue the run in out_dir from its last/ checkpoint
    cpu: bool = False  # force CPU even when an accelerator is present
    progress: bool = True  # a progress bar on the console
    # Speed patches (speed.py; each recorded in the run folder's speed_patches.json, applied or not and why)
    fast_dropout: bool = True  # CPU: dropout masks from 16-bit draws, ~3x faster (speed.py); false = torch's
    cast_frozen_linears: bool = True  # autocast: frozen Linear weights stored in its dtype (bit-identical)
    cast_inputs_once: bool = True  # CPU autocast: one cast per shared input instead of one per projection
    first_token_last_layer: bool = True  # the last layer computes token 0 only (BERT/RoBERTa-style layers)
    kernel_cache: int = 16384  # CPU: oneDNN kernel cache capacity (unless set in the environment); 0 = default
    compile: bool = False  # torch.compile each encoder layer (dynamic shapes); slower on small CPUs
    label_smoothing: float = 0.0  # cross-entropy against (1 - e) * one-hot + e / classes
    # Weight averaging of the trainable weights: exponential moving average with this decay
    # (0 = off, e.g. 0.999); evaluation, best/ and the test score use the averaged weights.
    ema: float = 0.0
    # Which evaluation's checkpoint becomes best/: validation accuracy on the clean rows, or on
    # the validation rows under the robustness suite's perturbations (mean over the suite).
    select: Literal["val_accuracy", "perturbed_val_accuracy"] = "val_accuracy"
    # live tracking through accelerate: the jsonl logs, config and test metrics; tensorboard writes
    # under RUN_DIR/tensorboard; "all" = every one of the three that is installed
    log_with: Literal["none", "tensorboard", "wandb", "mlflow", "all"] = "none"


@dataclass
class SelfTrainConfig:
    """A further round on the training rows plus pseudo-labelled `data.unlabelled` texts."""

    threshold: float = 0.9  # keep texts whose temperature-scaled top probability is above this
    steps: int = 0  # optimizer steps of the further round; 0 = a quarter of the first round
    lr: float = 0.0  # peak learning rate of the further round; 0 = train.lr / 2
    balance: bool = True  # at most as many pseudo-labelled texts per class as the rarest class has
    train_ratio: float = 1.0  # training rows drawn (seeded) per pseudo-labelled text for the round
    # Probabilities the pseudo-labels come from: "none" = temperature-scaled; "match-shifted" = then
    # prior-matched on the texts shifted from the training texts, with predict.shift_threshold and
    # predict.shift_calibration (as `predict --prior match-shifted` on the unlabelled file)
    prior: Literal["none", "match-shifted"] = "none"


@dataclass
class PredictConfig:
    """The run's prediction defaults: `predict` uses them when --prior is not given."""

    # "" = the training prior; uniform | em | match | match-shifted | shares per class "0.2,0.3,0.2,0.3"
    prior: str = ""
    shift_threshold: float = 0.6  # match-shifted: rows with a shift score above it are matched
    # match-shifted: "none" = the matched probabilities as they are; "keep-confidence" = a temperature on
    # the matched rows that gives them back their mean top probability from before matching (labels kept)
    shift_calibration: Literal[CALIBRATIONS] = "none"


@dataclass
class BudgetConfig:
    max_trainable: int = 1_000_000  # trainable parameters allowed, head included; checked before any work


@dataclass
class DistillConfig:
    teacher: str = ""  # run folder of this tool, or a HF sequence-classification model
    # finetuned: the teacher's own logits; frozen: a linear probe on its pretrained backbone
    teacher_mode: Literal["finetuned", "frozen"] = "finetuned"
    temperature: float = 2.0  # softens teacher and student logits in the KD term
    alpha: float = 0.5  # weight of the KD term; 0 = plain cross-entropy
    probe_steps: int = 200  # frozen mode: optimizer steps of the linear probe
    probe_lr: float = 1e-3  # frozen mode: learning rate of the linear probe


@dataclass
class SweepConfig:
    """`agnews-lora sweep`: dotted config key -> search spec, e.g. ``lora.r: {type: int, low: 4,
    high: 16, step: 4}``, ``train.lr: {type: float, low: 1e-4, high: 1e-3, log: true}``,
    ``lora.target_modules: {type: categorical, choices: [[query, value], [all]]}`` (see sweep.py)."""

    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted key -> search spec (above)
    metric: Literal["val_accuracy", "val_f1_macro", "val_f1_weighted", "val_loss"] = "val_accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"
    seed: int | None = None  # sampler seed; leave unset when several workers share a study
    # Stops a trial whose validation scores (reported after each evaluation) trail the other trials':
    # hyperband (successive halving over the evaluation steps), median (below the median of earlier
    # trials at the same step), none. A stopped trial keeps its run folder and is marked pruned.
    pruner: Literal["none", "median", "hyperband"] = "hyperband"
    timeout: float | None = None  # seconds after which this worker starts no new trial; null = no limit


@dataclass
class Config:
    name: str = ""  # run name; default: derived from the time
    out_dir: str = ""  # run folder; default runs/NAME
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    peft: PeftMethodConfig = field(default_factory=PeftMethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:  # every float key: a finite number (no nan, inf or 1e309)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return finite(value, key)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {annotation}")


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line value: YAML-parsed, with its text kept for string-typed keys (name=010 stays "010")."""

    parsed: Any
    raw: str


def _wants_text(annotation: Any) -> bool:
    """True for str, Optional[str] and string Literals: a CLI value for them is taken verbatim."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return str in args
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    return annotation is str


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates onto dataclass `obj` in place, checking keys and types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if isinstance(value, _Override):
            keep_text = value.parsed is not None and _wants_text(hints[key]) and not dataclasses.is_dataclass(current)
            decimal = re.fullmatch(r"[-+]?\d+", value.raw.strip())
            value = value.raw.strip() if keep_text else int(value.raw) if decimal else value.parsed
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of its keys, got {value!r}")
            _merge(current, value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key]))


MAX_YAML_NODES = 100_000  # far above any real config (the largest preset has a few hundred)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text as Python data (safe types only), refusing documents whose aliases expand to
    more than MAX_YAML_NODES nodes ("billion laughs": a few hundred bytes of nested anchors
    would otherwise become gigabytes).

    Args:
        text: the YAML document.
        source: what it is, for the message (a file, an override).

    Raises:
        ConfigError: the expansion is too large.
        yaml.YAMLError: not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def size(n) -> int:  # nodes after expanding every alias; shared nodes are counted once per use
            if id(n) not in sizes:
                sizes[id(n)] = 0  # a recursive alias counts as a leaf while its size is computed
                children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                    n.value if isinstance(n, yaml.SequenceNode) else []
                sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_YAML_NODES + 1)
            return sizes[id(n)]

        if size(node) > MAX_YAML_NODES:
            raise ConfigError(f"{source}: its aliases (*name) expand to more than {MAX_YAML_NODES:,} values; "
                              "write the values out, or use fewer nested anchors")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["lora.r=12", "train.lr=3e-4"]`` into a nested dict.

    Values are parsed as YAML (numbers, booleans, lists, null), except that a key typed as a string
    gets the text as written (``name=010`` is "010", not YAML's octal 8; ``out_dir=1e3`` is "1e3"), and
    digits are decimal (``lora.r=012`` is 12).
    """
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. lora.r=12)")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw, f"override '{key.strip()}'") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier one for '{part}'")
        node[parts[-1]] = value if isinstance(value, (dict, list)) else _Override(value, raw)
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the resolved config.

    Args:
        path: optional YAML file whose keys override the dataclass defaults.
        overrides: dotted ``key=value`` strings applied after the file.

    Returns:
        The validated Config.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass the YAML file itself")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = parse_yaml(path.read_text(encoding="utf-8"), f"config file {path}") or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                              f"{err.start}); save it as UTF-8") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        _merge(cfg, loaded)
    if overrides:
        _merge(cfg, parse_overrides(overrides))
    _fall_back_to_hub(cfg)
    validate(cfg)
    return cfg


def _fall_back_to_hub(cfg: Config) -> None:
    """data.if_missing=hub: when not one of the local files data.train and data.test name exists,
    empty both lists (data.hub_dataset is read instead), once the Hub or its cache can serve it;
    else one error that names both ways to the data."""
    local = [f for f in cfg.data.train + cfg.data.test if not f.startswith("hf:")]
    if cfg.data.if_missing != "hub" or not local or any(Path(f).expanduser().exists() for f in local):
        return
    ensure_hub_reachable(cfg.data.hub_dataset, kind="dataset", hint=(
        f"the local files data.train/data.test name do not exist here either ({', '.join(local[:2])}"
        f"{', ...' if len(local) > 2 else ''}): connect to the internet to read {cfg.data.hub_dataset} "
        f"from the Hub, or run where those files are (the project root beside ../shared), or set "
        f"data.train and data.test to your own copy"))
    cfg.data.train, cfg.data.test = [], []


def range_checks(cfg: Config) -> list[registry.Check]:
    """Every range check as (dotted key, holds for `cfg`, what the value must be); the methods'
    own come from their registry entries. validate() raises on the first that fails; the
    configuration reference (docs) lists each key's conditions from here."""
    checks = [
        ("lora.r", cfg.lora.r >= 1, "must be >= 1"),
        ("lora.alpha", cfg.lora.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= cfg.lora.dropout < 1, "must be in [0, 1)"),
        ("lora.target_modules", bool(cfg.lora.target_modules), "must name at least one module"),
        ("train.loraplus_lr_ratio", cfg.train.loraplus_lr_ratio >= 0, "must be >= 0 (0 = off, e.g. 16)"),
        ("train.loraplus_lr_ratio", cfg.train.loraplus_lr_ratio == 0 or cfg.peft.method in ("lora", "dora"),
         "applies to peft.method=lora or dora only (LoRA+ sets the learning rate of LoRA's B matrices); "
         "leave it at 0 for other methods"),
        ("sweep.timeout", cfg.sweep.timeout is None or cfg.sweep.timeout > 0, "must be > 0 seconds (null = no limit)"),
        ("model.pooled_dropout", 0 <= cfg.model.pooled_dropout < 1, "must be in [0, 1)"),
        ("model.num_labels", cfg.model.num_labels == 0 or cfg.model.num_labels >= 2,
         "must be >= 2 (0 = from data.labels or the data)"),
        ("model.num_labels", not (cfg.model.num_labels and cfg.data.labels)
         or cfg.model.num_labels == len(cfg.data.labels),
         "must equal the number of data.labels names when both are set (0: as many as they name)"),
        ("data.labels", not cfg.data.labels or len(cfg.data.labels) >= 2, "must name at least 2 classes "
         "(or be empty: from the data)"),
        ("data.labels", len(set(cfg.data.labels)) == len(cfg.data.labels) and all(n.strip() == n and n
                                                                                  for n in cfg.data.labels),
         "must be distinct, non-empty names without leading or trailing spaces"),
        ("data.text_fields", bool(cfg.data.text_fields) and all(cfg.data.text_fields)
         and len(set(cfg.data.text_fields)) == len(cfg.data.text_fields),
         "must name one or more distinct columns (joined by a space into the text)"),
        ("data.label_field", bool(cfg.data.label_field) and cfg.data.label_field not in cfg.data.text_fields,
         "must name a column that is not one of data.text_fields"),
        ("data.train_split", bool(cfg.data.train_split.strip()), "must name the Hub dataset's training split"),
        ("data.val_size", cfg.data.val_size >= 0, "must be >= 0"),
        ("data.max_train_rows", cfg.data.max_train_rows >= 0, "must be >= 0 (0 = all rows)"),
        ("data.max_length", cfg.data.max_length >= 8, "must be >= 8"),
        ("data.pad_to_multiple_of", cfg.data.pad_to_multiple_of >= 1, "must be >= 1 (1 = no rounding)"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.eval_batch_size", cfg.train.eval_batch_size >= 1, "must be >= 1"),
        ("train.max_steps", cfg.train.max_steps >= 0, "must be >= 0 (0 = train.epochs decides)"),
        ("train.log_every", cfg.train.log_every >= 1, "must be >= 1"),
        ("train.eval_every", cfg.train.eval_every >= 0, "must be >= 0 (0 = once per epoch)"),
        ("train.weight_decay", cfg.train.weight_decay >= 0, "must be >= 0"),
        ("train.max_grad_norm", cfg.train.max_grad_norm >= 0, "must be >= 0 (0 = no clipping)"),
        ("train.seed", 0 <= cfg.train.seed < 2**32, "must be in [0, 2**32)"),
        ("budget.max_trainable", cfg.budget.max_trainable >= 1, "must be >= 1"),
        ("train.grad_accum", cfg.train.grad_accum >= 1, "must be >= 1"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.warmup_ratio", 0 <= cfg.train.warmup_ratio < 1, "must be in [0, 1)"),
        ("train.epochs", cfg.train.epochs >= 1 or cfg.train.max_steps > 0, "must be >= 1"),
        ("data.augment_prob", 0 <= cfg.data.augment_prob <= 1, "must be in [0, 1]"),
        ("train.label_smoothing", 0 <= cfg.train.label_smoothing < 1, "must be in [0, 1)"),
        ("train.ema", 0 <= cfg.train.ema < 1, "must be in [0, 1) (0 = off, e.g. 0.999)"),
        ("train.select", cfg.train.select == "val_accuracy" or cfg.data.val_size > 0,
         "needs validation rows (data.val_size > 0)"),
        ("self_train.threshold", 0 <= cfg.self_train.threshold <= 1, "must be in [0, 1]"),
        ("self_train.steps", cfg.self_train.steps >= 0, "must be >= 0 (0 = a quarter of the first round)"),
        ("self_train.lr", cfg.self_train.lr >= 0, "must be >= 0 (0 = train.lr / 2)"),
        ("self_train.train_ratio", cfg.self_train.train_ratio >= 0, "must be >= 0"),
        ("data.unlabelled", not (cfg.data.unlabelled and cfg.distill.teacher),
         "cannot be combined with distillation (the teacher has no logits for pseudo-labelled rows)"),
        ("predict.shift_threshold", 0 < cfg.predict.shift_threshold < 1, "must be in (0, 1)"),
        ("distill.temperature", cfg.distill.temperature > 0, "must be > 0"),
        ("distill.alpha", 0 <= cfg.distill.alpha <= 1, "must be in [0, 1]"),
        ("distill.probe_steps", cfg.distill.probe_steps >= 1, "must be >= 1"),
        ("distill.probe_lr", cfg.distill.probe_lr > 0, "must be > 0"),
        ("sweep.direction", (cfg.sweep.direction == "minimize") == (cfg.sweep.metric == "val_loss"),
         f"does not suit sweep.metric={cfg.sweep.metric} (minimize val_loss, maximize the others)"),
    ]
    if cfg.lora.layers is not None:
        checks.append(("lora.layers", all(i >= 0 for i in cfg.lora.layers), "layer indices must be >= 0"))
        # An empty list would give peft no target at all; say so here, not as a module error.
        checks.append(("lora.layers", bool(cfg.lora.layers), "must list at least one layer (null = all layers)"))
    return checks + _peft_checks(cfg)


def validate(cfg: Config) -> None:
    """Check value ranges that types alone cannot express."""
    for key, ok, why in range_checks(cfg):
        if not ok:
            raise ConfigError(f"{key}={_value(cfg, key)!r} {why}")
    check_peft_applicability(cfg)
    if cfg.predict.prior and class_count(cfg):
        try:
            parse_prior(cfg.predict.prior, class_count(cfg))
        except ConfigError as err:
            raise ConfigError(f"predict.prior: {err} (or empty for the training prior)") from None
    try:
        parse_specs(cfg.data.augment, key="data.augment")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _peft_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """Ranges of the peft.<method>.* options (every method's section: their defaults are valid)."""
    return [check for m in registry.METHODS.values() for check in m.checks(cfg)]


def check_peft_applicability(cfg: Config) -> None:
    """Raise ConfigError when a key that the chosen peft.method does not read is set away from its
    default: lora.* keys the method has no use for, and the options of other methods."""
    method = cfg.peft.method
    defaults = Config()
    entry = registry.METHODS[method]
    for f in dataclasses.fields(LoraConfig):
        value, default = getattr(cfg.lora, f.name), getattr(defaults.lora, f.name)
        if f.name not in entry.lora_keys and value != default:
            why = entry.why_not(f.name)
            raise ConfigError(f"lora.{f.name}={value!r} does not apply to peft.method={method}"
                              + (f" ({why})" if why else "") + f"; leave it at its default ({default!r})")
    for f in dataclasses.fields(PeftMethodConfig):
        if f.name == "method" or f.name == method:
            continue
        section, default_section = getattr(cfg.peft, f.name), getattr(defaults.peft, f.name)
        for option in dataclasses.fields(section):
            value = getattr(section, option.name)
            if value != getattr(default_section, option.name):
                raise ConfigError(f"peft.{f.name}.{option.name}={value!r} is an option of peft.method={f.name}, "
                                  f"not of peft.method={method}; remove it or set peft.method={f.name}")


def class_names(cfg: Config) -> list[str] | None:
    """The class names by label id when the config alone tells them: data.labels, or the default
    dataset's (AG News on the Hub); None when only the data can tell (`data.resolve_labels`)."""
    if cfg.data.labels:
        return list(cfg.data.labels)
    default = DataConfig()
    hub = (cfg.data.hub_dataset, cfg.data.hub_config)
    if cfg.model.num_labels in (0, len(AG_NEWS_LABELS)) and not cfg.data.train and hub == (default.hub_dataset, ""):
        return list(AG_NEWS_LABELS)
    return None


def generic_names(count: int) -> list[str]:
    """Names for `count` classes that nothing names: class 0, class 1, ..."""
    return [f"class {i}" for i in range(count)]


def class_count(cfg: Config) -> int:
    """The number of classes when the config alone tells it (model.num_labels, or `class_names`);
    0 when only the data can tell."""
    names = class_names(cfg)
    return cfg.model.num_labels or (len(names) if names else 0)


def require_class_count(cfg: Config) -> int:
    """The number of classes of the model `cfg` builds.

    Raises:
        ConfigError: only the data can tell it (a config not yet passed through `data.resolve_labels`).
    """
    n = class_count(cfg)
    if not n:
        raise ConfigError(f"the number of classes of {cfg.data.train or cfg.data.hub_dataset} is not known before "
                          "reading its labels; set data.labels (the class names) or model.num_labels, or "
                          "resolve them from the data first (agnews_lora.data.resolve_labels)")
    return n


def _value(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data)
    validate(cfg)
    return cfg
