"""Self-training (data.unlabelled): a further round of the loop after training. Round 0's best
model labels the unlabelled texts (`select_pseudo_labels` keeps the confident ones, a pure
function); the round then trains on them plus drawn training rows, in the same run folder.

The round continues the run: the same accelerator, model and step counter, records appended to
the same logs, `last/` resumable in either round (Progress.round says which), and one summary
and test score after it.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from agnews_lora import checkpoint as ckpt
from agnews_lora import runs, shift
from agnews_lora.augment import Augmenter
from agnews_lora.averaging import WeightAverage
from agnews_lora.calibration import softmax
from agnews_lora.config import Config
from agnews_lora.data import Columns, Split, make_loader, read_files
from agnews_lora.loop import (LoopContext, Progress, calibrate, make_optimizer, make_scheduler, predict_logits,
                              resume, run_loop)


def select_pseudo_labels(probs: np.ndarray, threshold: float, balance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose top probability is above `threshold`, with that class as their label.

    Args:
        probs: [n, classes] (temperature-scaled) probabilities.
        threshold: keep rows with top probability strictly above it (1.0 keeps none).
        balance: keep at most as many rows per class as the rarest kept class has, the most
            confident first, so the further round does not learn the model's own class skew
            (on shifted text the model over-predicts some classes).

    Returns:
        (row indices, sorted; labels), as int64 arrays.
    """
    probs = np.asarray(probs)
    conf, labels = probs.max(-1), probs.argmax(-1)
    keep = np.flatnonzero(conf > threshold)
    if balance and len(keep):
        counts = np.bincount(labels[keep], minlength=probs.shape[1])
        cap = counts[counts > 0].min()
        chosen = []
        for c in range(probs.shape[1]):
            rows = keep[labels[keep] == c]
            chosen.append(rows[np.argsort(-conf[rows], kind="stable")[:cap]])
        keep = np.sort(np.concatenate(chosen))
    return keep.astype(np.int64), labels[keep].astype(np.int64)


def self_train(ctx: LoopContext, prog: Progress, train_split, tok, resume_round: bool):
    """The further round: pseudo-label data.unlabelled with round 0's best model (or reload those
    labels when resuming), then train on them plus drawn training rows for self_train.steps.

    Args:
        ctx, prog: round 0's context and progress (prog is advanced in place unless resuming).
        train_split: the run's training rows, from which the round draws.
        tok: the run's tokenizing function (Split -> token ids).
        resume_round: `last/` holds a checkpoint of this round: continue it.

    Returns:
        (the round's context, its progress, what the round did for summary.json).
    """
    cfg, acc = ctx.cfg, ctx.accelerator
    path = ctx.run_dir / runs.PSEUDO_LABELS
    unlabelled = read_files(cfg.data.unlabelled, columns=Columns.of(cfg.data), labels=False)
    info = json.loads(path.read_text()) if resume_round else _pseudo_label(ctx, prog, tok, unlabelled, train_split)
    if not resume_round and acc.is_main_process:
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
    round_ctx, steps = _round_context(ctx, round_cfg=round_cfg, texts=texts, labels=labels, tok=tok)
    if resume_round:
        prog = resume(round_ctx, round_ctx.total_steps)
    else:
        prog.round, prog.best_accuracy = 1, -1.0  # best/ is chosen among this round's evaluations
        prog.epoch, prog.batches_in_epoch = prog.epoch + (prog.batches_in_epoch > 0), 0
    acc.print(f"self-training: {len(info['index']):,} pseudo-labelled + {n_train:,} training rows, {steps} steps")
    run_loop(round_ctx, prog)
    return round_ctx, prog, {**public, "steps": steps, "train_rows": n_train, "lr": round_cfg.train.lr}


def _round_context(ctx: LoopContext, round_cfg: Config, texts: list[str], labels: list[int], tok):
    """Round 0's context with the round's rows, a fresh optimizer and schedule (round_cfg's lr) and
    weight average; returns (that context, the round's steps)."""
    cfg, acc = ctx.cfg, ctx.accelerator
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
        augment=Augmenter(cfg, texts, dataset, sampler, tok), average=average)
    return round_ctx, steps


def _pseudo_label(ctx: LoopContext, prog: Progress, tok, unlabelled, train_split) -> dict:
    """Round 0's best model labels data.unlabelled; keep the confident rows (`select_pseudo_labels`).
    With self_train.prior=match-shifted the probabilities are first matched on the texts shifted from
    the training texts (`shift.match_shifted_texts`, the training rows as reference and their class
    shares as the prior), as `predict --prior match-shifted` would label the file."""
    cfg, acc = ctx.cfg, ctx.accelerator
    model = acc.unwrap_model(ctx.model)
    ckpt.load_adapter_weights(model, ctx.run_dir / runs.BEST)
    temperature = calibrate(ctx)["temperature"]
    loader = acc.prepare(make_loader(tok(Split(unlabelled.texts, None)), None, cfg.train.eval_batch_size,
                                     ctx.pad_id, shuffle=False,
                                     pad_to_multiple_of=cfg.data.pad_to_multiple_of))
    probs = softmax(predict_logits(ctx.model, loader, acc, len(unlabelled)), temperature)
    matched = None
    if cfg.self_train.prior == "match-shifted":
        prior = np.bincount(train_split.labels, minlength=cfg.model.num_labels) / len(train_split.labels)
        probs, matched = shift.match_shifted_texts(probs, unlabelled.texts, reference=train_split.texts, prior=prior,
                                                   threshold=cfg.predict.shift_threshold,
                                                   calibration=cfg.predict.shift_calibration)
        acc.print(f"self-training: {matched['shifted_rows']:,} of {len(unlabelled):,} unlabelled texts shifted from "
                  "the training texts; their class prior matched before pseudo-labelling")
    index, labels = select_pseudo_labels(probs, threshold=cfg.self_train.threshold, balance=cfg.self_train.balance)
    return {"source": unlabelled.source, "unlabelled_rows": len(unlabelled), "threshold": cfg.self_train.threshold,
            "balance": cfg.self_train.balance, "temperature": temperature, "prior": cfg.self_train.prior,
            "match_shifted": matched, "rows": len(index),
            "per_class": np.bincount(labels, minlength=cfg.model.num_labels).tolist(),
            "round0_best_val_accuracy": prog.best_accuracy, "round0_best_step": prog.best_step,
            "index": index.tolist(), "labels": labels.tolist()}
