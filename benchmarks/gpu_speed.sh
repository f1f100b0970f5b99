#!/usr/bin/env bash
# agnews-lora training speed on one GPU, roberta-base shapes (random init: throughput does not
# depend on the weights), bf16, batch 32; and the time of the paper's recipe (5 epochs on
# 120,000 rows), projected from the measured steady-state step time. No Hub access needed.
#
#   bash benchmarks/gpu_speed.sh            # from the project root, venv active; < 8 minutes
#
# Environment knobs:
#   SHARED=../shared   folder with models/roberta-base (config + tokenizer) and data/ag_news
#   STEPS=400          optimizer steps per measured run (steady state = steps after WARMUP)
#   WARMUP=100         steps left out of the steady-state rate (allocator, cuDNN/cuBLAS tuning)
#   BATCH=32           rows per step
#   COMPILE=1          also measure train.compile=true (regional torch.compile); 0 to skip
#   FULL=0             1: afterwards run the whole 5-epoch recipe for real (tens of minutes)
#   ALLOW_CPU=0        1: run without a GPU (only to check the script with tiny STEPS)
#   OUT=runs/gpu-speed work folder (the 120k-row file, token cache, run folders, gpu_speed.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export SHARED="${SHARED:-../shared}" STEPS="${STEPS:-400}" WARMUP="${WARMUP:-100}" BATCH="${BATCH:-32}"
export COMPILE="${COMPILE:-1}" FULL="${FULL:-0}" ALLOW_CPU="${ALLOW_CPU:-0}" OUT="${OUT:-runs/gpu-speed}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true TRANSFORMERS_VERBOSITY=error
exec python - <<'PY'
import csv, importlib.util, math, os, time
from pathlib import Path

import torch

from agnews_lora.config import load_config
from agnews_lora.data import read_files
from agnews_lora.model import build_model
from agnews_lora.outputs import discard_run
from agnews_lora.runs import TRAIN_LOG, RunFolder, read_records
from agnews_lora.study import rebuilt_batches
from agnews_lora.train import train

env = os.environ
shared, out = Path(env["SHARED"]), Path(env["OUT"])
steps, warmup, batch = int(env["STEPS"]), int(env["WARMUP"]), int(env["BATCH"])
if not torch.cuda.is_available() and env["ALLOW_CPU"] != "1":
    raise SystemExit("no CUDA device: this benchmark is for a GPU machine (ALLOW_CPU=1 to check the script)")
if not 0 < warmup < steps:
    raise SystemExit(f"need 0 < WARMUP ({warmup}) < STEPS ({steps})")
spec = importlib.util.spec_from_file_location("train_speed", Path("benchmarks/train_speed.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

# The paper's 120,000 training rows (+640 validation rows carved off): the ~60,800 distinct
# offline AG News train rows, repeated. Throughput depends on the length mix, not on novelty.
VAL, PAPER_ROWS, EPOCHS = 640, 120_000, 5
rows_file = out / "train_120k.csv"
if not rows_file.is_file():
    src = read_files([shared / "data" / "ag_news" / f for f in
                      ("train_partial.csv.gz", "train_extra.csv.gz", "train_extra_text.csv.gz")])
    out.mkdir(parents=True, exist_ok=True)
    tmp = rows_file.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "text"])
        for i in range(PAPER_ROWS + VAL):
            w.writerow([src.labels[i % len(src)], src.texts[i % len(src)]])
    tmp.replace(rows_file)

peak = bench.run_peak()
print(f"bf16 matmul peak: {peak['bf16']['gflops'] / 1e3:,.0f} TFLOP/s (n={peak['bf16']['size']})", flush=True)


def overrides(name, max_steps, *extra):
    return [f"model.name={shared / 'models' / 'roberta-base'}", "model.init=random",
            f"data.train={rows_file}", f"data.val_size={VAL}", f"data.cache_dir={out / 'cache'}",
            f"train.batch_size={batch}", f"train.max_steps={max_steps}", "train.precision=bf16",
            "train.progress=false", f"out_dir={out / name}", *extra]


