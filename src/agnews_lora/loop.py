"""The training loop on accelerate: one round of optimizer steps over a `LoopContext`, with its
log windows, evaluations, best/ and last/ checkpoints and resume from last/; and the evaluation
functions the loop and the recipe (train.py) share.

train.py builds the context (model, optimizer, loaders) and the summary; the self-training round
(selftrain.py) runs the loop once more on a changed context.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from agnews_lora import checkpoint as ckpt
from agnews_lora import methods, runs, tracking
from agnews_lora.averaging import WeightAverage
from agnews_lora.calibration import expected_calibration_error, fit_temperature, nll, softmax
from agnews_lora.config import Config
from agnews_lora.data import LengthGroupedSampler, make_loader
from agnews_lora.errors import Diverged
from agnews_lora.evaluate import compute_metrics
from agnews_lora.losses import DistillTerm, cross_entropy

if TYPE_CHECKING:
    from accelerate import Accelerator

    from agnews_lora.augment import Augmenter


def make_optimizer(model, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm; fused kernel where torch has one.

    LoRA+ (train.loraplus_lr_ratio > 0): LoRA's B matrices form a group of their own at train.lr x the
    ratio (the split of peft's `create_loraplus_optimizer`, with this optimizer's weight decay rules).
    The scheduler scales every group's rate alike, so the ratio holds over the whole schedule.
    """
    ratio = cfg.train.loraplus_lr_ratio
    decay, no_decay, lora_b = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ratio > 0 and ".lora_B." in name:
            lora_b.append(p)
        else:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if lora_b:
        groups.append({"params": lora_b, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.lr * ratio})
    try:
        return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.train.lr, foreach=True)


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    """train.scheduler (linear, cosine or constant) after a warmup of train.warmup_ratio of `total_steps`."""
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


def evaluate_split(model, loader, accelerator, labels: list[int], temperature: float | None = None,
                   names: Sequence[str] = ()) -> dict:
    """Loss and all metrics of the model on one labelled split (per class under `names`, the class
    names by label id); with `temperature`, also the expected calibration error and NLL before and
    after temperature scaling."""
    return split_metrics(predict_logits(model, loader, accelerator, len(labels)), labels, temperature, names)


def split_metrics(logits: np.ndarray, labels: list[int], temperature: float | None = None,
                  names: Sequence[str] = ()) -> dict:
    """evaluate_split's metrics from logits already computed."""
    y = torch.tensor(labels)
    metrics = compute_metrics(labels, logits.argmax(-1).tolist(), runs.label_names(logits.shape[1], names=names))
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


@dataclass
class LoopContext:
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
    augment: Augmenter | None = None
    average: WeightAverage | None = None
    perturbed_val: tuple[DataLoader, list[int]] | None = None  # the validation rows under the suite
    pad_id: int = 0  # the tokenizer's padding id, for loaders built later (self-training)
    adalora: methods.AdaLoraSteps | None = None  # peft.method=adalora: rank allocation and its penalty
    # lora.init pissa/olora/corda/lora_ga: the adapter as initialised, which checkpoints are converted with
    initial_adapter: dict[str, torch.Tensor] | None = None
    # Called with each evaluation's record (step, val_* metrics) once best/ and last/ hold it, on every
    # process; an exception it raises stops training there (a sweep's pruner raises optuna.TrialPruned).
    on_evaluate: Callable[[dict], None] | None = None


def _loss(ctx: LoopContext, batch) -> torch.Tensor:
    """The training loss of one batch: cross-entropy, or the distillation term, plus AdaLoRA's penalty."""
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


def run_loop(ctx: LoopContext, prog: Progress) -> None:
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


