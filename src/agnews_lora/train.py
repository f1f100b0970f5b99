"""train(cfg): the loop on accelerate, per-epoch evaluation, best checkpoint, resume."""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from agnews_lora import checkpoint as ckpt
from agnews_lora import methods, runs, tracking
from agnews_lora.averaging import WeightAverage
from agnews_lora.calibration import expected_calibration_error, fit_temperature, nll, softmax
from agnews_lora.card import write_run_card
from agnews_lora.config import Config
from agnews_lora.errors import ConfigError, Diverged
from agnews_lora.data import LengthGroupedSampler, load_splits, make_loader, row_ids, seed_everything, tokenize
from agnews_lora.evaluate import compute_metrics
from agnews_lora.losses import DistillTerm, cross_entropy
from agnews_lora.outputs import claim_folder
from agnews_lora.model import (Breakdown, budget_breakdown, build_model, check_budget, check_max_length,
                               count_trainable, load_tokenizer)
from agnews_lora.perturb import SUITE, augment_texts, parse_specs, perturb_texts
from agnews_lora.precision import accelerate_name, autocast_dtype, resolve_precision
from agnews_lora.report import write_report
from agnews_lora.speed import (ATTN_IMPLEMENTATION, PatchResult, cast_frozen_linears, cast_inputs_once,
                               cast_inputs_once_blocker, compile_layers, first_token_last_layer, set_kernel_cache,
                               use_fast_dropout)

if TYPE_CHECKING:
    from accelerate import Accelerator

PATCHES_FILE = runs.SPEED_PATCHES  # which speed patches a run applied, and why any was not


def run_dir_for(cfg: Config) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser()
    name = cfg.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / name


def make_accelerator(cfg: Config, log_with: list | None = None):
    """The Accelerator for `cfg`: precision from `precision.resolve_precision`, gradient accumulation,
    and the trackers `log_with` (tracking.accelerator_trackers).

    accelerate keeps one state per process and refuses a second Accelerator with another
    precision; a process that trains several times calls `reset_accelerator_state` between runs.
    """
    from accelerate import Accelerator

    device = "cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu"
    precision = resolve_precision(cfg.train.precision, device)
    try:
        return Accelerator(mixed_precision=accelerate_name(precision), log_with=log_with or None,
                           gradient_accumulation_steps=cfg.train.grad_accum, cpu=cfg.train.cpu)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise RuntimeError(f"{err} This process trained before with other settings: call "
                           "agnews_lora.train.reset_accelerator_state() between runs") from err


def reset_accelerator_state() -> None:
    """Forget accelerate's per-process precision settings, so that the next `train` may use another.

    For processes that train several times (sweeps, tests). The device and any process group
    (accelerate's PartialState) are kept. accelerate has no public call for this; its own tests
    use the same `_reset_state`.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def make_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm; fused kernel where torch has one."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=True)


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))
    if cfg.train.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    fn = get_cosine_schedule_with_warmup if cfg.train.scheduler == "cosine" else get_linear_schedule_with_warmup
    return fn(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@torch.inference_mode()
def predict_logits(model, loader, accelerator, n_rows: int) -> np.ndarray:
    """Logits for every row of `loader`, in row order (batches are sorted by length)."""
    model.eval()
    out = np.zeros((n_rows, accelerator.unwrap_model(model).config.num_labels), dtype=np.float32)  # DDP wraps
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, index = accelerator.gather_for_metrics((logits.float(), batch["index"]))
        out[index.cpu().numpy()] = logits.cpu().numpy()
    return out


def evaluate_split(model, loader, accelerator, labels: list[int], temperature: float | None = None) -> dict:
    """Loss and all metrics of the model on one labelled split; with `temperature`, also the
    expected calibration error and NLL before and after temperature scaling."""
    return split_metrics(predict_logits(model, loader, accelerator, len(labels)), labels, temperature)


def split_metrics(logits: np.ndarray, labels: list[int], temperature: float | None = None) -> dict:
    """evaluate_split's metrics from logits already computed."""
    y = torch.tensor(labels)
    metrics = compute_metrics(labels, logits.argmax(-1).tolist(), runs.label_names(logits.shape[1]))
    metrics["loss"] = float(cross_entropy(torch.from_numpy(logits), y))
    if temperature is not None:
        metrics.update({"ece": expected_calibration_error(softmax(logits), labels),
                        "ece_calibrated": expected_calibration_error(softmax(logits, temperature), labels),
                        "nll_calibrated": nll(logits, labels, temperature), "temperature": temperature})
    return metrics


