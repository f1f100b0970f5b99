"""train(cfg): the recipe. Check the budget, claim and lock the run folder, build the model,
data and optimizer on accelerate, run the loop (loop.py) and the self-training round when
data.unlabelled is set (selftrain.py), then score best/ on the test split and write summary.json.

report.md and the model card are the command layer's (writeup.finish_run), from the run folder
this returns.
"""

from __future__ import annotations

import itertools
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from agnews_lora import checkpoint as ckpt
from agnews_lora import lora_init, methods, runs, tracking
from agnews_lora.augment import Augmenter, perturbed_val_loader
from agnews_lora.averaging import WeightAverage
from agnews_lora.config import Config
from agnews_lora.data import load_splits, make_loader, resolve_labels, row_ids, seed_everything, tokenize
from agnews_lora.errors import ConfigError
from agnews_lora.losses import DistillTerm
from agnews_lora.loop import (LoopContext, Progress, calibrate, make_optimizer, make_scheduler, peek_progress,
                              resume, run_loop, score_test)
from agnews_lora.model import (Breakdown, budget_breakdown, build_model, check_budget, check_max_length,
                               count_trainable, load_tokenizer)
from agnews_lora.outputs import claim_folder
from agnews_lora.precision import accelerate_name, resolve_precision
from agnews_lora.selftrain import self_train
from agnews_lora.speed import record_patches, speed_up


def run_dir_for(cfg: Config) -> Path:
    """The run folder: out_dir, else runs/NAME (name, else the start time)."""
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


def train(cfg: Config, distill_term: DistillTerm | None = None,
          on_evaluate: Callable[[dict], None] | None = None) -> Path:
    """Train a classifier with the adapters of cfg.peft.method as the config says; return the run folder.

    Args:
        cfg: resolved config; classes it leaves open (data.labels, model.num_labels) are taken
            from the training data (`data.resolve_labels`) and written into the run's config.yaml.
        distill_term: optional knowledge-distillation term (losses.DistillTerm, built by
            `distill`): the loss is then the distillation loss against its teacher logits, taken
            for each training row by row identity; summary.json records its teacher.
        on_evaluate: called with each evaluation's record (its step and val_* metrics) once the
            checkpoints hold it; an exception it raises stops the run there, its folder resumable
            (a sweep reports to its pruner this way).

    Returns:
        The run folder holding config.yaml, metrics.jsonl, best/ (adapter + head), summary.json;
        `writeup.finish_run` adds report.md and the model card.
    """
    cfg = resolve_labels(cfg)
    run_dir = run_dir_for(cfg)
    if runs.writer_process() and not runs.holds_lock(run_dir):  # else distill claimed it before locking
        claim_folder(run_dir, kind="run", label="out_dir")
    breakdown = preflight(cfg)
    with runs.writer_lock(run_dir):  # one writer per run folder; released however train ends
        return _train(cfg, run_dir, breakdown, distill_term, on_evaluate)


def _train(cfg: Config, run_dir: Path, breakdown, distill_term: DistillTerm | None, on_evaluate) -> Path:
    resuming = _prepare_run_dir(cfg, run_dir)
    start_step = peek_progress(run_dir).step if resuming else 0
    accelerator = make_accelerator(cfg, tracking.accelerator_trackers(cfg, run_dir, start_step))
    try:
        return _train_tracked(cfg, run_dir, breakdown, distill_term, accelerator, resuming, on_evaluate)
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
                   resuming: bool, on_evaluate=None) -> Path:
    """Data, model and loop context; round 0 (resumed from last/ when `resuming`), the
    self-training round, then the summary (every process returns once it is written)."""
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.name)
    train_split, val_split, test_split = load_splits(cfg.data, seed=cfg.train.seed,
                                                     num_labels=cfg.model.num_labels)
    tok = lambda split: tokenize(split.texts, tokenizer, cfg.data.max_length, cfg.data.cache_dir)  # noqa: E731
    ctx = _loop_context(cfg, run_dir, accelerator, breakdown=breakdown, distill_term=distill_term,
                        splits=(train_split, val_split), tok=tok, pad=tokenizer.pad_token_id)
    ctx.on_evaluate = on_evaluate
    prog = peek_progress(run_dir) if resuming else Progress()
    tracking.start(accelerator, cfg, run_dir)
    if prog.round == 0:
        if resuming:
            prog = resume(ctx, ctx.total_steps)
        run_loop(ctx, prog)
    self_train_info = None
    if cfg.data.unlabelled:
        ctx, prog, self_train_info = self_train(ctx, prog, train_split, tok, resume_round=prog.round == 1)

    summary = _finish(ctx, prog, breakdown, tok, test_split)
    summary["class_prior"] = _class_prior(train_split.labels, cfg.model.num_labels)
    summary["shift_levers"] = _shift_levers(cfg)
    if self_train_info is not None:
        summary["self_train"] = self_train_info
    if distill_term is not None:
        summary["distill"] = distill_term.summary()
    if accelerator.is_main_process:
        runs.write_summary(run_dir, summary)
    accelerator.wait_for_everyone()  # every process returns once summary.json exists
    return run_dir


