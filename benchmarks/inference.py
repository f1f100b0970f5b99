"""Inference speed and accuracy on AG News test rows, in one run, against the baseline a user writes.

    python benchmarks/inference.py runs/cpu-minilm            # all 7,600 test rows
    python benchmarks/inference.py runs/cpu-minilm --rows 200 # a quick look

Variants:
  (a) baseline:  transformers pipeline("text-classification") over the peft model, batch 8, fp32
  (b) predictor: agnews_lora Classifier on the run folder (adapter merged in memory, length-sorted
                 batches, inference_mode, bf16 autocast where the CPU has it)
  (c) merged:    Classifier on the `export --format merged` folder (plain transformers, no peft)
  (d) onnx:      Classifier on the `export --format onnx` folder (ONNX Runtime, fp32)
  (e) onnx-int8: Classifier on the `export --format onnx --quantize int8` folder

Throughput: one timed pass over all rows after a warm-up call (tokenizing included, loading
excluded). Latency: one text per call, over the first --latency-rows rows. Accuracy on the same
rows. Exports missing from --exports are made first (their time is not measured). Prints a
Markdown table and writes it (and the figures as JSON beside it) to --output.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from agnews_lora import runs
from agnews_lora.config import AG_NEWS_LABELS
from agnews_lora.data import read_files
from agnews_lora.evaluate import compute_metrics
from agnews_lora.predict import Classifier, package_version
from agnews_lora.study import machine

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT.parent / "shared" / "data" / "ag_news" / "test.csv.gz"
TARGET_SPEEDUP = 4.0
TARGET_ACCURACY_POINTS = 0.3


@dataclass
class Result:
    variant: str
    what: str
    batch: int
    examples_per_s: float | None = None
    examples_per_cpu_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    accuracy: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="run folder written by `agnews-lora train`")
    p.add_argument("--data", type=Path, default=TEST, help="labelled test file (default: the 7,600 AG News rows)")
    p.add_argument("--rows", type=int, default=0, help="evenly spaced rows of --data (0 = all)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of (b)-(e); the baseline uses 8")
    p.add_argument("--latency-rows", type=int, default=100, help="single-text calls timed per variant")
    p.add_argument("--threads", type=int, help="CPU threads for every variant (default: library defaults)")
    p.add_argument("--exports", type=Path, help="folder of exports to use or make (default RUN_DIR/export)")
    p.add_argument("--output", type=Path, help="Markdown file (default RUN_DIR/inference_benchmark.md)")
    p.add_argument("--skip", nargs="*", default=[], choices=["baseline", "predictor", "merged", "onnx", "onnx-int8"])
    return p.parse_args(argv)


def load_rows(path: Path, rows: int) -> tuple[list[str], list[int]]:
    split = read_files([path])
    if split.labels is None:
        sys.exit(f"{path}: has no labels; the benchmark needs labelled rows")
    idx = np.arange(len(split)) if rows <= 0 or rows >= len(split) else \
        np.linspace(0, len(split) - 1, num=rows).round().astype(int)
    return [split.texts[i] for i in idx], [split.labels[i] for i in idx]


def timed(fn, texts: list[str], latency_rows: int) -> tuple[np.ndarray, float, float, np.ndarray]:
    """(predicted ids, examples/s and examples per CPU-second over all texts, single-text latencies in ms).

    The CPU-second figure (all threads of this process) is the one to read when other work
    shares the machine: wall-clock rates then depend on what else runs.
    """
    fn(texts[: min(32, len(texts))])  # warm-up: first-call allocations and lazy initialisation
    start, cpu = time.perf_counter(), time.process_time()
    preds = fn(texts)
    rate = len(texts) / (time.perf_counter() - start)
    cpu_rate = len(texts) / max(time.process_time() - cpu, 1e-9)
    latencies = []
    for text in texts[:latency_rows]:
        t0 = time.perf_counter()
        fn([text])
        latencies.append((time.perf_counter() - t0) * 1000)
    return np.asarray(preds), rate, cpu_rate, np.asarray(latencies)


def baseline_fn(run_dir: Path, threads: int | None):
    """What a user writes: the peft model in a text-classification pipeline, batch 8, fp32."""
    from transformers import pipeline

    clf = Classifier.load(run_dir, precision="fp32", merge=False, threads=threads)
    pipe = pipeline("text-classification", model=clf.model, tokenizer=clf.tokenizer, device="cpu")
    label2id = {name: i for i, name in clf.model.config.id2label.items()}
    max_length = clf.cfg.data.max_length

    def predict(texts: list[str]) -> list[int]:
        out = pipe(texts, batch_size=8, truncation=True, max_length=max_length)
        return [label2id[o["label"]] for o in out]

    return predict


def ensure_exports(run_dir: Path, exports: Path, skip: list[str]) -> dict[str, Path | str]:
    """Folder per export variant (made when missing), or the reason it cannot exist."""
    from agnews_lora.config import ConfigError
    from agnews_lora.export import export

    wanted = {"merged": ("merged", None), "onnx": ("onnx", None), "onnx-int8": ("onnx", "int8")}
    out: dict[str, Path | str] = {}
    for name, (fmt, quantize) in wanted.items():
        folder = exports / name
        if name in skip:
            continue
        if not (folder / runs.PARITY).is_file():
            print(f"exporting {name} to {folder} ...", flush=True)
            try:
                export(run_dir, fmt, output=folder, quantize=quantize)
            except ConfigError as err:  # e.g. merged export of a model.head=linear run
                out[name] = str(err).split(". ")[0]
                continue
        out[name] = folder
    return out


def measure(variant: str, args, texts: list[str], labels: list[int], source: Path | str | None) -> Result:
    if variant == "baseline":
        fn, what, batch = baseline_fn(args.run_dir, args.threads), "transformers pipeline, peft model, fp32", 8
    elif isinstance(source, str):
        return Result(variant, "n/a", args.batch_size, note=source)
    else:
        clf = Classifier.load(source, threads=args.threads)
        what = f"Classifier, {clf.info.get('format')} folder, {clf.precision}"
        fn, batch = (lambda t: clf.predict_logits(t, batch_size=args.batch_size).argmax(-1)), args.batch_size
    print(f"measuring {variant} ({what}) on {len(texts):,} rows ...", flush=True)
    preds, rate, cpu_rate, lat = timed(fn, texts, args.latency_rows)
    accuracy = compute_metrics(labels, preds.tolist(), list(AG_NEWS_LABELS))["accuracy"]
    return Result(variant, what, batch, examples_per_s=rate, examples_per_cpu_s=cpu_rate, latency_p50_ms=float(np.percentile(lat, 50)),
                  latency_p95_ms=float(np.percentile(lat, 95)), accuracy=accuracy)


def format_table(results: list[Result], header: str) -> str:
    base = next((r for r in results if r.variant == "baseline" and r.examples_per_s), None)
    lines = [header, "", "| variant | what | batch | examples/s | x baseline | examples/CPU-s | latency p50 (ms) "
             "| latency p95 (ms) | accuracy | vs baseline (points) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.examples_per_s is None:
            lines.append(f"| {r.variant} | {r.note} | | | | | | | | |")
            continue
        ratio = f"{r.examples_per_s / base.examples_per_s:.2f}x" if base else ""
        delta = f"{100 * (r.accuracy - base.accuracy):+.2f}" if base else ""
        lines.append(f"| {r.variant} | {r.what} | {r.batch} | {r.examples_per_s:,.1f} | {ratio} | "
                     f"{r.examples_per_cpu_s:,.1f} | {r.latency_p50_ms:.1f} | {r.latency_p95_ms:.1f} | {100 * r.accuracy:.2f}% | {delta} |")
    return "\n".join(lines) + "\n"


def verdicts(results: list[Result]) -> list[str]:
    """One line per variant: its speed ratio and accuracy difference against the target."""
    base = next((r for r in results if r.variant == "baseline" and r.examples_per_s), None)
    if base is None:
        return ["no baseline measured: no ratios"]
    out = []
    for r in results:
        if r is base or r.examples_per_s is None:
            continue
        ratio, points = r.examples_per_s / base.examples_per_s, 100 * (r.accuracy - base.accuracy)
        ok = ratio >= TARGET_SPEEDUP and abs(points) <= TARGET_ACCURACY_POINTS
        out.append(f"{r.variant}: {ratio:.2f}x baseline examples/s, accuracy {points:+.2f} points -> "
                   f"{'meets' if ok else 'misses'} the target (>= {TARGET_SPEEDUP:g}x, within "
                   f"{TARGET_ACCURACY_POINTS} points)")
    return out


def machine_header(args, n_rows: int) -> str:
    import onnxruntime

    return (f"Inference benchmark: `{args.run_dir}` on {n_rows:,} rows of `{args.data.name}`, "
            f"{datetime.now(timezone.utc):%Y-%m-%d}; {machine()}; onnxruntime {onnxruntime.__version__}, "
            f"agnews-lora {package_version()}.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    texts, labels = load_rows(args.data, args.rows)
    exports = ensure_exports(args.run_dir, args.exports or args.run_dir / runs.EXPORTS, args.skip)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for variant in ("baseline", "predictor", "merged", "onnx", "onnx-int8"):
        if variant in args.skip:
            continue
        source = args.run_dir if variant == "predictor" else exports.get(variant)
        results.append(measure(variant, args, texts, labels, source))
        gc.collect()
    table = format_table(results, machine_header(args, len(texts)))
    lines = verdicts(results)
    print("\n" + table + "\n" + "\n".join(lines))
    output = args.output or args.run_dir / "inference_benchmark.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table + "\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    output.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    print(f"\nwrote {output} and {output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