@dataclass
class Progress:
    """Counters saved in `last/state.json`; restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_accuracy: float = -1.0
    best_step: int = 0
    train_seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    round: int = 0  # 0: the training rows; 1: the self-training round (data.unlabelled)


def preflight(cfg: Config) -> Breakdown:
    """The checks `train` makes before any folder, data or weights are touched: the budget,
    data.max_length against the backbone's positions, the trackers (`distill` makes them before
    its teacher runs).

    Returns:
        The trainable-parameter breakdown the budget check counted.
    """
    breakdown = budget_breakdown(cfg)
    check_budget(breakdown, cfg.budget.max_trainable)
    check_max_length(cfg)
    tracking.trackers_for(cfg.train.log_with)  # a tracker that is not installed: say so now
    return breakdown


def train(cfg: Config, distill_term: DistillTerm | None = None) -> Path:
    """Train a classifier with the adapters of cfg.peft.method as the config says; return the run folder.

    Args:
        cfg: resolved config.
        distill_term: optional knowledge-distillation term (losses.DistillTerm, built by
            `distill`): the loss is then the distillation loss against its teacher logits, taken
            for each training row by row identity; summary.json records its teacher.

    Returns:
        The run folder holding config.yaml, metrics.jsonl, best/ (adapter + head), summary.json.
    """
    run_dir = run_dir_for(cfg)
    if runs.writer_process() and not runs.holds_lock(run_dir):  # else distill claimed it before locking
        claim_folder(run_dir, kind="run", label="out_dir")
    breakdown = preflight(cfg)
    with runs.writer_lock(run_dir):  # one writer per run folder; released however train ends
        return _train(cfg, run_dir, breakdown, distill_term)


def _train(cfg: Config, run_dir: Path, breakdown, distill_term: DistillTerm | None) -> Path:
    resuming = _prepare_run_dir(cfg, run_dir)
    start_step = _peek_progress(run_dir).step if resuming else 0
    accelerator = make_accelerator(cfg, tracking.accelerator_trackers(cfg, run_dir, start_step))
    try:
        return _train_tracked(cfg, run_dir, breakdown, distill_term, accelerator, resuming)
    finally:
        tracking.end(accelerator)


def _prepare_run_dir(cfg: Config, run_dir: Path) -> bool:
    """`runs.prepare_run_dir` in the main process alone (the writer, holding the lock); the other
    processes of a multi-process launch wait for it and write nothing.

    Returns:
        True when the run resumes from `last/`.

    Raises:
        ConfigError: launched as several processes that accelerate would run each alone.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    state = PartialState(cpu=cfg.train.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))  # as the Accelerator's
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise ConfigError(f"train.cpu: launched as {launched} processes, but accelerate found no GPU for them "
                          "and would train each alone into the same run folder; pass train.cpu=true to train "
                          f"as {launched} CPU processes (gloo)")
    resuming = [runs.prepare_run_dir(run_dir, cfg) if state.is_main_process else None]
    broadcast_object_list(resuming)  # the others wait here until the folder is ready
    return resuming[0]


