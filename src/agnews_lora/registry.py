"""The PEFT methods: one entry per method, the one place that says what a method is.

An entry holds the method's name (`peft.method`) and title, its options (the `peft.<name>.*`
section, a dataclass here) with their ranges, the option that sets its size, whether it is placed
on `lora.target_modules`/`lora.layers` and can be merged into the backbone, which `lora.*` keys it
reads (and why the others do not apply), how its adapter weights are named, peft's type for it,
how its peft config is built and how it is described in one line. config.py builds the `peft`
section from the entries; model.py, methods.py, plan.py, the CLI, reports and docs read them.
Adding a method is one entry (and its options dataclass) here, and its tests.

This module imports no heavy library at import time (peft is imported by `build`), and nothing
of the package but errors.py and hub.py: config.py imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from agnews_lora.hub import resolve_model_path

Check = tuple[str, bool, str]  # (dotted key, is it valid, what it must be)


# ---------------------------------------------------------------- options of the methods


@dataclass
class AdaLoraOptions:
    init_r: int = 12  # rank each adapter starts with (what the budget counts: all of it is trained)
    target_r: int = 8  # average rank per adapter after the allocation
    tinit: int = 0  # optimizer steps before ranks start to shrink
    tfinal: int = 0  # optimizer steps at the end with the final ranks fixed
    deltaT: int = 1  # optimizer steps between two allocations
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on the singular vectors


@dataclass
class IA3Options:
    # Of lora.target_modules, those whose input is scaled (the IA3 paper's FFN rescaling) instead of
    # their output; names as in lora.target_modules.
    feedforward_modules: list[str] = field(default_factory=lambda: ["ffn_out"])


@dataclass
class VeraOptions:
    r: int = 256  # rank of the shared random projections (trainable: r + out_features per module)
    dropout: float = 0.0  # dropout on the adapter's input
    d_initial: float = 0.1  # initial value of the scaling vector d
    projection_prng_key: int = 0  # seed of the shared random matrices
    save_projection: bool = True  # store the shared matrices in the adapter (loading needs no seed)


@dataclass
class LohaOptions:
    r: int = 8  # rank of each of the two Hadamard-multiplied low-rank factors
    alpha: float = 8.0  # scaling: the update is multiplied by alpha / r
    rank_dropout: float = 0.0  # dropout on the rank dimension in training
    module_dropout: float = 0.0  # probability of disabling a whole adapter in a training step


@dataclass
class LokrOptions:
    r: int = 8  # rank of the decomposed Kronecker factor (a factor needing no more is stored full)
    alpha: float = 8.0  # scaling: the update is multiplied by alpha / r
    rank_dropout: float = 0.0  # dropout on the rank dimension in training
    module_dropout: float = 0.0  # probability of disabling a whole adapter in a training step
    decompose_both: bool = False  # also decompose the smaller Kronecker factor
    decompose_factor: int = -1  # size of the smaller factor's dimensions; -1 = as square as possible


@dataclass
class PromptOptions:
    num_virtual_tokens: int = 20  # trainable embeddings put before every input's tokens
    # their start: random; embeddings of tokens drawn from the vocabulary; those of init_text's tokens
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str = ""  # for init=text (repeated or cut to num_virtual_tokens tokens)


@dataclass
class PrefixOptions:
    # Trainable keys and values per layer put before every input's. (peft's MLP reparametrisation,
    # prefix_projection, is not offered: peft saves only its output, so a run could not resume.)
    num_virtual_tokens: int = 20


# ---------------------------------------------------------------- the entry


@dataclass(frozen=True)
class Method:
    """One PEFT method."""

    name: str  # the value of peft.method
    title: str  # how reports and tables name it
    build: Callable[..., Any] | None  # (cfg, target, feedforward, common, meta) -> a peft config; None: not peft
    describe: Callable[[Any], str]  # cfg -> its options in one line (placement added by `describe`)
    options: type | None = None  # the dataclass of its peft.<name>.* section; None: it has none
    size_key: str | None = None  # the dotted option that sets its size; None: the size is fixed
    smallest_size: int = 1
    placed: bool = False  # adapters on lora.target_modules in lora.layers
    mergeable: bool = False  # peft folds it into the backbone's weights (merge_and_unload)
    virtual_tokens: bool = False  # it puts trainable tokens before every input's (its size: how many)
    lora_keys: frozenset[str] = frozenset()  # the lora.* keys it reads
    not_used: str | dict[str, str] = ""  # why the other lora.* keys do not apply (per key, or for all)
    adapter_marker: str | None = None  # the part of its adapter weights' names after the module's
    peft_type: str | None = None  # peft's PeftType value of its configs
    checks: Callable[[Any], list[Check]] = lambda cfg: []  # ranges of its options, as config.validate runs them

    def why_not(self, key: str) -> str:
        """Why lora.<key> does not apply to this method ("" when nothing more is to be said)."""
        return self.not_used.get(key, "") if isinstance(self.not_used, dict) else self.not_used


PLACEMENT_KEYS = frozenset({"target_modules", "layers"})
LORA_KEYS = frozenset({"r", "alpha", "dropout", "init", "init_batches", "rslora"}) | PLACEMENT_KEYS

# ---------------------------------------------------------------- LoRA's initialisations
# lora.init: how A and B start (peft's init_lora_weights). None adds a parameter: every one gives A and B
# the shapes of the default, so the exact count is the same (tests/test_lora_variants.py checks it).
LORA_INITS = ("kaiming", "gaussian", "pissa", "olora", "eva", "corda", "lora_ga")
# These move the adapter's starting product out of the frozen weight (W_res = W - scale * B0 A0): the
# trained adapter only means something on that residual backbone. Checkpoints meant for others (best/)
# are converted into a plain LoRA adapter of twice the rank on the original backbone (lora_init.py).
BASE_CHANGING_INITS = frozenset({"pissa", "olora", "corda", "lora_ga"})
# These read batches of training rows (lora.init_batches of them) before training starts.
DATA_DRIVEN_INITS = frozenset({"eva", "corda", "lora_ga"})


def lora_init_options(init: str) -> dict:
    """peft.LoraConfig's arguments for lora.init=`init` (init_lora_weights and its method's config).

    EVA's rank redistribution is off (rho=1): redistributed ranks would change the parameter count
    the budget was checked against. CorDA uses its instruction-previewed mode (IPM: the adapter starts
    on the directions the task's inputs use most), the mode its authors recommend for fine-tuning.
    """
    import peft

    if init == "kaiming":
        return {"init_lora_weights": True}
    if init == "eva":
        return {"init_lora_weights": "eva", "eva_config": peft.EvaConfig(rho=1.0, use_label_mask=False)}
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig

        return {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method="ipm")}
    if init == "lora_ga":
        return {"init_lora_weights": "lora_ga", "lora_ga_config": peft.LoraGAConfig()}
    return {"init_lora_weights": init}


def _lora(dora: bool):
    def build(cfg, target, feedforward, common, meta):
        import peft

        lora = cfg.lora
        # on the meta device no weight or batch can be read; the count does not depend on the init
        init = "kaiming" if dora or meta else lora.init
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                               use_dora=dora, use_rslora=lora.rslora, **lora_init_options(init), **common)

    return build


def _lora_checks(cfg) -> list[Check]:
    return [("lora.init_batches", cfg.lora.init_batches >= 1, "must be >= 1")]


def provisional_total_step(cfg) -> int:
    """AdaLoRA's total_step before the run knows its step count (train.max_steps when set): peft
    requires one when the adapter is built; `methods.AdaLoraSteps.start` sets the run's own."""
    a = cfg.peft.adalora
    return cfg.train.max_steps or a.tinit + a.tfinal + 1


def _adalora(cfg, target, feedforward, common, meta):
    import peft

    a, lora = cfg.peft.adalora, cfg.lora
    return peft.AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=a.tinit, tfinal=a.tfinal, deltaT=a.deltaT,
                              beta1=a.beta1, beta2=a.beta2, orth_reg_weight=a.orth_reg_weight, lora_alpha=lora.alpha,
                              lora_dropout=lora.dropout, target_modules=target, total_step=provisional_total_step(cfg),
                              **common)


