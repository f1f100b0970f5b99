"""Live tracking through accelerate's trackers: `train.log_with` (tensorboard, wandb, mlflow).

The same numbers as the run folder's logs: every train_log.jsonl record under `train/`, every
metrics.jsonl record under `eval/`, the final test metrics under `test/`, and the resolved config
(flattened to dotted keys) as hyperparameters. TensorBoard writes under RUN_DIR/tensorboard;
wandb and mlflow use their own settings (WANDB_*, MLFLOW_TRACKING_URI, ...), with the project
"agnews-lora" and the run folder's name as the run name.

Only the main process logs (accelerate's trackers are main-process only).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

from agnews_lora.config import Config
from agnews_lora.errors import ConfigError
from agnews_lora.extras import require

TRACKERS = ("tensorboard", "wandb", "mlflow")
PROJECT = "agnews-lora"
TENSORBOARD_DIR = "tensorboard"  # under the run folder


def trackers_for(log_with: str) -> list[str]:
    """The tracker names `train.log_with` asks for, each checked to be installed.

    Args:
        log_with: "none", one of TRACKERS, or "all" (every tracker of TRACKERS that is installed).

    Raises:
        MissingExtra: a named tracker's package is not installed (the message names the extra),
            or "all" finds none installed.
        ConfigError: an unknown name.
    """
    if log_with == "none":
        return []
    if log_with == "all":
        installed = [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
        if not installed:
            require("tensorboard", "train.log_with=all (no tracker is installed)")
        return installed
    if log_with not in TRACKERS:
        raise ConfigError(f"train.log_with={log_with!r}: use none, {', '.join(TRACKERS)} or all")
    require(log_with, f"train.log_with={log_with}")
    return [log_with]


def flat_config(cfg: Config) -> dict:
    """The config as {dotted.key: scalar}: what trackers accept as hyperparameters (lists and
    dicts as their text, None as "none")."""
    out: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        elif value is None:
            out[prefix] = "none"
        else:
            out[prefix] = str(value)

    walk("", asdict(cfg))
    return out


def numeric(record: dict, group: str) -> dict:
    """The record's numbers under `group/` (flags and nested values are left to the jsonl)."""
    return {f"{group}/{k}": v for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}


def accelerator_trackers(cfg: Config, run_dir: Path, start_step: int = 0) -> list:
    """What to pass as `Accelerator(log_with=...)` for this run.

    TensorBoard is given as a tracker instance of our own, so that its events go to
    RUN_DIR/tensorboard; a resumed run (`start_step` > 0) drops the events a killed process wrote
    after its last checkpoint (SummaryWriter's purge_step), as train_log.jsonl drops its records.
    """
    from accelerate.tracking import TensorBoardTracker

    names = trackers_for(cfg.train.log_with)
    out: list = [t for t in names if t != "tensorboard"]
    if "tensorboard" in names:
        # events at steps after the checkpoint's go; the checkpoint's own step was logged before it
        kwargs = {"purge_step": start_step + 1} if start_step else {}
        out.append(TensorBoardTracker(TENSORBOARD_DIR, str(run_dir), **kwargs))
    return out


def start(accelerator, cfg: Config, run_dir: Path) -> None:
    """Open the accelerator's trackers with the resolved config as hyperparameters."""
    if accelerator.log_with:
        name = Path(run_dir).name
        accelerator.init_trackers(PROJECT, config=flat_config(cfg),
                                  init_kwargs={"wandb": {"name": name}, "mlflow": {"run_name": name}})


def log(accelerator, record: dict, group: str) -> None:
    """Send a log record's numbers to the trackers (nothing when none is open)."""
    if accelerator.trackers:
        accelerator.log(numeric(record, group), step=record["step"])


def end(accelerator) -> None:
    """Close the trackers (flushes TensorBoard's events, finishes the wandb/mlflow run)."""
    if accelerator.trackers:
        accelerator.end_training()