def _train_tracked(cfg: Config, run_dir: Path, breakdown, distill_term: DistillTerm | None, accelerator,
                   resuming: bool) -> Path:
    seed_everything(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model.name)
    train_split, val_split, test_split = load_splits(cfg.data, seed=cfg.train.seed,
                                                     num_labels=cfg.model.num_labels)
    teacher = None if distill_term is None else \
        torch.from_numpy(distill_term.aligned(row_ids(train_split.texts))).to(accelerator.device)
    tok = lambda split: tokenize(split.texts, tokenizer, cfg.data.max_length, cfg.data.cache_dir)  # noqa: E731
    train_ids, val_ids = tok(train_split), tok(val_split)

    model = build_model(cfg, device=accelerator.device)
    if count_trainable(model).total != breakdown.total:
        raise RuntimeError(f"the built model has {count_trainable(model).total:,} trainable parameters, the "
                           f"budget check counted {breakdown.total:,}: build_model and budget_breakdown disagree")
    record_patches(run_dir, speed_up(model, cfg, accelerator), accelerator)
    optimizer = make_optimizer(model, cfg)
    pad = tokenizer.pad_token_id
    multiple = cfg.data.pad_to_multiple_of
    train_loader = make_loader(train_ids, train_split.labels, cfg.train.batch_size, pad, shuffle=True,
                               seed=cfg.train.seed, pad_to_multiple_of=multiple)
    val_loader = make_loader(val_ids, val_split.labels, cfg.train.eval_batch_size, pad, shuffle=False,
                             pad_to_multiple_of=multiple)
    perturbed_val = _perturbed_val_loader(cfg, val_split, tok, pad) if cfg.train.select != "val_accuracy" else None
    sampler, dataset = train_loader.batch_sampler, train_loader.dataset
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if perturbed_val is not None:
        perturbed_val = (accelerator.prepare(perturbed_val[0]), perturbed_val[1])

    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.train.grad_accum))
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    average = WeightAverage(accelerator.unwrap_model(model), cfg.train.ema) if cfg.train.ema else None
    adalora = methods.adalora_steps(accelerator.unwrap_model(model), cfg)
    if adalora is not None:
        adalora.start(total_steps)
    ctx = _LoopContext(cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model, optimizer=optimizer,
                       scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
                       val_labels=val_split.labels, sampler=sampler, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch, distill=distill_term, teacher=teacher,
                       augment=_Augmenter(cfg, train_split.texts, dataset, sampler, tok),
                       average=average, perturbed_val=perturbed_val, pad_id=pad, adalora=adalora)
    prog = _peek_progress(run_dir) if resuming else Progress()
    tracking.start(accelerator, cfg, run_dir)
    if prog.round == 0:
        if resuming:
            prog = _resume(ctx, total_steps)
        _loop(ctx, prog)
    self_train_info = None
    if cfg.data.unlabelled:
        ctx, prog, self_train_info = _self_train(ctx, prog, train_split, tok, resume=prog.round == 1)

    summary = _finish(ctx, prog, breakdown, tokenizer, test_split)
    summary["class_prior"] = _class_prior(train_split.labels, cfg.model.num_labels)
    summary["shift_levers"] = _shift_levers(cfg)
    if self_train_info is not None:
        summary["self_train"] = self_train_info
    if distill_term is not None:
        summary["distill"] = distill_term.summary()
    if ctx.accelerator.is_main_process:
        runs.write_summary(run_dir, summary)
        write_report(run_dir)
        write_run_card(run_dir)
    ctx.accelerator.wait_for_everyone()  # every process returns once summary.json exists
    return run_dir


def speed_up(model, cfg: Config, accelerator) -> list[PatchResult]:
    """Same recipe, less time: apply the speed patches (speed.py) that `cfg.train` switches on.

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


def _restore(last: Path, model, optimizer, scheduler) -> Progress:
    ckpt.load_adapter_weights(model, last)
    extra = ckpt.load_training_state(last)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    # GPU dropout streams continue where they stopped when the run resumes on as many GPUs
    if len(extra.get("cuda_rng", [])) == torch.cuda.device_count() > 0:
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return Progress(**extra["state"])


def _peek_progress(run_dir: Path) -> Progress:
    """The counters of `last/` without loading anything else (which round to rebuild)."""
    import json

    return Progress(**json.loads((run_dir / runs.LAST / runs.STATE).read_text()))


def _resume(ctx: "_LoopContext", total_steps: int) -> Progress:
    """Load `last/` into the context's model, optimizer, scheduler and weight average."""
    acc = ctx.accelerator
    prog = _restore(ctx.run_dir / runs.LAST, acc.unwrap_model(ctx.model), ctx.optimizer, ctx.scheduler)
    if ctx.average is not None or ctx.adalora is not None:
        from safetensors.torch import load_file

        for name, state in (("average", ctx.average), ("adalora", ctx.adalora)):
            if state is not None:
                state.load_state_dict(load_file(str(ctx.run_dir / runs.LAST / f"{name}.safetensors")))
    if acc.is_main_process:
        runs.drop_records_after(ctx.run_dir, prog.step)
    acc.print(f"resuming {ctx.run_dir} at step {prog.step}/{total_steps}")
    return prog