def _adalora_checks(cfg) -> list[Check]:
    a = cfg.peft.adalora
    checks = [
        ("peft.adalora.init_r", a.init_r >= 2, "must be >= 2 (ranks are allocated below it)"),
        # equal ranks would leave the allocation nothing to remove (peft fails then: kthvalue k=0)
        ("peft.adalora.target_r", 1 <= a.target_r < a.init_r, f"must be in [1, peft.adalora.init_r={a.init_r})"),
        ("peft.adalora.tinit", a.tinit >= 0, "must be >= 0"),
        ("peft.adalora.tfinal", a.tfinal >= 0, "must be >= 0"),
        ("peft.adalora.deltaT", a.deltaT >= 1, "must be >= 1"),
        ("peft.adalora.beta1", 0 < a.beta1 < 1, "must be in (0, 1)"),
        ("peft.adalora.beta2", 0 < a.beta2 < 1, "must be in (0, 1)"),
        ("peft.adalora.orth_reg_weight", a.orth_reg_weight >= 0, "must be >= 0 (0 = no orthogonality penalty)"),
    ]
    if cfg.peft.method == "adalora" and cfg.train.max_steps > 0:
        # peft refuses a schedule without a rank-allocation phase; say so with our keys, before anything loads
        checks.append(("peft.adalora.tinit", a.tinit < cfg.train.max_steps - a.tfinal,
                       f"must be < train.max_steps - peft.adalora.tfinal = {cfg.train.max_steps - a.tfinal} "
                       "(ranks are allocated between tinit and max_steps - tfinal)"))
    return checks