def _evaluate_and_save(ctx: LoopContext, prog: Progress, completed_epoch: bool) -> None:
    acc = ctx.accelerator
    record = {"step": prog.step, "epoch": prog.epoch if completed_epoch else prog.epoch + 1,
              "epoch_end": completed_epoch, "train_seconds": round(prog.train_seconds, 2)}
    unwrapped = acc.unwrap_model(ctx.model)
    with ctx.average.swapped_in() if ctx.average is not None else nullcontext():
        score = _score(ctx, prog, record)
        if acc.is_main_process and score > prog.best_accuracy:
            prog.best_accuracy, prog.best_step = score, prog.step
            ckpt.save_adapter(unwrapped, ctx.run_dir / runs.BEST, extra={"step": prog.step, **record},
                              initial=ctx.initial_adapter)
            record["best"] = True
    if acc.is_main_process:
        runs.append_record(ctx.run_dir / runs.METRICS, record)
        tensors = {name: state.state_dict() for name, state in (("average", ctx.average), ("adalora", ctx.adalora))
                   if state is not None}
        ckpt.save_training_state(unwrapped, ctx.optimizer, ctx.scheduler, vars(prog).copy(),
                                 ctx.run_dir / runs.LAST, tensors=tensors or None, initial=ctx.initial_adapter)
    tracking.log(acc, record, "eval")
    acc.wait_for_everyone()
    if "val_accuracy" in record and acc.is_main_process:
        from tqdm.auto import tqdm

        # tqdm.write: a line of its own above the progress bar, not glued to the bar's last frame
        tqdm.write(f"step {prog.step}: val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} "
                   f"F1 {record['val_f1_macro']:.4f}" + (" (best so far)" if record.get("best") else ""))
    if ctx.on_evaluate is not None:
        ctx.on_evaluate(record)


def _score(ctx: LoopContext, prog: Progress, record: dict) -> float:
    """Evaluate on validation (and its perturbed copies when train.select asks), fill `record`,
    return the number that picks best/."""
    if not ctx.val_labels:
        return prog.step  # no validation rows: the latest checkpoint is the best one
    m = evaluate_split(ctx.model, ctx.val_loader, ctx.accelerator, ctx.val_labels, names=ctx.cfg.data.labels)
    record.update({f"val_{k}": v for k, v in m.items() if not isinstance(v, (dict, list))})
    record["val_confusion"] = m["confusion"]
    if ctx.perturbed_val is None:
        return m["accuracy"]
    loader, labels = ctx.perturbed_val
    record["val_perturbed_accuracy"] = evaluate_split(ctx.model, loader, ctx.accelerator, labels)["accuracy"]
    return record["val_perturbed_accuracy"]


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


def peek_progress(run_dir: Path) -> Progress:
    """The counters of `last/` without loading anything else (which round to rebuild)."""
    import json

    return Progress(**json.loads((run_dir / runs.LAST / runs.STATE).read_text()))


def resume(ctx: LoopContext, total_steps: int) -> Progress:
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


def calibrate(ctx: LoopContext) -> dict:
    """Temperature fitted on validation (best/ loaded), with validation NLL/ECE before and after."""
    if not ctx.val_labels:
        return {"temperature": 1.0}
    logits = predict_logits(ctx.model, ctx.val_loader, ctx.accelerator, len(ctx.val_labels))
    t = fit_temperature(logits, ctx.val_labels)
    return {"temperature": round(t, 6), "fitted_on": "validation", "val_nll_before": nll(logits, ctx.val_labels),
            "val_nll_after": nll(logits, ctx.val_labels, t),
            "val_ece_before": expected_calibration_error(softmax(logits), ctx.val_labels),
            "val_ece_after": expected_calibration_error(softmax(logits, t), ctx.val_labels)}


def score_test(ctx: LoopContext, step: int, split, ids: list, temperature: float) -> dict:
    """Score the model as loaded (best/) on the labelled test split; write test_metrics.json and
    test_predictions.npz (main process) and log the metrics to the trackers.

    Args:
        ctx: the last round's context.
        step: the optimizer step the metrics are logged at.
        split: the test Split (labelled).
        ids: its token ids, tokenized as the run's other splits.
        temperature: the fitted temperature (`calibrate`), for the calibrated ECE and NLL.

    Returns:
        The test metrics (`split_metrics`), with the rows' source under "data".
    """
    acc, cfg = ctx.accelerator, ctx.cfg
    loader = acc.prepare(make_loader(ids, split.labels, cfg.train.eval_batch_size, ctx.pad_id, shuffle=False,
                                     pad_to_multiple_of=cfg.data.pad_to_multiple_of))
    logits = predict_logits(acc.unwrap_model(ctx.model), loader, acc, len(split.labels))
    m = split_metrics(logits, split.labels, temperature=temperature, names=ctx.cfg.data.labels)
    m["data"] = split.source
    if acc.is_main_process:
        runs.write_test_metrics(ctx.run_dir, m)
        runs.write_predictions(ctx.run_dir / runs.TEST_PREDICTIONS, split.labels, logits, split.source)
    tracking.log(acc, {"step": step, **m}, "test")
    return m
