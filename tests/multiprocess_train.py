"""What tests/test_multiprocess.py launches in every process: the real `agnews-lora` entry point
(agnews_lora.cli.main) with test probes that environment variables switch on.

AGNEWS_TEST_PROBE_DIR (with AGNEWS_TEST_RUN_DIR): each process writes to the probe folder
  - rank{N}.safetensors: its trainable weights after the last optimizer step, before best/ is
    reloaded for the test split (peft's adapter state dict: the keys of the adapter files);
  - writes-rank{N}.jsonl: every file operation it made inside the run folder (opened for writing,
    created, renamed, removed), seen by a Python audit hook, one line each as it happens.
AGNEWS_TEST_CRASH_AT=K: every process dies at its K-th loss computation (os._exit, no cleanup,
  as after kill -9).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))
PROBES = Path(os.environ["AGNEWS_TEST_PROBE_DIR"]) if os.environ.get("AGNEWS_TEST_PROBE_DIR") else None
RUN_DIR = os.path.abspath(os.environ.get("AGNEWS_TEST_RUN_DIR", "/nonexistent"))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_log = None  # writes-rank{N}.jsonl, line-buffered: every line is on disk before the next operation


def _in_run(path) -> bool:
    if isinstance(path, int):
        return False
    path = os.path.abspath(os.fsdecode(path))
    return path == RUN_DIR or path.startswith(RUN_DIR + os.sep)


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        if writing and path is not None and _in_run(path):
            _record(event, path)
    elif event == "os.rename":
        if _in_run(args[0]) or _in_run(args[1]):
            _record(event, args[0], args[1])
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.link", "os.symlink"):
        if args and not isinstance(args[0], int) and _in_run(args[0]):
            _record(event, args[0])


def _record(event: str, *paths) -> None:
    _log.write(json.dumps([event, *map(os.fsdecode, paths)]) + "\n")


def _install_probes() -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from agnews_lora import loop
    from agnews_lora import train as train_mod

    global _log
    _log = open(PROBES / f"writes-rank{RANK}.jsonl", "w", buffering=1)
    sys.addaudithook(_audit)
    real_finish, real_loss = train_mod._finish, loop._loss

    def finish(ctx, *args, **kwargs):
        model = ctx.accelerator.unwrap_model(ctx.model)
        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(PROBES / f"rank{RANK}.safetensors"))
        return real_finish(ctx, *args, **kwargs)

    train_mod._finish = finish
    crash_at = int(os.environ.get("AGNEWS_TEST_CRASH_AT", "0"))
    if crash_at:
        calls = [0]

        def loss(ctx, batch):
            calls[0] += 1
            if calls[0] == crash_at:
                os._exit(3)
            return real_loss(ctx, batch)

        loop._loss = loss


if __name__ == "__main__":
    if PROBES is not None:
        _install_probes()
    from agnews_lora.cli import main

    main(sys.argv[1:])
