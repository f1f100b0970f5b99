"""train(cfg): the loop on accelerate, per-epoch evaluation, best checkpoint, resume."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from agnews_lora import checkpoint as ckpt
from agnews_lora import runs
from agnews_lora.config import Config, ConfigError
from agnews_lora.data import load_splits, make_loader, seed_everything, tokenize
from agnews_lora.evaluate import compute_metrics
from agnews_lora.losses import cross_entropy, distillation_loss
from agnews_lora.model import (budget_breakdown, build_model, check_budget, check_max_length, count_trainable,
                               load_tokenizer)
from agnews_lora.report import write_report
from agnews_lora.speed import (cast_frozen_linears, cast_inputs_once, compile_layers, first_token_last_layer,
                               use_fast_dropout)


def run_dir_for(cfg: Config) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser()
    name = cfg.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / name


def resolve_precision(precision: str, cpu: bool = False) -> str:
    """'auto' -> bf16 where the hardware computes it natively, else fp16 on CUDA, else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # One process may train several times (tests, sweeps): let each run pick its precision.
        AcceleratorState._reset_state(reset_partial_state=False)
    precision = resolve_precision(cfg.train.precision, cfg.train.cpu)
    return Accelerator(mixed_precision="no" if precision in ("fp32", "no") else precision,
                       gradient_accumulation_steps=cfg.train.grad_accum, cpu=cfg.train.cpu)


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


def evaluate_split(model, loader, accelerator, labels: list[int]) -> dict:
    """Loss and all metrics of the model on one labelled split."""
    logits = predict_logits(model, loader, accelerator, len(labels))
    y = torch.tensor(labels)
    metrics = compute_metrics(labels, logits.argmax(-1).tolist(), runs.label_names(logits.shape[1]))
    metrics["loss"] = float(cross_entropy(torch.from_numpy(logits), y))
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


def train(cfg: Config, teacher_logits: np.ndarray | None = None, extra_summary: dict | None = None) -> Path:
    """Train a LoRA classifier as the config says; return the run folder.

    Args:
        cfg: resolved config.
        teacher_logits: optional [train rows, classes] logits; when given the loss is the
            distillation loss with cfg.distill.temperature and cfg.distill.alpha.
        extra_summary: merged into summary.json (e.g. the teacher's identity).

    Returns:
        The run folder holding config.yaml, metrics.jsonl, best/ (adapter + head), summary.json.
    """
    run_dir = run_dir_for(cfg)
    breakdown = budget_breakdown(cfg)
    check_budget(breakdown, cfg.budget.max_trainable)  # before any folder, data or weights are touched
    check_max_length(cfg)
    with runs.writer_lock(run_dir):  # one writer per run folder; released however train ends
        return _train(cfg, run_dir, breakdown, teacher_logits, extra_summary)


def _train(cfg: Config, run_dir: Path, breakdown, teacher_logits: np.ndarray | None,
           extra_summary: dict | None) -> Path:
    resuming = runs.prepare_run_dir(run_dir, cfg)
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model.name)
    train_split, val_split, test_split = load_splits(cfg.data, seed=cfg.train.seed,
                                                     num_labels=cfg.model.num_labels)
    if teacher_logits is not None and len(teacher_logits) != len(train_split):
        raise ValueError(f"teacher logits cover {len(teacher_logits)} rows, training data has {len(train_split)}")
    tok = lambda split: tokenize(split.texts, tokenizer, cfg.data.max_length, cfg.data.cache_dir)  # noqa: E731
    train_ids, val_ids = tok(train_split), tok(val_split)

    model = build_model(cfg, device=accelerator.device)
    assert count_trainable(model).total == breakdown.total
    speed_up(model, cfg, accelerator)
    optimizer = make_optimizer(model, cfg)
    pad = tokenizer.pad_token_id
    multiple = cfg.data.pad_to_multiple_of
    train_loader = make_loader(train_ids, train_split.labels, cfg.train.batch_size, pad, shuffle=True,
                               seed=cfg.train.seed, pad_to_multiple_of=multiple)
    val_loader = make_loader(val_ids, val_split.labels, cfg.train.eval_batch_size, pad, shuffle=False,
                             pad_to_multiple_of=multiple)
    sampler = train_loader.batch_sampler
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    steps_per_epoch = max(1, math.ceil(len(train_loader) / cfg.train.grad_accum))
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    prog = Progress()
    if resuming:
        prog = _restore(run_dir / "last", accelerator.unwrap_model(model), optimizer, scheduler)
        if accelerator.is_main_process:
            runs.drop_records_after(run_dir, prog.step)
        accelerator.print(f"resuming {run_dir} at step {prog.step}/{total_steps}")

    teacher = None if teacher_logits is None else torch.from_numpy(teacher_logits).to(accelerator.device)
    ctx = _LoopContext(cfg, run_dir, accelerator, model, optimizer, scheduler, train_loader, val_loader,
                       val_split.labels, sampler, teacher, total_steps, steps_per_epoch)
    _loop(ctx, prog)

    summary = _finish(ctx, prog, breakdown, tokenizer, test_split)
    if extra_summary:
        summary.update(extra_summary)
    if ctx.accelerator.is_main_process:
        runs.write_summary(run_dir, summary)
        write_report(run_dir)
    ctx.accelerator.wait_for_everyone()  # every process returns once summary.json exists
    return run_dir