def _ia3(cfg, target, feedforward, common, meta):
    import peft

    # an empty feedforward set: a regex that matches no module name
    return peft.IA3Config(target_modules=target, feedforward_modules=feedforward or r"(?!)", **common)


def _vera(cfg, target, feedforward, common, meta):
    import peft

    v = cfg.peft.vera
    return peft.VeraConfig(r=v.r, vera_dropout=v.dropout, d_initial=v.d_initial,
                           projection_prng_key=v.projection_prng_key, save_projection=v.save_projection,
                           target_modules=target, **common)


def _loha(cfg, target, feedforward, common, meta):
    import peft

    o = cfg.peft.loha
    return peft.LoHaConfig(r=o.r, alpha=o.alpha, rank_dropout=o.rank_dropout, module_dropout=o.module_dropout,
                           target_modules=target, **common)


def _lokr(cfg, target, feedforward, common, meta):
    import peft

    o = cfg.peft.lokr
    return peft.LoKrConfig(r=o.r, alpha=o.alpha, rank_dropout=o.rank_dropout, module_dropout=o.module_dropout,
                           decompose_both=o.decompose_both, decompose_factor=o.decompose_factor,
                           target_modules=target, **common)


def _decomposition_checks(name: str):
    def checks(cfg) -> list[Check]:
        o = getattr(cfg.peft, name)
        found = [(f"peft.{name}.r", o.r >= 1, "must be >= 1"), (f"peft.{name}.alpha", o.alpha > 0, "must be > 0"),
                 (f"peft.{name}.rank_dropout", 0 <= o.rank_dropout < 1, "must be in [0, 1)"),
                 (f"peft.{name}.module_dropout", 0 <= o.module_dropout < 1, "must be in [0, 1)")]
        if name == "lokr":
            found.append(("peft.lokr.decompose_factor", o.decompose_factor == -1 or o.decompose_factor >= 1,
                          "must be -1 (as square as possible) or >= 1"))
        return found

    return checks


def _prompt(cfg, target, feedforward, common, meta):
    import peft

    o = cfg.peft.prompt
    init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}["random" if meta else o.init]
    text = {"prompt_tuning_init_text": o.init_text, "tokenizer_name_or_path": resolve_model_path(cfg.model.name)} \
        if init == "TEXT" else {}
    return peft.PromptTuningConfig(num_virtual_tokens=o.num_virtual_tokens, prompt_tuning_init=init, **text, **common)


def _prefix(cfg, target, feedforward, common, meta):
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=cfg.peft.prefix.num_virtual_tokens, **common)


def _lora_text(cfg) -> str:
    lora = cfg.lora
    extra = (f", init={lora.init}" if lora.init != "kaiming" else "") + (", rsLoRA" if lora.rslora else "")
    return f"r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}{extra}"


