"""Training: resume after an interruption continues exactly where the run stopped; used run
folders are refused; checkpoint folders are swapped in atomically; the linear head reloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from agnews_lora import loop, runs
from agnews_lora import train as train_mod
from agnews_lora import checkpoint as ckpt
from agnews_lora.checkpoint import read_jsonl, recover_swap, replace_dir
from agnews_lora.config import ConfigError
from agnews_lora.data import read_file


@pytest.fixture(scope="module")
def reference_run(make_cfg, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run."""
    return train_mod.train(make_cfg(tmp_path_factory.mktemp("ref") / "run"))


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path)]


def _optim(run: Path) -> dict:
    return torch.load(run / "last" / "optim.pt", weights_only=False)


def test_resume_after_interruption_matches_the_uninterrupted_run(make_cfg, reference_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real_loss = loop._loss

    def interrupted(ctx, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5: after the step-3 checkpoint, before the next one
            raise KeyboardInterrupt
        return real_loss(ctx, batch)

    with monkeypatch.context() as m:
        m.setattr(loop, "_loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(make_cfg(run))
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
    assert _steps(run / "train_log.jsonl") == [1, 2, 3, 4]  # step 4 was logged, then lost
    assert not (run / "summary.json").exists()

    train_mod.train(make_cfg(run, "train.resume=true"))
    assert _steps(run / "metrics.jsonl") == [3, 6]
    assert _steps(run / "train_log.jsonl") == [1, 2, 3, 4, 5, 6]  # redone steps are not logged twice
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6

    # Optimizer moments, scheduler, data order and dropout RNG all continue: bit for bit the
    # uninterrupted run.
    ours, ref = _optim(run), _optim(reference_run)
    assert ours["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"] == 6
    for state, ref_state in zip(ours["optimizer"]["state"].values(), ref["optimizer"]["state"].values()):
        assert int(state["step"]) == 6
        assert torch.equal(state["exp_avg"], ref_state["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], ref_state["exp_avg_sq"])
    for folder in ("last", "best"):
        got = load_file(str(run / folder / "adapter_model.safetensors"))
        want = load_file(str(reference_run / folder / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    ref_metrics = read_jsonl(reference_run / "metrics.jsonl")
    assert [m["val_loss"] for m in read_jsonl(run / "metrics.jsonl")] == [m["val_loss"] for m in ref_metrics]
    assert json.loads((run / "test_metrics.json").read_text())["confusion"] == \
        json.loads((reference_run / "test_metrics.json").read_text())["confusion"]


def test_resume_with_more_steps_continues_the_run(make_cfg, tmp_path):
    run = tmp_path / "run"
    train_mod.train(make_cfg(run, "train.max_steps=3"))
    assert _optim(run)["scheduler"]["last_epoch"] == 3
    train_mod.train(make_cfg(run, "train.resume=true"))
    assert _steps(run / "metrics.jsonl") == [3, 6]
    assert _optim(run)["scheduler"]["last_epoch"] == 6
    assert all(int(s["step"]) == 6 for s in _optim(run)["optimizer"]["state"].values())
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["train"]["resume"] is True  # the config it ran under


def test_used_run_folder_is_refused(make_cfg, reference_run):
    before = (reference_run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run; pass train.resume=true to continue it"):
        train_mod.train(make_cfg(reference_run))
    with pytest.raises(ConfigError, match=r"train.resume: lora.\* differs from the run"):
        train_mod.train(make_cfg(reference_run, "train.resume=true", "lora.r=8"))
    assert (reference_run / "metrics.jsonl").read_text() == before


def test_no_temporary_folders_are_left(reference_run):
    assert sorted(p.name for p in reference_run.iterdir() if p.name.startswith(".")) == [runs.MARKER]
    for folder in ("best", "last"):
        names = {p.name for p in (reference_run / folder).iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert {"optim.pt", "state.json"} <= {p.name for p in (reference_run / "last").iterdir()}


def test_replace_dir_swaps_whole_folders(tmp_path):
    dest = tmp_path / "best"
    replace_dir(lambda tmp: (tmp / "a.txt").write_text("one"), dest)
    assert (dest / "a.txt").read_text() == "one"

    def failing(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half-written")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(failing, dest)
    assert (dest / "a.txt").read_text() == "one"  # the old checkpoint survives a failed save
    replace_dir(lambda tmp: (tmp / "b.txt").write_text("two"), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no .tmp or .old folders


def test_crash_between_the_two_renames_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    dest = tmp_path / "last"
    replace_dir(lambda tmp: (tmp / "a.txt").write_text("step 3"), dest)
    real_replace = ckpt.os.replace

    def crash_on_second_rename(src, dst):
        if Path(src).name.startswith(".last.tmp"):  # dest is already moved aside to .last.old
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "replace", crash_on_second_rename)
        with pytest.raises(KeyboardInterrupt):
            replace_dir(lambda tmp: (tmp / "a.txt").write_text("step 6"), dest)
    assert not dest.exists() and (tmp_path / ".last.old" / "a.txt").read_text() == "step 3"
    assert recover_swap(dest) == dest and (dest / "a.txt").read_text() == "step 3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    replace_dir(lambda tmp: (tmp / "a.txt").write_text("step 6"), dest)  # the next save works as usual
    assert (dest / "a.txt").read_text() == "step 6"


def test_resume_finds_a_checkpoint_left_aside_by_a_crash(make_cfg, reference_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "summary.json").unlink()
    (run / "last").rename(run / ".last.old")  # as if the crash hit between the renames
    train_mod.train(make_cfg(run, "train.resume=true"))
    assert (run / "last" / "state.json").is_file() and not (run / ".last.old").exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_fresh_start_after_a_crash_before_any_checkpoint(make_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_loss = loop._loss
    calls = {"n": 0}

    def crash_at_step_2(ctx, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_loss(ctx, batch)

    with monkeypatch.context() as m:
        m.setattr(loop, "_loss", crash_at_step_2)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(make_cfg(run, "train.max_steps=3"))
    assert _steps(run / "train_log.jsonl") == [1] and not (run / "last").exists()
    train_mod.train(make_cfg(run, "train.max_steps=3", "train.resume=true"))  # nothing to resume: starts over
    assert _steps(run / "train_log.jsonl") == [1, 2, 3]


def test_linear_head_run_reloads_with_the_same_predictions(make_cfg, ag_files, tmp_path, monkeypatch):
    from agnews_lora.predict import Classifier

    seen = []
    real = loop.predict_logits

    def recording(model, loader, accelerator, n_rows):
        seen.append(real(model, loader, accelerator, n_rows))
        return seen[-1]

    monkeypatch.setattr(loop, "predict_logits", recording)
    run = train_mod.train(make_cfg(tmp_path / "run", "model.head=linear"))
    in_memory = seen[-1]  # the last call scores the test split with the best checkpoint loaded
    texts = read_file(ag_files["test"]).texts
    assert in_memory.shape == (len(texts), 4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["head"] == "linear" and summary["trainable"]["head_by_module"] == {"classifier.out_proj": 132}

    for merge in (True, False):
        clf = Classifier.load(run, precision="fp32", merge=merge)
        logits = clf.predict_logits(texts)
        np.testing.assert_allclose(logits, in_memory, atol=1e-5, rtol=0)
        assert clf.predict(texts) == in_memory.argmax(-1).tolist()
