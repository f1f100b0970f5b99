"""The run-folder contract (runs.py): config, logs, label names, readers that never move files,
the writer lock and the writer's recovery; and the num_labels regression (3 classes)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agnews_lora.errors import RunDamaged, RunLocked
from agnews_lora import runs
from agnews_lora.config import Config, ConfigError, load_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_config_round_trip_and_damaged_config(tmp_path):
    cfg = Config()
    cfg.lora.r = 5
    runs.write_config(cfg, tmp_path)
    assert runs.read_config(tmp_path).lora.r == 5
    with pytest.raises(RunDamaged, match="not a run folder"):
        runs.read_config(tmp_path / "nowhere")
    for text in ("", "[1, 2]", "lora: {r: [unclosed"):
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(RunDamaged, match=r"config.yaml: the run is damaged"):
            runs.read_config(tmp_path)


def test_torn_last_log_line_is_dropped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 3}\n{"step": 6}\n{"step": 9, "val_acc')  # power loss mid-write
    assert runs.read_records(log) == [{"step": 3}, {"step": 6}]
    assert "dropped an unfinished last line" in capsys.readouterr().err
    runs.drop_records_after(tmp_path, step=3)
    assert log.read_text() == '{"step": 3}\n'
    log.write_text('{"step": 3}\nnot json\n{"step": 6}\n')
    with pytest.raises(RunDamaged, match="line 2 is not valid JSON; the run is damaged"):
        runs.read_records(log)


def test_label_names():
    assert runs.label_names(4, names=["World", "Sports", "Business", "Sci/Tech"]) == ["World", "Sports", "Business",
                                                                                      "Sci/Tech"]
    assert runs.label_names(4) == ["class 0", "class 1", "class 2", "class 3"]  # no names: no AG News guess
    assert runs.label_names(2, {0: "neg", 1: "pos"}, names=["negative", "positive"]) == ["negative", "positive"]
    assert runs.label_names(3) == ["class 0", "class 1", "class 2"]
    assert runs.label_names(2, {0: "LABEL_0", 1: "LABEL_1"}) == ["class 0", "class 1"]
    assert runs.label_names(2, {0: "neg", 1: "pos"}) == ["neg", "pos"]


def test_reader_reads_a_half_swapped_checkpoint_where_it_lies(tmp_path):
    old = tmp_path / ".best.old"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes(b"x")
    assert runs.checkpoint_dir(tmp_path, "best") == old
    assert old.is_dir() and not (tmp_path / "best").exists()  # nothing moved
    old.rename(tmp_path / ".best.tmpabc")
    with pytest.raises(RunDamaged, match="being written or is damaged"):
        runs.checkpoint_dir(tmp_path, "best")


def test_writer_recovers_swaps_and_removes_stale_temporaries(tmp_path):
    (tmp_path / ".last.old").mkdir()
    (tmp_path / ".last.old" / "state.json").write_text("{}")
    (tmp_path / ".best.tmp1234").mkdir()
    (tmp_path / ".last.tmpabcd").mkdir()
    (tmp_path / ".summary.json.xyz").write_text("half")
    runs.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    code = ("import sys,time; from agnews_lora import runs\n"
            "with runs.writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
    assert child.stdout.readline().strip() == "held"
    return child


def test_writer_lock_refuses_a_second_writer_and_is_taken_over_after_a_crash(tmp_path):
    run_dir = tmp_path / "run"
    child = _hold_lock_in_child(run_dir)
    try:
        with pytest.raises(RunLocked, match=rf"is being written by pid {child.pid} on "):
            with runs.writer_lock(run_dir):
                pass
    finally:
        child.send_signal(signal.SIGKILL)  # a crash: no cleanup runs, the lock file stays
        child.wait()
    assert (run_dir / runs.LOCK).is_file()
    with runs.writer_lock(run_dir):  # the kernel dropped the dead writer's lock: taken over
        with runs.writer_lock(run_dir):  # re-entrant in one process (distill around train)
            assert json.loads((run_dir / runs.LOCK).read_text())["pid"] == os.getpid()
    assert not (run_dir / runs.LOCK).exists()  # released and removed on exit


def test_other_ranks_do_not_take_the_lock(tmp_path, monkeypatch):
    child = _hold_lock_in_child(tmp_path / "run")
    try:
        monkeypatch.setenv("RANK", "1")
        with runs.writer_lock(tmp_path / "run"):  # rank 1 writes nothing of its own: no refusal
            pass
    finally:
        child.kill()
        child.wait()


def _artifact(tmp_path, key="k" * 24, rows=3) -> runs.TeacherLogits:
    import numpy as np

    rng = np.random.default_rng(0)
    return runs.TeacherLogits(key=key, path=runs.teacher_logits_path(tmp_path / "cache", key),
                              train=rng.normal(size=(rows, 4)).astype(np.float32), val=np.zeros((0, 4), np.float32),
                              train_rows=np.arange(rows, dtype=np.uint64), val_rows=np.zeros(0, np.uint64),
                              probe={"weight": np.ones((4, 2), np.float32), "bias": np.zeros(4, np.float32)},
                              computed_seconds=1.5, val_overlap=None)


def test_teacher_logits_artifact_round_trip_and_damage(tmp_path):
    import numpy as np

    artifact = _artifact(tmp_path)
    assert artifact.path == tmp_path / "cache" / "teacher_logits" / f"{artifact.key}.npz"
    assert runs.read_teacher_logits(artifact.path) is None  # not computed yet
    runs.write_teacher_logits(artifact)
    back = runs.read_teacher_logits(artifact.path)
    assert (back.key, back.path, back.computed_seconds, back.val_overlap) == (artifact.key, artifact.path, 1.5, None)
    for name in ("train", "val", "train_rows", "val_rows"):
        np.testing.assert_array_equal(getattr(back, name), getattr(artifact, name))
    np.testing.assert_array_equal(back.probe["weight"], artifact.probe["weight"])
    assert [p.name for p in artifact.path.parent.iterdir()] == [artifact.path.name]  # no temporary left

    artifact.path.write_bytes(artifact.path.read_bytes()[:100])  # truncated
    with pytest.raises(RunDamaged, match=r"teacher-logit cache is damaged.*delete it"):
        runs.read_teacher_logits(artifact.path)
    moved = _artifact(tmp_path, key="m" * 24)
    runs.write_teacher_logits(moved)
    renamed = moved.path.with_name("x" * 24 + ".npz")  # a file under another key
    moved.path.rename(renamed)
    with pytest.raises(RunDamaged, match="its key or row ids do not fit"):
        runs.read_teacher_logits(renamed)


def test_distilled_run_points_to_its_teacher_logits(tmp_path):
    artifact = _artifact(tmp_path)
    runs.write_teacher_logits(artifact)
    run = tmp_path / "run"
    run.mkdir()
    assert runs.teacher_logits_of(run) is None  # not distilled
    runs.write_teacher(run, {"source": "t", "logits_key": artifact.key, "cache_file": str(artifact.path)},
                       probe=artifact.probe)
    assert runs.teacher_logits_of(run).key == artifact.key
    assert runs.read_teacher_probe(run)["weight"].shape == (4, 2)


def test_folder_kind_names_a_damaged_export(tmp_path):
    (tmp_path / runs.EXPORT_META).write_text("{truncated")
    with pytest.raises(RunDamaged, match="the run is damaged: not valid JSON"):
        runs.folder_kind(tmp_path)


def _three_class_file(src: Path, dest: Path) -> Path:
    with open(src, newline="") as fh, open(dest, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["label", "text"])
        # the file's first rows hold two AG News classes only: three classes by position (the test
        # is about how many classes the evaluation shows, not what they mean)
        for i, (_cls, title, desc) in enumerate(csv.reader(fh)):
            writer.writerow([i % 3, f"{title} {desc}"])
    return dest


def test_three_class_training_reports_three_classes(tiny_model_dir, ag_files, tmp_path):
    """Regression: train's evaluation used AG News' four names whatever model.num_labels was."""
    from agnews_lora.train import train

    train_file = _three_class_file(ag_files["train"], tmp_path / "train3.csv")
    test_file = _three_class_file(ag_files["test"], tmp_path / "test3.csv")
    run = train(load_config(overrides=[
        f"model.name={tiny_model_dir}", "model.num_labels=3", "model.init=random", f"data.train={train_file}", f"data.test={test_file}",
        "data.val_size=30", "data.max_length=48", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2",
        "train.batch_size=8", "train.eval_every=2", "train.precision=fp32", "train.progress=false", "lora.r=2",
        f"out_dir={tmp_path / 'run'}"]))
    evals = runs.read_records(run / runs.METRICS)
    assert [len(row) for row in evals[-1]["val_confusion"]] == [3, 3, 3]
    test = runs.read_json(run / runs.TEST_METRICS)
    assert list(test["per_class"]) == ["class 0", "class 1", "class 2"] and len(test["confusion"]) == 3
    assert not (run / runs.LOCK).exists()
