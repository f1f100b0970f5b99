"""Multi-process training: `accelerate launch` starts two CPU processes (gloo) of the real CLI on the
tiny model; the run is killed after its first checkpoint and resumed under two processes again.

Checked: both processes end with the same trainable weights (each saves its own), each validation
and test row is scored once (the rows do not fill whole batches on both processes, and the figures
equal a single-process evaluation of the saved checkpoints), each process trains half of every
epoch's batches, one writer (the other process writes nothing in the run folder, seen by an audit
hook), one summary, one report and no duplicated log lines, the resume ends at max_steps, and the
loss goes down. tests/multiprocess_train.py is what each process runs.

`accelerate launch --cpu --num_processes 2` would start one process (accelerate's multi-CPU launch
goes through mpirun); `--multi_gpu` is accelerate's torchrun launcher, and train.cpu=true puts its
processes on the CPU. Deselect with `-m "not multiprocess"`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import agnews_lora
from agnews_lora import runs
from conftest import needs_shared

pytestmark = [pytest.mark.multiprocess, needs_shared]

HELPER = Path(__file__).with_name("multiprocess_train.py")
TRAIN_ROWS, VAL_ROWS, TEST_ROWS = 400, 37, 120  # 37 and 120 rows: the last batches are short or odd
BATCH = 8
MAX_STEPS, EVAL_EVERY, LOG_EVERY = 30, 10, 5
CRASH_AT = 17  # the 17th loss: after the step-10 checkpoint and the step-15 log line
STEPS_PER_EPOCH = math.ceil(math.ceil((TRAIN_ROWS - VAL_ROWS) / BATCH) / 2)  # 23: each process half the batches


def _free_port() -> int:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    except OSError as err:
        pytest.skip(f"cannot bind a local port for the process group: {err}")


def _launch(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`accelerate launch` two processes of the helper; retried once when the port was taken meanwhile."""
    for _ in range(2):
        port = _free_port()
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(HELPER), "train", *args]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        except OSError as err:
            pytest.skip(f"cannot spawn the training processes: {err}")
        if "address already in use" not in (proc.stdout + proc.stderr).lower():
            return proc
    pytest.skip(f"port {port} of the process group was taken by another program, twice")