def fresh(name):
    """The run folder `name` under OUT, a run of an earlier call of this script removed."""
    if (out / name).exists():
        discard_run(out / name)


def measure(name, *extra):
    fresh(name)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Log records land on multiples of log_every: make WARMUP one of them.
    cfg = load_config(overrides=overrides(name, steps, f"train.log_every={math.gcd(warmup, 50)}", *extra))
    started = time.perf_counter()
    run = train(cfg)
    wall = time.perf_counter() - started
    log = {r["step"]: r for r in read_records(run / TRAIN_LOG)}
    a, b = log[max(s for s in log if s <= warmup)], log[steps]
    seconds = b["train_seconds"] - a["train_seconds"]
    timed = rebuilt_batches(cfg, start=a["step"], stop=steps, logged_tokens=b["tokens"] - a["tokens"])
    shape = bench._shape(build_model(cfg, device="meta"))
    flops = bench.model_flops(shape, tokens=sum(t[1] for t in timed), sum_sq_len=sum(t[3] for t in timed))
    step_s = seconds / (steps - a["step"])
    return {"name": name, "step_ms": 1e3 * step_s, "examples_per_s": (b["examples"] - a["examples"]) / seconds,
            "tokens_per_s": (b["tokens"] - a["tokens"]) / seconds, "tflops": flops / seconds / 1e12,
            "gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan"),
            "first_steps_s": a["train_seconds"], "wall_s": wall,
            "projected_min": EPOCHS * math.ceil(PAPER_ROWS / batch) * step_s / 60}


results = [measure("eager")]
if env["COMPILE"] == "1":
    results.append(measure("compile", "train.compile=true"))
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (script check only)"
lines = [f"{device}, torch {torch.__version__}; roberta-base shapes, LoRA r=8 query+value, bf16, batch {batch}; "
         f"steady state = steps {warmup}..{steps}. bf16 matmul peak measured: {peak['bf16']['gflops'] / 1e3:,.0f} TFLOP/s.",
         "", "| run | ms/step | examples/s | real tokens/s | model TFLOP/s (% of peak) | peak GPU MiB "
         f"| steps 1..{warmup} (s) | paper recipe: {EPOCHS} epochs x {PAPER_ROWS:,} rows, PROJECTED (min) |",
         "|---|---|---|---|---|---|---|---|"]
for r in results:
    lines.append(f"| {r['name']} | {r['step_ms']:.1f} | {r['examples_per_s']:,.0f} | {r['tokens_per_s']:,.0f} "
                 f"| {r['tflops']:.1f} ({r['tflops'] * 1e3 / peak['bf16']['gflops']:.0%}) | {r['gpu_mib']:,.0f} "
                 f"| {r['first_steps_s']:.1f} | {r['projected_min']:.1f} |")
lines.append(f"\nProjected = {EPOCHS} x ceil({PAPER_ROWS:,}/{batch}) steps x the steady-state step time; "
             "per-epoch evaluation and start-up are not included.")
if env["FULL"] == "1":
    best = min(results, key=lambda r: r["step_ms"])
    extra = ["train.compile=true"] if best["name"] == "compile" else []
    fresh("full")
    cfg = load_config(overrides=overrides("full", 0, f"train.epochs={EPOCHS}", "train.log_every=50", *extra))
    started = time.perf_counter()
    run = train(cfg)
    summary = RunFolder(run).summary()
    lines.append(f"MEASURED full recipe ({best['name']}): {summary['train_seconds'] / 60:.1f} min of training steps, "
                 f"{(time.perf_counter() - started) / 60:.1f} min end to end (per-epoch evaluation included), "
                 f"best val accuracy {summary['best_val_accuracy']:.4f} (random init: not meaningful).")
report = "\n".join(lines)
print(report)
(out / "gpu_speed.md").write_text(report + "\n", encoding="utf-8")
print(f"wrote {out / 'gpu_speed.md'}")
PY
