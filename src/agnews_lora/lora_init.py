"""LoRA's initialisations beyond peft's default (lora.init): the data they read and the checkpoints
they need.

peft builds most of them inside `get_peft_model` from the config `registry.lora_init_options` gives.
Three read training rows: CorDA and LoRA-GA before the adapters exist (`prepare`: the inputs'
covariance, the weights' gradients), EVA after (`finish`: the SVD of each adapted layer's inputs).
The batches come from the caller (train.py draws them from the training rows only).

Four (registry.BASE_CHANGING_INITS: PiSSA, OLoRA, CorDA, LoRA-GA) start the adapter at a product
B0 A0 taken out of the frozen weight (W_res = W - scale * B0 A0). The trained adapter only means
something on that residual backbone, which nobody else has. So every checkpoint of such a run holds
the adapter converted into a plain LoRA adapter for the original backbone, as peft's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does it: W_res + s B A =
W + s [B | -B0] [A ; A0], rank 2r at the same scale (`convert`, `converted_config`). Reading one
back into the training model (`unconvert`) takes the first r rows of A' and columns of B': those are
A and B as they were, bit for bit. A resumed run rebuilds W_res by running the same (deterministic)
initialisation again.

peft's own conversion is not called because it loads the initial adapter into the live model as a
second adapter and drops every tensor that is not a LoRA matrix (the classification head);
tests/test_lora_variants.py checks that `convert` gives the LoRA tensors peft's conversion gives.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from agnews_lora.registry import BASE_CHANGING_INITS, DATA_DRIVEN_INITS

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: on the model's device


def init_of(cfg) -> str:
    """The initialisation the run's adapters get ("kaiming" for every method but LoRA's options)."""
    return cfg.lora.init if cfg.peft.method == "lora" else "kaiming"


def needs_data(cfg) -> bool:
    """True when building the model reads batches of training rows (EVA, CorDA, LoRA-GA)."""
    return init_of(cfg) in DATA_DRIVEN_INITS


def changes_base(model: nn.Module) -> bool:
    """True when a peft model's adapter was initialised out of its frozen weights (PiSSA, OLoRA, CorDA,
    LoRA-GA): its checkpoints hold the converted adapter."""
    config = getattr(model, "peft_config", {}).get("default")
    init = getattr(config, "init_lora_weights", True)
    return isinstance(init, str) and init in BASE_CHANGING_INITS


def _forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def prepare(model: nn.Module, config, init: str, batches: list[Batch]) -> None:
    """What CorDA and LoRA-GA compute on the bare model before `get_peft_model` (nothing for the others).

    CorDA: the covariance of each target's inputs over the rows of `batches` (eval mode, no gradients).
    LoRA-GA:
    each target weight's gradient of the cross-entropy, averaged over `batches` (train mode, as peft's
    `preprocess_loraga` sets it). The global RNG is left as it was (dropout draws in LoRA-GA's passes).
    """
    if init not in ("corda", "lora_ga"):
        return
    with torch.random.fork_rng(devices=[]):
        if init == "corda":
            from peft.tuners.lora.corda import preprocess_corda

            def run_model() -> None:  # peft's covariance hook takes one sequence per call: row by row, no padding
                model.eval()
                for batch in batches:
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                        model(input_ids=ids[mask.bool()][None], attention_mask=mask[mask.bool()][None])

            preprocess_corda(model, config, run_model=run_model)
        else:
            from peft.tuners.lora.loraga import preprocess_loraga

            def train_step() -> None:
                for batch in batches:
                    torch.nn.functional.cross_entropy(_forward(model, batch), batch["labels"]).backward()

            preprocess_loraga(model, config, train_step=train_step)
    model.train()


def finish(model: nn.Module, init: str, batches: list[Batch]) -> None:
    """EVA's initialisation of a peft model: A from the SVD of each adapted layer's inputs (the real
    tokens of `batches`), B zero. Nothing for the other initialisations."""
    if init != "eva":
        return
    from peft import initialize_lora_eva_weights

    inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    with torch.random.fork_rng(devices=[]):
        initialize_lora_eva_weights(model, dataloader=inputs, show_progress_bar=False)
    model.train()


def check_batches(init: str, batches: Iterable | None) -> list[Batch]:
    """The batches as a list, refused (ValueError) when a data-driven init has none."""
    batches = list(batches or [])
    if init in DATA_DRIVEN_INITS and not batches:
        raise ValueError(f"lora.init={init} reads batches of training rows: pass init_data to build_model")
    return batches


# ---------------------------------------------------------------- checkpoints of base-changing inits


def initial_adapter(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter's A0 and B0 as initialised (copies, under `get_peft_model_state_dict`'s names), for
    `convert`; None when the model's init left the frozen weights alone. Call it before training."""
    if not changes_base(model):
        return None
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items() if _is_lora_matrix(k)}


def _is_lora_matrix(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def convert(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained state (`get_peft_model_state_dict`) as a plain LoRA adapter on the original backbone:
    A' = [A ; A0] and B' = [B | -B0] (peft's `subtract_mutated_init`), every other tensor (the head) as it is."""
    out = {}
    for name, tensor in state.items():
        if ".lora_A." in name:
            out[name] = torch.cat([tensor, initial[name]], dim=0).contiguous()
        elif ".lora_B." in name:
            out[name] = torch.cat([tensor, -initial[name]], dim=1).contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def converted_config(config):
    """The peft config of a `convert`ed adapter: the default init, twice the rank, the same scale
    (alpha doubled; with rsLoRA, whose scale is alpha / sqrt(r), times sqrt(2)), as peft writes it."""
    config = copy.deepcopy(config)
    config.r *= 2
    config.lora_alpha *= 2 ** 0.5 if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    return config


def unconvert(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` read from a checkpoint, ready for the training model: for a base-changing init, each
    converted A' and B' cut back to the trained A and B (their first r rows and columns, the very
    values `convert` copied). Unconverted weights (older checkpoints, other inits) pass unchanged."""
    if not changes_base(model):
        return weights
    params = dict(model.named_parameters())
    out = dict(weights)
    for name, tensor in weights.items():
        live = params.get(name.replace(".lora_A.weight", ".lora_A.default.weight")
                          .replace(".lora_B.weight", ".lora_B.default.weight"))
        if live is None or tensor.shape == live.shape:
            continue
        r = live.shape[0] if ".lora_A." in name else live.shape[1]
        out[name] = tensor[:r].contiguous() if ".lora_A." in name else tensor[:, :r].contiguous()
    return out


@contextmanager
def plain_config(model: nn.Module, initial: dict[str, torch.Tensor] | None):
    """For saving: the adapter config says how the saved tensors load (peft's default init: they
    replace whatever it draws; for a converted adapter also its rank and scale), not how the run began
    (config.yaml says that). Restored afterwards."""
    configs = getattr(model, "peft_config", {})
    saved = dict(configs)
    for name, config in saved.items():
        if str(config.peft_type.value) != "LORA":
            continue
        plain = converted_config(config) if initial is not None else copy.deepcopy(config)
        plain.init_lora_weights = True
        for field in ("eva_config", "corda_config", "lora_ga_config"):
            if hasattr(plain, field):
                setattr(plain, field, None)
        configs[name] = plain
    try:
        yield
    finally:
        configs.update(saved)