def _child_env(base: Path, run: Path, probes: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "TORCHELASTIC_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    src = str(Path(agnews_lora.__file__).resolve().parents[1])  # the package the tests import
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_HOME=str(base / "hf"),  # no accelerate default config of the user's
               PYTHONPATH=os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p),
               AGNEWS_TEST_PROBE_DIR=str(probes), AGNEWS_TEST_RUN_DIR=str(run))
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # both processes are local: no need for the hostname to resolve
    probes.mkdir(parents=True, exist_ok=True)
    return env


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in runs.read_records(path)]


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, ag_files, tmp_path_factory) -> dict:
    """The 2-process run, killed at its 17th loss, then resumed under 2 processes."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    base = tmp_path_factory.mktemp("multiprocess")
    run = base / "run"
    args = [f"model.name={tiny_model_dir}", f"data.train={ag_files['train']}", f"data.test={ag_files['test']}",
            f"data.val_size={VAL_ROWS}", "data.max_length=64", f"data.cache_dir={base / 'cache'}",
            f"train.max_steps={MAX_STEPS}", f"train.batch_size={BATCH}", f"train.eval_batch_size={BATCH}",
            f"train.eval_every={EVAL_EVERY}", f"train.log_every={LOG_EVERY}", "train.lr=5e-3", "train.seed=0",
            "train.precision=fp32", "train.progress=false", "train.cpu=true", "lora.r=4", f"out_dir={run}"]
    crashed = _launch(args, {**_child_env(base, run, base / "probes-1"), "AGNEWS_TEST_CRASH_AT": str(CRASH_AT)})
    assert (run / "last" / "state.json").is_file(), crashed.stdout[-3000:] + crashed.stderr[-6000:]
    after_crash = {"state": json.loads((run / "last" / "state.json").read_text()),
                   "train_log": _steps(run / runs.TRAIN_LOG), "summary": (run / runs.SUMMARY).exists()}
    resumed = _launch([*args, "train.resume=true"], _child_env(base, run, base / "probes-2"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    return {"run": run, "crashed": crashed, "after_crash": after_crash, "resumed": resumed,
            "probes": [base / "probes-1", base / "probes-2"]}


def test_both_processes_end_with_identical_trainable_weights(two_process_run):
    probes = two_process_run["probes"][1]
    rank0, rank1 = load_file(str(probes / "rank0.safetensors")), load_file(str(probes / "rank1.safetensors"))
    saved = load_file(str(two_process_run["run"] / "last" / "adapter_model.safetensors"))
    step_10 = load_file(str(two_process_run["run"] / "best" / "adapter_model.safetensors"))
    assert rank0.keys() == rank1.keys() == saved.keys() and len(rank0) > 0
    assert any("lora_A" in k for k in rank0) and any("classifier" in k for k in rank0)  # LoRA and head
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k  # bit for bit: the same averaged gradients
        assert torch.equal(rank0[k], saved[k]), k  # and what last/ holds
    assert runs.read_records(two_process_run["run"] / runs.METRICS)[0].get("best")  # best/: step 10's
    assert not all(torch.equal(rank0[k], step_10[k]) for k in rank0)  # the resumed processes trained on
    optim = torch.load(two_process_run["run"] / "last" / "optim.pt", weights_only=False)
    assert {int(s["step"]) for s in optim["optimizer"]["state"].values()} == {MAX_STEPS}


def _single_process_metrics(run: Path, checkpoint: str, texts: list[str], labels: list[int]) -> dict:
    from agnews_lora.evaluate import compute_metrics
    from agnews_lora.losses import cross_entropy
    from agnews_lora.predict import Classifier

    clf = Classifier.load(run, checkpoint=checkpoint, precision="fp32", merge=False)
    logits = clf.predict_logits(texts, batch_size=16)
    m = compute_metrics(labels, logits.argmax(-1).tolist(), clf.label_names)
    m["loss"] = float(cross_entropy(torch.from_numpy(logits), torch.tensor(labels)))
    return m


def test_each_validation_and_test_row_is_scored_once(two_process_run):
    from agnews_lora.data import load_splits

    run = two_process_run["run"]
    cfg = runs.read_config(run)
    _, val, test = load_splits(cfg.data, seed=cfg.train.seed, num_labels=cfg.model.num_labels)
    assert len(val) == VAL_ROWS and VAL_ROWS % (2 * BATCH) != 0
    records = runs.read_records(run / runs.METRICS)
    best = [r for r in records if r.get("best")][-1]
    for checkpoint, record in (("best", best), ("last", records[-1])):
        single = _single_process_metrics(run, checkpoint, val.texts, val.labels)
        assert record["val_n"] == VAL_ROWS and sum(map(sum, record["val_confusion"])) == VAL_ROWS
        assert record["val_confusion"] == single["confusion"], checkpoint
        assert record["val_accuracy"] == single["accuracy"]
        assert record["val_f1_macro"] == pytest.approx(single["f1_macro"], abs=1e-12)
        assert record["val_loss"] == pytest.approx(single["loss"], rel=1e-4)
    tested = runs.read_json(run / runs.TEST_METRICS)
    assert len(test) == TEST_ROWS and tested["n"] == TEST_ROWS
    assert tested["confusion"] == _single_process_metrics(run, "best", test.texts, test.labels)["confusion"]


def test_each_process_trains_half_of_every_epoch(two_process_run):
    run = two_process_run["run"]
    epochs = {r["step"]: r["epoch"] for r in runs.read_records(run / runs.TRAIN_LOG)}
    assert all(epoch == (1 if step <= STEPS_PER_EPOCH else 2) for step, epoch in epochs.items()), epochs
    ends = [r["step"] for r in runs.read_records(run / runs.METRICS) if r["epoch_end"]]
    assert ends == [STEPS_PER_EPOCH]
    summary = runs.read_summary(run)
    assert summary["processes"] == 2 and summary["epochs_completed"] == 1


def test_one_writer_one_summary_one_report(two_process_run):
    run = two_process_run["run"]
    for probes in two_process_run["probes"]:
        written = {rank: [json.loads(line) for line in (probes / f"writes-rank{rank}.jsonl").read_text().splitlines()]
                   for rank in (0, 1)}
        assert written[1] == [], written[1][:5]  # the other process writes nothing in the run folder
        assert any(op[1].endswith(runs.TRAIN_LOG) for op in written[0])  # the probe sees the writer's writes
    assert list(run.rglob("summary*.json")) == [run / runs.SUMMARY]
    assert list(run.rglob("report*.md")) == [run / "report.md"]
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [runs.MARKER]  # no lock, temporary or old folder
    assert not (run / "tensorboard").exists()
    for name in (runs.METRICS, runs.TRAIN_LOG):
        steps = _steps(run / name)
        assert steps == sorted(set(steps)), name
    out = two_process_run["resumed"].stdout
    assert out.count("run folder: ") == 1 and out.count(", 2 processes)") == 1  # the summary, once, of 2 processes
    assert out.count(f"step {MAX_STEPS}: val loss") == 1 and out.count("test accuracy") == 1


def test_resume_under_two_processes(two_process_run):
    crashed, after = two_process_run["crashed"], two_process_run["after_crash"]
    assert crashed.returncode != 0
    assert after["state"]["step"] == EVAL_EVERY and not after["summary"]
    assert after["train_log"] == [5, 10, 15]  # step 15 was logged after the checkpoint, then lost
    run = two_process_run["run"]
    assert _steps(run / runs.TRAIN_LOG) == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY))  # 15 not twice
    assert _steps(run / runs.METRICS) == [10, 20, STEPS_PER_EPOCH, 30]
    summary = runs.read_summary(run)
    assert summary["steps"] == MAX_STEPS and summary["processes"] == 2
    assert two_process_run["resumed"].stdout.count(f"resuming {run} at step {EVAL_EVERY}/{MAX_STEPS}") == 1


def test_the_loss_goes_down(two_process_run):
    losses = [r["loss"] for r in runs.read_records(two_process_run["run"] / runs.TRAIN_LOG)]
    assert losses[-1] < losses[0] - 0.2, losses


def test_several_processes_without_a_gpu_or_train_cpu_are_refused(make_cfg, tmp_path, monkeypatch):
    """torchrun on a machine without a GPU: accelerate would run each process alone, all of them
    writing the same run folder; train says to pass train.cpu=true."""
    from accelerate import PartialState

    from agnews_lora.config import ConfigError
    from agnews_lora.train import train

    if PartialState().num_processes != 1 or (torch.cuda.is_available()):
        pytest.skip("needs a single-process CPU state in the test process")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train.cpu: launched as 2 processes.*pass train.cpu=true"):
        train(make_cfg(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