def _class_prior(labels: list[int], num_labels: int) -> list[float]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    return (counts / max(counts.sum(), 1)).round(6).tolist()


def _shift_levers(cfg: Config) -> dict:
    """What the run did against distribution shift, for the summary and reports."""
    return {"augment": list(cfg.data.augment), "augment_prob": cfg.data.augment_prob if cfg.data.augment else 0.0,
            "label_smoothing": cfg.train.label_smoothing, "ema": cfg.train.ema, "select": cfg.train.select,
            "self_train": bool(cfg.data.unlabelled)}


def _perturbed_val_loader(cfg: Config, val_split, tok, pad: int) -> tuple:
    """The validation rows under every perturbation of the robustness suite, as one loader."""
    texts, labels = [], []
    for spec in SUITE:
        texts += perturb_texts(val_split.texts, spec, seed=cfg.train.seed)
        labels += val_split.labels
    from agnews_lora.data import Split

    ids = tok(Split(texts, labels))
    loader = make_loader(ids, labels, cfg.train.eval_batch_size, pad_id=pad, shuffle=False,
                         pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    return loader, labels


class _Augmenter:
    """Per-epoch training texts under `data.augment`: epoch e perturbs a seeded share of the rows
    (seed train.seed + e), re-tokenizes them and swaps them into the training dataset and its
    sampler's lengths. Validation and test rows are never touched."""

    def __init__(self, cfg: Config, texts: list[str], dataset, sampler, tok):
        self.specs = parse_specs(cfg.data.augment, key="data.augment")
        self.prob, self.seed = cfg.data.augment_prob, cfg.train.seed
        self.texts, self.dataset, self.sampler, self.tok = texts, dataset, sampler, tok
        self.changed = 0

    def __bool__(self) -> bool:
        return bool(self.specs) and self.prob > 0

    def set_epoch(self, epoch: int) -> None:
        from agnews_lora.data import Split

        texts, self.changed = augment_texts(self.texts, self.specs, prob=self.prob, seed=self.seed + epoch)
        self.dataset.ids = self.tok(Split(texts, None))
        self.dataset.lengths = np.fromiter((len(x) for x in self.dataset.ids), dtype=np.int64,
                                           count=len(self.dataset.ids))
        self.sampler.lengths = self.dataset.lengths


@dataclass
class _LoopContext:
    """What one round of the loop trains with (the self-training round replaces some fields)."""

    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # prepared by the accelerator (DDP-wrapped under several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader  # prepared
    val_loader: DataLoader  # prepared
    val_labels: list[int]
    sampler: LengthGroupedSampler  # the training loader's batch sampler (its epoch is set directly)
    total_steps: int  # optimizer steps at the end of this round
    steps_per_epoch: int
    distill: DistillTerm | None = None  # the distillation term; None = cross-entropy
    teacher: torch.Tensor | None = None  # distill's logits for the training rows, on the device, by row index
    augment: _Augmenter | None = None
    average: WeightAverage | None = None
    perturbed_val: tuple[DataLoader, list[int]] | None = None  # the validation rows under the suite
    pad_id: int = 0  # the tokenizer's padding id, for loaders built later (self-training)
    adalora: methods.AdaLoraSteps | None = None  # peft.method=adalora: rank allocation and its penalty


def _loss(ctx: _LoopContext, batch) -> torch.Tensor:
    logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    smoothing = ctx.cfg.train.label_smoothing
    penalty = 0.0 if ctx.adalora is None else ctx.adalora.penalty()  # peft adds it only when given labels
    if ctx.distill is None:
        return cross_entropy(logits, batch["labels"], smoothing) + penalty
    return ctx.distill.loss(logits, ctx.teacher[batch["index"]], batch["labels"], label_smoothing=smoothing) + penalty


class _Window:
    """What the loop counts between two reads. Loss and tokens stay on the device until a log
    line or checkpoint reads them: reading them every micro-step (loss.item()) would make each
    step wait for the accelerator. Training time runs from `start`; evaluations restart it."""

    def __init__(self, device: torch.device):
        self.loss, self.batches = torch.zeros((), device=device), 0
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # a nan/inf loss or gradient norm
        self.checked_step = 0  # the last step known to be finite
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, attention_mask: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        loss = loss.detach()
        self.loss += loss
        self.batches += 1
        self.tokens += attention_mask.sum()
        self.nonfinite |= ~torch.isfinite(loss)  # on the device: no wait for the accelerator here
        if grad_norm is not None:
            self.nonfinite |= ~torch.isfinite(grad_norm)

    def check(self, prog: Progress, cfg: Config) -> None:
        """Stop a diverged run before it logs, evaluates or saves anything more (called where the
        loop reads the device anyway).

        Raises:
            Diverged: a loss or gradient norm since the last check was not finite.
        """
        if not bool(self.nonfinite):
            self.checked_step = prog.step
            return
        clip = f"train.max_grad_norm={cfg.train.max_grad_norm:g}" if cfg.train.max_grad_norm > 0 else \
            "gradient clipping off (train.max_grad_norm=0)"
        raise Diverged(
            f"training diverged: a loss or gradient became nan/inf between step {self.checked_step} and step "
            f"{prog.step} (train.lr={cfg.train.lr:g}, {clip}, precision {cfg.train.precision}). Likely cause: a "
            "learning rate too high for this method and size; lower train.lr (or turn clipping on). Nothing was "
            f"saved from the diverged model: last/ and best/ hold the checkpoints of step {self.checked_step} or "
            "earlier; start again, or continue with train.resume=true and a lower train.lr")

    def flush(self, prog: Progress) -> float:
        """Move the tokens counted on the device into `prog.tokens`; return the training seconds
        so far (prog.train_seconds plus the time since `start`)."""
        prog.tokens += int(self.tokens.item())
        self.tokens.zero_()
        return prog.train_seconds + time.perf_counter() - self.start

    def take_loss(self) -> float:
        """The mean loss since the last call; starts a new window."""
        mean = self.loss.item() / self.batches
        self.loss.zero_()
        self.batches = 0
        return mean


def _loop(ctx: _LoopContext, prog: Progress) -> None:
    from tqdm.auto import tqdm

    acc, cfg = ctx.accelerator, ctx.cfg
    bar = tqdm(total=ctx.total_steps, initial=prog.step, desc="train", dynamic_ncols=True,
               disable=not (cfg.train.progress and acc.is_main_process))
    window = _Window(acc.device)
    while prog.step < ctx.total_steps:
        # Iterating the prepared loader re-seeds the sampler with the loader's own pass counter,
        # which never advances here (each pass is left at its last batch): set both, or every
        # epoch would replay epoch 0's order. Under DDP only the direct call reaches the sampler.
        ctx.train_loader.set_epoch(prog.epoch)
        ctx.sampler.set_epoch(prog.epoch)
        if ctx.augment:
            ctx.augment.set_epoch(prog.epoch)
        loader = acc.skip_first_batches(ctx.train_loader, prog.batches_in_epoch) \
            if prog.batches_in_epoch else ctx.train_loader
        ctx.model.train()
        window.start = time.perf_counter()
        for batch in loader:
            with acc.accumulate(ctx.model):
                loss = _loss(ctx, batch)
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(ctx.model.parameters(), cfg.train.max_grad_norm)
                ctx.optimizer.step()
                if ctx.adalora is not None and acc.sync_gradients:  # peft: after the step, before zero_grad
                    ctx.adalora.after_step(prog.step + 1)
                ctx.optimizer.zero_grad(set_to_none=True)
            prog.batches_in_epoch += 1
            prog.examples += len(batch["labels"])
            window.add(loss, batch["attention_mask"], grad_norm)
            if not acc.sync_gradients:
                continue
            if ctx.average is not None:
                ctx.average.update()
            ctx.scheduler.step()
            prog.step += 1
            bar.update(1)
            if prog.step % cfg.train.log_every == 0 or prog.step == ctx.total_steps:
                window.check(prog, cfg)
                seconds = window.flush(prog)
                rate = prog.examples / max(seconds, 1e-9)
                record = {"step": prog.step, "epoch": prog.epoch + 1, "loss": window.take_loss(),
                          "lr": ctx.scheduler.get_last_lr()[0], "examples_per_s": rate,
                          "train_seconds": round(seconds, 4), "examples": prog.examples, "tokens": prog.tokens}
                bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{rate:.1f}")
                if acc.is_main_process:
                    runs.append_record(ctx.run_dir / runs.TRAIN_LOG, record)
                tracking.log(acc, record, "train")
            epoch_done = prog.batches_in_epoch >= len(ctx.train_loader)
            eval_now = (cfg.train.eval_every and prog.step % cfg.train.eval_every == 0)
            if eval_now or prog.step == ctx.total_steps or epoch_done:
                window.check(prog, cfg)  # never evaluate or save a diverged model
                prog.train_seconds = window.flush(prog)
                if epoch_done:
                    prog.epoch, prog.batches_in_epoch = prog.epoch + 1, 0
                _evaluate_and_save(ctx, prog, completed_epoch=epoch_done)
                ctx.model.train()
                window.start = time.perf_counter()
            if prog.step >= ctx.total_steps or prog.batches_in_epoch == 0:
                break
    bar.close()


def _evaluate_and_save(ctx: _LoopContext, prog: Progress, completed_epoch: bool) -> None:
    acc = ctx.accelerator
    record = {"step": prog.step, "epoch": prog.epoch if completed_epoch else prog.epoch + 1,
              "epoch_end": completed_epoch, "train_seconds": round(prog.train_seconds, 2)}
    unwrapped = acc.unwrap_model(ctx.model)
    with ctx.average.swapped_in() if ctx.average is not None else nullcontext():
        score = _score(ctx, prog, record)
        if acc.is_main_process and score > prog.best_accuracy:
            prog.best_accuracy, prog.best_step = score, prog.step
            ckpt.save_adapter(unwrapped, ctx.run_dir / runs.BEST, extra={"step": prog.step, **record})
            record["best"] = True
    if acc.is_main_process:
        runs.append_record(ctx.run_dir / runs.METRICS, record)
        tensors = {name: state.state_dict() for name, state in (("average", ctx.average), ("adalora", ctx.adalora))
                   if state is not None}
        ckpt.save_training_state(unwrapped, ctx.optimizer, ctx.scheduler, vars(prog).copy(),
                                 ctx.run_dir / runs.LAST, tensors=tensors or None)
    tracking.log(acc, record, "eval")
    acc.wait_for_everyone()
    if "val_accuracy" in record and acc.is_main_process:
        from tqdm.auto import tqdm

        # tqdm.write: a line of its own above the progress bar, not glued to the bar's last frame
        tqdm.write(f"step {prog.step}: val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} "
                   f"F1 {record['val_f1_macro']:.4f}" + (" (best so far)" if record.get("best") else ""))


def _score(ctx: _LoopContext, prog: Progress, record: dict) -> float:
    """Evaluate on validation (and its perturbed copies when train.select asks), fill `record`,
    return the number that picks best/."""
    if not ctx.val_labels:
        return prog.step  # no validation rows: the latest checkpoint is the best one
    m = evaluate_split(ctx.model, ctx.val_loader, ctx.accelerator, ctx.val_labels)
    record.update({f"val_{k}": v for k, v in m.items() if not isinstance(v, (dict, list))})
    record["val_confusion"] = m["confusion"]
    if ctx.perturbed_val is None:
        return m["accuracy"]
    loader, labels = ctx.perturbed_val
    record["val_perturbed_accuracy"] = evaluate_split(ctx.model, loader, ctx.accelerator, labels)["accuracy"]
    return record["val_perturbed_accuracy"]


def _self_train(ctx: _LoopContext, prog: Progress, train_split, tok, resume: bool):
    """The further round: pseudo-label data.unlabelled with round 0's best model (or reload those
    labels when resuming), then train on them plus drawn training rows for self_train.steps.

    Returns:
        (the round's context, its progress, what the round did for summary.json).
    """
    import dataclasses
    import json

    from agnews_lora.data import Split

    cfg, acc = ctx.cfg, ctx.accelerator
    path = ctx.run_dir / runs.PSEUDO_LABELS
    unlabelled = _read_unlabelled(cfg)
    info = json.loads(path.read_text()) if resume else _pseudo_label(ctx, prog, tok, unlabelled)
    if not resume and acc.is_main_process:
        ckpt.atomic_write_json(path, info)
    public = {k: v for k, v in info.items() if k not in ("index", "labels")}
    if not info["index"]:
        acc.print(f"self-training: no unlabelled text above threshold {cfg.self_train.threshold}; round skipped")
        return ctx, prog, public
    rng = np.random.default_rng(cfg.train.seed)
    n_train = min(len(train_split), int(round(cfg.self_train.train_ratio * len(info["index"]))))
    drawn = np.sort(rng.choice(len(train_split), size=n_train, replace=False)).tolist()
    texts = [unlabelled.texts[i] for i in info["index"]] + [train_split.texts[i] for i in drawn]
    labels = list(info["labels"]) + [train_split.labels[i] for i in drawn]
    round_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.self_train.lr or cfg.train.lr / 2))
    loader = make_loader(tok(Split(texts, labels)), labels, cfg.train.batch_size, ctx.pad_id,
                         shuffle=True, seed=cfg.train.seed + 1, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    sampler, dataset = loader.batch_sampler, loader.dataset
    model = acc.unwrap_model(ctx.model)
    optimizer, loader = acc.prepare(make_optimizer(model, round_cfg), loader)
    steps = cfg.self_train.steps or max(1, ctx.total_steps // 4)
    scheduler = make_scheduler(optimizer, round_cfg, steps)
    average = WeightAverage(model, cfg.train.ema) if cfg.train.ema else None
    round_ctx = dataclasses.replace(
        ctx, optimizer=optimizer, scheduler=scheduler, train_loader=loader, sampler=sampler,
        total_steps=ctx.total_steps + steps, steps_per_epoch=max(1, math.ceil(len(loader) / cfg.train.grad_accum)),
        augment=_Augmenter(cfg, texts, dataset, sampler, tok), average=average)
    if resume:
        prog = _resume(round_ctx, round_ctx.total_steps)
    else:
        prog.round, prog.best_accuracy = 1, -1.0  # best/ is chosen among this round's evaluations
        prog.epoch, prog.batches_in_epoch = prog.epoch + (prog.batches_in_epoch > 0), 0
    acc.print(f"self-training: {len(info['index']):,} pseudo-labelled + {n_train:,} training rows, {steps} steps")
    _loop(round_ctx, prog)
    return round_ctx, prog, {**public, "steps": steps, "train_rows": n_train, "lr": round_cfg.train.lr}


def _read_unlabelled(cfg: Config):
    from agnews_lora.data import read_files

    return read_files(cfg.data.unlabelled, cfg.model.num_labels)


def _pseudo_label(ctx: _LoopContext, prog: Progress, tok, unlabelled) -> dict:
    """Round 0's best model labels data.unlabelled; keep the confident rows (selftrain.py)."""
    from agnews_lora.data import Split
    from agnews_lora.selftrain import select_pseudo_labels

    cfg, acc = ctx.cfg, ctx.accelerator
    model = acc.unwrap_model(ctx.model)
    ckpt.load_adapter_weights(model, ctx.run_dir / runs.BEST)
    temperature = _calibration(ctx)["temperature"]
    loader = acc.prepare(make_loader(tok(Split(unlabelled.texts, None)), None, cfg.train.eval_batch_size,
                                     ctx.pad_id, shuffle=False,
                                     pad_to_multiple_of=cfg.data.pad_to_multiple_of))
    probs = softmax(predict_logits(ctx.model, loader, acc, len(unlabelled)), temperature)
    index, labels = select_pseudo_labels(probs, threshold=cfg.self_train.threshold, balance=cfg.self_train.balance)
    return {"source": unlabelled.source, "unlabelled_rows": len(unlabelled), "threshold": cfg.self_train.threshold,
            "balance": cfg.self_train.balance, "temperature": temperature, "rows": len(index),
            "per_class": np.bincount(labels, minlength=cfg.model.num_labels).tolist(),
            "round0_best_val_accuracy": prog.best_accuracy, "round0_best_step": prog.best_step,
            "index": index.tolist(), "labels": labels.tolist()}


def _calibration(ctx: _LoopContext) -> dict:
    """Temperature fitted on validation (best/ loaded), with validation NLL/ECE before and after."""
    if not ctx.val_labels:
        return {"temperature": 1.0}
    logits = predict_logits(ctx.model, ctx.val_loader, ctx.accelerator, len(ctx.val_labels))
    t = fit_temperature(logits, ctx.val_labels)
    return {"temperature": round(t, 6), "fitted_on": "validation", "val_nll_before": nll(logits, ctx.val_labels),
            "val_nll_after": nll(logits, ctx.val_labels, t),
            "val_ece_before": expected_calibration_error(softmax(logits), ctx.val_labels),
            "val_ece_after": expected_calibration_error(softmax(logits, t), ctx.val_labels)}


def _finish(ctx: _LoopContext, prog: Progress, breakdown, tokenizer, test_split) -> dict:
    """Reload the best checkpoint, score the test split if labelled, and build the summary."""
    acc, cfg = ctx.accelerator, ctx.cfg
    model = acc.unwrap_model(ctx.model)
    ckpt.load_adapter_weights(model, ctx.run_dir / runs.BEST)
    # Each DDP process counted its own rows; the summary's rates are for all processes together.
    examples, tokens = acc.reduce(torch.tensor([prog.examples, prog.tokens], device=acc.device), "sum").tolist()
    summary = {"run": str(ctx.run_dir), "model": cfg.model.name, "head": cfg.model.head,
               "trainable": breakdown.to_dict(), "steps": prog.step, "epochs_completed": prog.epoch,
               "best_step": prog.best_step, "best_val_accuracy": prog.best_accuracy if ctx.val_labels else None,
               "train_seconds": round(prog.train_seconds, 2),
               "train_examples_per_s": round(examples / max(prog.train_seconds, 1e-9), 2),
               "train_tokens_per_s": round(tokens / max(prog.train_seconds, 1e-9), 1),
               "precision": acc.mixed_precision, "device": str(acc.device), "processes": acc.num_processes,
               "calibration": _calibration(ctx), "peft_method": cfg.peft.method}
    if ctx.adalora is not None:  # the ranks of best/ (pruned singular values are zeros in it)
        ranks = ctx.adalora.ranks()
        summary["adalora"] = {"init_r": cfg.peft.adalora.init_r, "target_r": cfg.peft.adalora.target_r,
                              "total_rank": sum(ranks.values()), "ranks": ranks}
    if test_split is not None and test_split.labels is not None:
        ids = tokenize(test_split.texts, tokenizer, cfg.data.max_length, cfg.data.cache_dir)
        loader = acc.prepare(make_loader(ids, test_split.labels, cfg.train.eval_batch_size,
                                         tokenizer.pad_token_id, shuffle=False,
                                         pad_to_multiple_of=cfg.data.pad_to_multiple_of))
        logits = predict_logits(model, loader, acc, len(test_split.labels))
        m = split_metrics(logits, test_split.labels, temperature=summary["calibration"]["temperature"])
        m["data"] = test_split.source
        if acc.is_main_process:
            runs.write_test_metrics(ctx.run_dir, m)
            runs.write_predictions(ctx.run_dir / runs.TEST_PREDICTIONS, test_split.labels, logits, test_split.source)
        summary["test_accuracy"] = m["accuracy"]
        summary["test_f1_macro"] = m["f1_macro"]
        tracking.log(acc, {"step": prog.step, **m}, "test")
    return summary
