"""Shared fixtures: a tiny RoBERTa with the real tokenizer, and small real AG News files.

Nothing here downloads. Tests that need ../shared skip with a reason when it is absent.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
AG_NEWS = SHARED / "data" / "ag_news"
ROBERTA_BASE = SHARED / "models" / "roberta-base"

# `datasets` (which reads JSON, parquet and Hub sources) keeps an Arrow copy of every file it reads:
# the suite's go to a folder of its own, not the user's ~/.cache (child processes inherit it).
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="agnews-lora-tests-hf-datasets-")

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (offline AG News + tokenizer) is absent")


def _head_lines(src: Path, n: int) -> list[str]:
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        return [next(fh) for _ in range(n)]


def make_tiny_roberta(out: Path, num_layers: int = 2) -> Path:
    """Save a hidden-32 RoBERTa with random (seeded) weights and the real RoBERTa tokenizer to `out`."""
    if not ROBERTA_BASE.is_dir():
        pytest.skip("../shared/models/roberta-base (real tokenizer) is absent")
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=50265, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=4)
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(out)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(ROBERTA_BASE / name, out / name)
    return out


def make_shapes_model(out: Path) -> Path:
    """A hidden-32, 2-layer, 4-label RoBERTa config without weights in `out`: plans and budgets
    count on the meta device."""
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, num_labels=4).save_pretrained(out)
    return out


def skewed_posteriors(n: int, seed: int, skew: float):
    """(posteriors, labels) of a model that adds `skew` to class 3's logit on balanced rows."""
    import numpy as np

    from agnews_lora.calibration import softmax

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    logits = rng.normal(0, 1, (n, 4)) + 2.5 * np.eye(4)[labels]
    logits[:, 3] += skew
    return softmax(logits), labels


def tiny_run_overrides(model_dir: Path, files: dict, cache: Path, out: Path) -> list[str]:
    """Dotted overrides for a seconds-long training run on a tiny model and the small files."""
    return [f"model.name={model_dir}", f"data.train={files['train']}", f"data.test={files['test']}",
            "data.val_size=40", "data.max_length=64", f"data.cache_dir={cache}",
            "train.max_steps=6", "train.batch_size=8", "train.eval_every=3", "train.lr=1e-3",
            "train.precision=fp32", "train.progress=false", "lora.r=4", f"out_dir={out}"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test may train with its own precision: accelerate keeps one state per process."""
    from agnews_lora.train import reset_accelerator_state

    reset_accelerator_state()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 RoBERTa with random weights, saved with the real RoBERTa tokenizer."""
    return make_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def ag_files(tmp_path_factory) -> dict[str, Path]:
    """Small real AG News files in the original format: train (400 rows) and test (120 rows)."""
    if not AG_NEWS.is_dir():
        pytest.skip("../shared/data/ag_news is absent")
    out = tmp_path_factory.mktemp("ag")
    train = out / "train.csv"
    train.write_text("".join(_head_lines(AG_NEWS / "train_partial.csv.gz", 400)), encoding="utf-8")
    test = out / "test.csv"
    test.write_text("".join(_head_lines(AG_NEWS / "test.csv.gz", 120)), encoding="utf-8")
    return {"train": train, "test": test}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir, ag_files) -> Path:
    """A trained seconds-long run (tiny_run_overrides), shared by the tests that only read it."""
    from agnews_lora.config import load_config
    from agnews_lora.train import reset_accelerator_state, train
    from agnews_lora.writeup import finish_run

    reset_accelerator_state()  # session-scoped: set up before the per-test reset runs
    base = tmp_path_factory.mktemp("tiny-run")
    run = train(load_config(overrides=tiny_run_overrides(tiny_model_dir, ag_files, base / "cache", base / "run")))
    finish_run(run)  # report.md and best/README.md, as `agnews-lora train` writes them
    return run


@contextmanager
def live_server(app):
    """Serve the ASGI `app` with uvicorn on 127.0.0.1 at a free port in a thread; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and thread.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def tiny_overrides(tiny_model_dir, ag_files, tmp_path) -> list[str]:
    """Dotted overrides for a seconds-long training run on the tiny model and files."""
    return tiny_run_overrides(tiny_model_dir, ag_files, tmp_path / "cache", tmp_path / "run")


@pytest.fixture(scope="module")
def make_cfg(tiny_model_dir, ag_files, tmp_path_factory):
    """Config factory for seconds-long runs: 6 steps, evaluation (and a checkpoint) every 3."""
    from agnews_lora.config import load_config

    cache = tmp_path_factory.mktemp("token-cache")

    def make(out: Path, *extra: str):
        return load_config(overrides=[
            f"model.name={tiny_model_dir}", f"data.train={ag_files['train']}", f"data.test={ag_files['test']}",
            "data.val_size=40", "data.max_length=64", f"data.cache_dir={cache}", "train.max_steps=6",
            "train.batch_size=8", "train.eval_every=3", "train.log_every=1", "train.lr=1e-3",
            "train.precision=fp32", "train.progress=false", "lora.r=4", f"out_dir={out}", *extra])

    return make


def train_interrupted(cfg, monkeypatch, at_call: int) -> None:
    """train(cfg) stopped by a KeyboardInterrupt at its `at_call`-th loss computation (a kill)."""
    from agnews_lora import loop
    from agnews_lora import train as train_mod

    calls = {"n": 0}
    real_loss = loop._loss

    def interrupted(ctx, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real_loss(ctx, batch)

    with monkeypatch.context() as m:
        m.setattr(loop, "_loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(cfg)


def run_child_in_process(argv: list[str], what: str) -> float:
    """`study.run_child` for the study scripts' end-to-end tests: the row's `agnews-lora` command
    runs in this process, so the libraries' imports (most of a tiny row's time) are paid once per
    test worker instead of once per row. The exit status is read as run_child reads it
    (`study.check_exit_status`); the child path itself (`python -m agnews_lora.cli`, exit 2 as a
    user error) is tested in test_study.py and test_cli.py. Returns this process's peak resident
    set size in MB."""
    import resource
    import sys

    from agnews_lora import cli
    from agnews_lora.study import check_exit_status
    from agnews_lora.train import reset_accelerator_state

    assert argv[:3] == [sys.executable, "-m", "agnews_lora.cli"], argv
    reset_accelerator_state()  # each row sets its own precision, as a fresh process would
    try:
        cli.main(argv[3:])
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    finally:
        reset_accelerator_state()
    check_exit_status(status, what)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def rows_in_process():
    """For a whole test module: the study scripts train their rows in this process
    (`run_child_in_process`) with one thread, as their child processes would with OMP_NUM_THREADS=1."""
    import torch

    from agnews_lora import study

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(study, "run_child", run_child_in_process)
        yield
    torch.set_num_threads(threads)
