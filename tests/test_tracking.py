"""Live tracking (train.log_with): TensorBoard's events, read back with TensorBoard's own reader,
carry the same numbers as the run folder's jsonl logs; a tracker that is not installed is a clear
error before any work."""

from __future__ import annotations

import importlib.util
import json

import pytest

from agnews_lora import checkpoint as ckpt
from agnews_lora.config import ConfigError
from agnews_lora.extras import MissingExtra
from agnews_lora.tracking import TENSORBOARD_DIR, flat_config, trackers_for
from conftest import train_interrupted

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed (pip install 'agnews-lora[track]')")


def _scalars(run_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every event file under RUN_DIR/tensorboard (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run_dir / TENSORBOARD_DIR))
    mux.Reload()
    out: dict[str, dict[int, float]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            for event in mux.Scalars(run, tag):
                out.setdefault(tag, {})[event.step] = event.value
    return out


def _hparams(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run_dir / TENSORBOARD_DIR))
    mux.Reload()
    for content in mux.PluginRunToTagToContent("hparams").values():
        for blob in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(blob)
            if data.HasField("session_start_info"):
                return {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
    return {}


def _check_matches_logs(run_dir) -> None:
    scalars = _scalars(run_dir)
    train_log = ckpt.read_jsonl(run_dir / "train_log.jsonl")
    metrics = ckpt.read_jsonl(run_dir / "metrics.jsonl")
    assert train_log and metrics
    assert sorted(scalars["train/loss"]) == [r["step"] for r in train_log]
    for r in train_log:
        for key in ("loss", "lr", "examples_per_s", "tokens"):
            assert scalars[f"train/{key}"][r["step"]] == pytest.approx(r[key], rel=1e-6)
    assert sorted(scalars["eval/val_accuracy"]) == [r["step"] for r in metrics]
    for r in metrics:
        for key in ("val_accuracy", "val_loss", "val_f1_macro"):
            assert scalars[f"eval/{key}"][r["step"]] == pytest.approx(r[key], rel=1e-6)
    test = json.loads((run_dir / "test_metrics.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert scalars["test/accuracy"] == {summary["steps"]: pytest.approx(test["accuracy"])}
    assert scalars["test/f1_macro"][summary["steps"]] == pytest.approx(test["f1_macro"])


@needs_tensorboard
def test_tensorboard_events_match_the_jsonl_logs(make_cfg, tmp_path):
    from agnews_lora.train import train

    cfg = make_cfg(tmp_path / "run", "train.log_with=tensorboard")
    run_dir = train(cfg)
    _check_matches_logs(run_dir)
    hparams = _hparams(run_dir)
    assert hparams["train.lr"] == pytest.approx(cfg.train.lr)
    assert hparams["lora.r"] == cfg.lora.r
    assert hparams["model.name"] == cfg.model.name


@needs_tensorboard
def test_resumed_run_has_one_event_per_step(make_cfg, tmp_path, monkeypatch):
    """A run killed after its first checkpoint (step 3) and resumed: the steps the killed process
    logged past the checkpoint are dropped from the events as from the jsonl (no step twice)."""
    from agnews_lora.train import train

    cfg = make_cfg(tmp_path / "run", "train.log_with=tensorboard")
    train_interrupted(cfg, monkeypatch, at_call=5)  # steps 1-4 logged, checkpoint at 3
    cfg.train.resume = True
    run_dir = train(cfg)
    assert [r["step"] for r in ckpt.read_jsonl(run_dir / "train_log.jsonl")] == list(range(1, 7))
    _check_matches_logs(run_dir)


def test_no_tracking_by_default(make_cfg, tmp_path):
    from agnews_lora.train import train

    run_dir = train(make_cfg(tmp_path / "run"))
    assert not (run_dir / TENSORBOARD_DIR).exists()


def test_missing_tracker_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard")
                        else real(name, *a))
    with pytest.raises(MissingExtra, match=r"wandb.*pip install 'agnews-lora\[wandb\]'"):
        trackers_for("wandb")
    with pytest.raises(MissingExtra, match=r"tensorboard.*agnews-lora\[track\]"):
        trackers_for("tensorboard")
    assert trackers_for("none") == []
    with pytest.raises(ConfigError, match="train.log_with='neptune'"):
        trackers_for("neptune")


def test_missing_tracker_refused_before_any_work(make_cfg, tmp_path, monkeypatch):
    from agnews_lora.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MissingExtra, match="mlflow"):
        train(make_cfg(tmp_path / "run", "train.log_with=mlflow"))
    assert not (tmp_path / "run").exists()


def test_flat_config_is_scalars_only(make_cfg, tmp_path):
    flat = flat_config(make_cfg(tmp_path / "run", "lora.layers=[0,1]"))
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert flat["lora.layers"] == "[0, 1]" and flat["train.max_steps"] == 6