def _loop_context(cfg: Config, run_dir: Path, accelerator, breakdown, distill_term: DistillTerm | None,
                  splits: tuple, tok, pad: int) -> LoopContext:
    """Round 0's context: the model (speed patches applied and recorded), loaders, optimizer and
    schedule prepared by the accelerator, the weight average, AdaLoRA's steps, augmentation."""
    train_split, val_split = splits
    teacher = None if distill_term is None else \
        torch.from_numpy(distill_term.aligned(row_ids(train_split.texts))).to(accelerator.device)
    train_ids, val_ids = tok(train_split), tok(val_split)
    init_data = _init_batches(cfg, train_ids, train_split.labels, pad=pad, device=accelerator.device)
    model = _model(cfg, run_dir, accelerator=accelerator, breakdown=breakdown, init_data=init_data)
    initial = lora_init.initial_adapter(model)  # before any step: what checkpoints are converted with
    optimizer = make_optimizer(model, cfg)
    multiple = cfg.data.pad_to_multiple_of
    train_loader = make_loader(train_ids, train_split.labels, cfg.train.batch_size, pad, shuffle=True,
                               seed=cfg.train.seed, pad_to_multiple_of=multiple)
    val_loader = make_loader(val_ids, val_split.labels, cfg.train.eval_batch_size, pad, shuffle=False,
                             pad_to_multiple_of=multiple)
    perturbed_val = perturbed_val_loader(cfg, val_split, tok, pad) if cfg.train.select != "val_accuracy" else None
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
    return LoopContext(cfg=cfg, run_dir=run_dir, accelerator=accelerator, model=model, optimizer=optimizer,
                       scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
                       val_labels=val_split.labels, sampler=sampler, total_steps=total_steps,
                       steps_per_epoch=steps_per_epoch, distill=distill_term, teacher=teacher,
                       augment=Augmenter(cfg, train_split.texts, dataset, sampler, tok),
                       average=average, perturbed_val=perturbed_val, pad_id=pad, adalora=adalora,
                       initial_adapter=initial)


def _init_batches(cfg: Config, train_ids: list, labels: list[int], pad: int, device) -> list[dict] | None:
    """The first lora.init_batches batches of a seeded shuffle of the training rows, for the
    initialisations that read data (EVA, CorDA, LoRA-GA); None for the others. Validation and test
    rows are never read. The global RNG is left as it was (the loop's dropout stream)."""
    if not lora_init.needs_data(cfg):
        return None
    loader = make_loader(train_ids, labels, cfg.train.batch_size, pad, shuffle=True, seed=cfg.train.seed,
                         pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    with torch.random.fork_rng(devices=[]):
        return [{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
                for batch in itertools.islice(loader, cfg.lora.init_batches)]


def _model(cfg: Config, run_dir: Path, accelerator, breakdown, init_data: list[dict] | None = None) -> torch.nn.Module:
    """build_model on the accelerator's device (with the data-driven init's batches), its count checked
    against the budget's, speed patches applied and recorded (speed_patches.json)."""
    model = build_model(cfg, device=accelerator.device, init_data=init_data)
    if count_trainable(model).total != breakdown.total:
        raise RuntimeError(f"the built model has {count_trainable(model).total:,} trainable parameters, the "
                           f"budget check counted {breakdown.total:,}: build_model and budget_breakdown disagree")
    record_patches(run_dir, speed_up(model, cfg, accelerator), accelerator)
    return model


def _finish(ctx: LoopContext, prog: Progress, breakdown, tok, test_split) -> dict:
    """Reload the best checkpoint, score the test split if labelled, and build the summary."""
    acc, cfg = ctx.accelerator, ctx.cfg
    ckpt.load_adapter_weights(acc.unwrap_model(ctx.model), ctx.run_dir / runs.BEST)
    # Each DDP process counted its own rows; the summary's rates are for all processes together.
    examples, tokens = acc.reduce(torch.tensor([prog.examples, prog.tokens], device=acc.device), "sum").tolist()
    summary = {"run": str(ctx.run_dir), "model": cfg.model.name, "head": cfg.model.head,
               "trainable": breakdown.to_dict(), "steps": prog.step, "epochs_completed": prog.epoch,
               "best_step": prog.best_step, "best_val_accuracy": prog.best_accuracy if ctx.val_labels else None,
               "train_seconds": round(prog.train_seconds, 2),
               "train_examples_per_s": round(examples / max(prog.train_seconds, 1e-9), 2),
               "train_tokens_per_s": round(tokens / max(prog.train_seconds, 1e-9), 1),
               "precision": acc.mixed_precision, "device": str(acc.device), "processes": acc.num_processes,
               "calibration": calibrate(ctx), "peft_method": cfg.peft.method}
    if ctx.adalora is not None:  # the ranks of best/ (pruned singular values are zeros in it)
        ranks = ctx.adalora.ranks()
        summary["adalora"] = {"init_r": cfg.peft.adalora.init_r, "target_r": cfg.peft.adalora.target_r,
                              "total_rank": sum(ranks.values()), "ranks": ranks}
    if test_split is not None and test_split.labels is not None:
        m = score_test(ctx, prog.step, test_split, ids=tok(test_split),
                       temperature=summary["calibration"]["temperature"])
        summary["test_accuracy"] = m["accuracy"]
        summary["test_f1_macro"] = m["f1_macro"]
    return summary


def _class_prior(labels: list[int], num_labels: int) -> list[float]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    return (counts / max(counts.sum(), 1)).round(6).tolist()


def _shift_levers(cfg: Config) -> dict:
    """What the run did against distribution shift, for the summary and reports."""
    return {"augment": list(cfg.data.augment), "augment_prob": cfg.data.augment_prob if cfg.data.augment else 0.0,
            "label_smoothing": cfg.train.label_smoothing, "ema": cfg.train.ema, "select": cfg.train.select,
            "self_train": bool(cfg.data.unlabelled)}