_OWN_OPTIONS = "its options are peft.{}.*"
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LoRA", _lora(dora=False), _lora_text, size_key="lora.r", placed=True, mergeable=True,
           lora_keys=LORA_KEYS, adapter_marker="lora_", peft_type="LORA", checks=_lora_checks),
    Method("dora", "DoRA", _lora(dora=True), _lora_text, size_key="lora.r", placed=True, mergeable=True,
           lora_keys=LORA_KEYS - {"init", "init_batches"}, adapter_marker="lora_", peft_type="LORA",  # use_dora
           not_used={"init": "DoRA starts from LoRA's default init here; lora.init applies to peft.method=lora",
                     "init_batches": "it is read by the data-driven lora.init values of peft.method=lora"}),
    Method("adalora", "AdaLoRA", _adalora,
           lambda cfg: (f"init_r={cfg.peft.adalora.init_r}, target_r={cfg.peft.adalora.target_r}, "
                        f"tinit={cfg.peft.adalora.tinit}, tfinal={cfg.peft.adalora.tfinal}, "
                        f"deltaT={cfg.peft.adalora.deltaT}, alpha={cfg.lora.alpha:g}"),
           options=AdaLoraOptions, size_key="peft.adalora.init_r", smallest_size=2, placed=True, mergeable=True,
           lora_keys=frozenset({"alpha", "dropout"}) | PLACEMENT_KEYS,
           not_used={"r": "use peft.adalora.init_r and peft.adalora.target_r"}, adapter_marker="lora_",
           peft_type="ADALORA", checks=_adalora_checks),
    Method("ia3", "IA3", _ia3, lambda cfg: f"feedforward={','.join(cfg.peft.ia3.feedforward_modules) or '-'}",
           options=IA3Options, placed=True, mergeable=True, lora_keys=PLACEMENT_KEYS,
           not_used="IA3 learns scaling vectors: it has no rank, scaling or dropout", adapter_marker="ia3_",
           peft_type="IA3"),
    Method("vera", "VeRA", _vera, lambda cfg: f"r={cfg.peft.vera.r}, d_initial={cfg.peft.vera.d_initial:g}",
           options=VeraOptions, size_key="peft.vera.r", placed=True, mergeable=True, lora_keys=PLACEMENT_KEYS,
           not_used=_OWN_OPTIONS.format("vera"), adapter_marker="vera_", peft_type="VERA",
           checks=lambda cfg: [("peft.vera.r", cfg.peft.vera.r >= 1, "must be >= 1"),
                               ("peft.vera.dropout", 0 <= cfg.peft.vera.dropout < 1, "must be in [0, 1)")]),
    Method("loha", "LoHa", _loha, lambda cfg: f"r={cfg.peft.loha.r}, alpha={cfg.peft.loha.alpha:g}",
           options=LohaOptions, size_key="peft.loha.r", placed=True, mergeable=True, lora_keys=PLACEMENT_KEYS,
           not_used=_OWN_OPTIONS.format("loha"), adapter_marker="hada_", peft_type="LOHA",
           checks=_decomposition_checks("loha")),
    Method("lokr", "LoKr", _lokr,
           lambda cfg: (f"r={cfg.peft.lokr.r}, alpha={cfg.peft.lokr.alpha:g}, "
                        f"decompose_factor={cfg.peft.lokr.decompose_factor}"),
           options=LokrOptions, size_key="peft.lokr.r", placed=True, mergeable=True, lora_keys=PLACEMENT_KEYS,
           not_used=_OWN_OPTIONS.format("lokr"), adapter_marker="lokr_", peft_type="LOKR",
           checks=_decomposition_checks("lokr")),
    Method("prompt", "Prompt tuning", _prompt,
           lambda cfg: f"{cfg.peft.prompt.num_virtual_tokens} virtual tokens, init={cfg.peft.prompt.init}",
           options=PromptOptions, size_key="peft.prompt.num_virtual_tokens", virtual_tokens=True,
           not_used="prompt tuning adds virtual tokens to the input: no adapters are placed on layers",
           peft_type="PROMPT_TUNING",
           checks=lambda cfg: [("peft.prompt.num_virtual_tokens", cfg.peft.prompt.num_virtual_tokens >= 1,
                                "must be >= 1"),
                               ("peft.prompt.init_text",
                                bool(cfg.peft.prompt.init_text.strip()) == (cfg.peft.prompt.init == "text"),
                                "must be given with peft.prompt.init=text, and only then")]),
    Method("prefix", "Prefix tuning", _prefix,
           lambda cfg: f"{cfg.peft.prefix.num_virtual_tokens} virtual tokens per layer",
           options=PrefixOptions, size_key="peft.prefix.num_virtual_tokens", virtual_tokens=True,
           not_used="prefix tuning adds keys and values to every layer's attention: no adapters are placed on "
                    "Linear layers", peft_type="PREFIX_TUNING",
           checks=lambda cfg: [("peft.prefix.num_virtual_tokens", cfg.peft.prefix.num_virtual_tokens >= 1,
                                "must be >= 1")]),
    # BitFit is no peft method: methods.apply_bitfit unfreezes the backbone's biases and the head.
    Method("bitfit", "BitFit", None, lambda cfg: "every bias of the backbone",
           not_used="BitFit trains every bias of the backbone (and the head): no adapters, no placement"),
)}
NAMES = tuple(METHODS)  # every value peft.method takes, in the order tables list them


def method(name: str) -> Method:
    """The entry of `name` (KeyError for a name that is not a method: config refuses it earlier)."""
    return METHODS[name]