def speed_up(model, cfg: Config, accelerator) -> None:
    """Same recipe, less time (see speed.py): fast CPU dropout, frozen Linear weights stored in
    the autocast dtype (bit-identical under autocast), on CPU one cast per shared input, the
    last layer computed for the first token only (all the head reads), optional regional
    torch.compile."""
    cpu = accelerator.device.type == "cpu"
    first_token_last_layer(model)
    if cfg.train.fast_dropout and cpu:
        use_fast_dropout(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    if dtype is not None:
        cast_frozen_linears(model, dtype)
        if cpu:
            cast_inputs_once(model)
    if cfg.train.compile:
        compile_layers(model)


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


@dataclass
class _LoopContext:
    cfg: Config
    run_dir: Path
    accelerator: object
    model: object
    optimizer: object
    scheduler: object
    train_loader: object
    val_loader: object
    val_labels: list
    sampler: object
    teacher: torch.Tensor | None
    total_steps: int
    steps_per_epoch: int


def _loss(ctx: _LoopContext, batch) -> torch.Tensor:
    logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if ctx.teacher is None:
        return cross_entropy(logits, batch["labels"])
    return distillation_loss(logits, ctx.teacher[batch["index"]], batch["labels"],
                             temperature=ctx.cfg.distill.temperature, alpha=ctx.cfg.distill.alpha)


def _loop(ctx: _LoopContext, prog: Progress) -> None:
    from tqdm.auto import tqdm

    acc, cfg = ctx.accelerator, ctx.cfg
    bar = tqdm(total=ctx.total_steps, initial=prog.step, desc="train", dynamic_ncols=True,
               disable=not (cfg.train.progress and acc.is_main_process))
    # Loss and token count stay on the device until a log line or checkpoint reads them: reading
    # them every micro-step (loss.item()) would make each step wait for the accelerator.
    window_loss, window_n = torch.zeros((), device=acc.device), 0
    tokens = torch.zeros((), dtype=torch.long, device=acc.device)
    while prog.step < ctx.total_steps:
        # Iterating the prepared loader re-seeds the sampler with the loader's own pass counter,
        # which never advances here (each pass is left at its last batch): set both, or every
        # epoch would replay epoch 0's order. Under DDP only the direct call reaches the sampler.
        ctx.train_loader.set_epoch(prog.epoch)
        ctx.sampler.set_epoch(prog.epoch)
        loader = acc.skip_first_batches(ctx.train_loader, prog.batches_in_epoch) \
            if prog.batches_in_epoch else ctx.train_loader
        ctx.model.train()
        t0 = time.perf_counter()
        for batch in loader:
            with acc.accumulate(ctx.model):
                loss = _loss(ctx, batch)
                acc.backward(loss)
                if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                    acc.clip_grad_norm_(ctx.model.parameters(), cfg.train.max_grad_norm)
                ctx.optimizer.step()
                ctx.optimizer.zero_grad(set_to_none=True)
            prog.batches_in_epoch += 1
            prog.examples += len(batch["labels"])
            tokens += batch["attention_mask"].sum()
            window_loss += loss.detach()
            window_n += 1
            if not acc.sync_gradients:
                continue
            ctx.scheduler.step()
            prog.step += 1
            bar.update(1)
            if prog.step % cfg.train.log_every == 0 or prog.step == ctx.total_steps:
                prog.tokens += int(tokens.item())
                tokens.zero_()
                seconds = prog.train_seconds + time.perf_counter() - t0
                rate = prog.examples / max(seconds, 1e-9)
                record = {"step": prog.step, "epoch": prog.epoch + 1, "loss": window_loss.item() / window_n,
                          "lr": ctx.scheduler.get_last_lr()[0], "examples_per_s": rate,
                          "train_seconds": round(seconds, 4), "examples": prog.examples, "tokens": prog.tokens}
                bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{rate:.1f}")
                if acc.is_main_process:
                    ckpt.append_jsonl(ctx.run_dir / "train_log.jsonl", record)
                window_loss.zero_()
                window_n = 0
            epoch_done = prog.batches_in_epoch >= len(ctx.train_loader)
            eval_now = (cfg.train.eval_every and prog.step % cfg.train.eval_every == 0)
            if eval_now or prog.step == ctx.total_steps or epoch_done:
                prog.train_seconds += time.perf_counter() - t0
                prog.tokens += int(tokens.item())
                tokens.zero_()
                if epoch_done:
                    prog.epoch, prog.batches_in_epoch = prog.epoch + 1, 0
                _evaluate_and_save(ctx, prog, completed_epoch=epoch_done)
                ctx.model.train()
                t0 = time.perf_counter()
            if prog.step >= ctx.total_steps or prog.batches_in_epoch == 0:
                break
    bar.close()


def _evaluate_and_save(ctx: _LoopContext, prog: Progress, completed_epoch: bool) -> None:
    acc = ctx.accelerator
    record = {"step": prog.step, "epoch": prog.epoch if completed_epoch else prog.epoch + 1,
              "epoch_end": completed_epoch, "train_seconds": round(prog.train_seconds, 2)}
    if ctx.val_labels:
        m = evaluate_split(ctx.model, ctx.val_loader, acc, ctx.val_labels)
        record.update({f"val_{k}": v for k, v in m.items() if not isinstance(v, (dict, list))})
        record["val_confusion"] = m["confusion"]
        score = m["accuracy"]
    else:
        score = prog.step  # no validation rows: the latest checkpoint is the best one
    unwrapped = acc.unwrap_model(ctx.model)
    if acc.is_main_process:
        if score > prog.best_accuracy:
            prog.best_accuracy, prog.best_step = score, prog.step
            ckpt.save_adapter(unwrapped, ctx.run_dir / "best", extra={"step": prog.step, **record})
            record["best"] = True
        ckpt.append_jsonl(ctx.run_dir / "metrics.jsonl", record)
        ckpt.save_training_state(unwrapped, ctx.optimizer, ctx.scheduler, vars(prog).copy(),
                                 ctx.run_dir / "last")
    acc.wait_for_everyone()
    if "val_accuracy" in record:
        acc.print(f"step {prog.step}: val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} "
                  f"F1 {record['val_f1_macro']:.4f}")


def _finish(ctx: _LoopContext, prog: Progress, breakdown, tokenizer, test_split) -> dict:
    """Reload the best checkpoint, score the test split if labelled, and build the summary."""
    acc, cfg = ctx.accelerator, ctx.cfg
    model = acc.unwrap_model(ctx.model)
    ckpt.load_adapter_weights(model, ctx.run_dir / "best")
    # Each DDP process counted its own rows; the summary's rates are for all processes together.
    examples, tokens = acc.reduce(torch.tensor([prog.examples, prog.tokens], device=acc.device), "sum").tolist()
    summary = {"run": str(ctx.run_dir), "model": cfg.model.name, "head": cfg.model.head,
               "trainable": breakdown.to_dict(), "steps": prog.step, "epochs_completed": prog.epoch,
               "best_step": prog.best_step, "best_val_accuracy": prog.best_accuracy if ctx.val_labels else None,
               "train_seconds": round(prog.train_seconds, 2),
               "train_examples_per_s": round(examples / max(prog.train_seconds, 1e-9), 2),
               "train_tokens_per_s": round(tokens / max(prog.train_seconds, 1e-9), 1),
               "precision": acc.mixed_precision, "device": str(acc.device), "processes": acc.num_processes}
    if test_split is not None and test_split.labels is not None:
        ids = tokenize(test_split.texts, tokenizer, cfg.data.max_length, cfg.data.cache_dir)
        loader = acc.prepare(make_loader(ids, test_split.labels, cfg.train.eval_batch_size,
                                         tokenizer.pad_token_id, shuffle=False,
                                         pad_to_multiple_of=cfg.data.pad_to_multiple_of))
        m = evaluate_split(model, loader, acc, test_split.labels)
        m["data"] = test_split.source
        if acc.is_main_process:
            ckpt.atomic_write_json(ctx.run_dir / "test_metrics.json", m)
        summary["test_accuracy"] = m["accuracy"]
        summary["test_f1_macro"] = m["f1_macro"]
        acc.print(f"test accuracy {m['accuracy']:.4f} ({len(test_split):,} rows)")
    return summary
