"""The write-up of a finished run: report.md with its plots, and the model card best/README.md.

`train` and `distill` write the run's data (logs, checkpoints, summary.json, test metrics); the
command layer (cli's train and distill, each sweep trial) writes the write-up from the run
folder they return. Both documents are made from the run folder alone, as `agnews-lora report`
and `agnews-lora card` remake them later.
"""

from __future__ import annotations

from pathlib import Path

from agnews_lora import runs
from agnews_lora.card import write_run_card
from agnews_lora.report import write_report


def finish_run(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md (and its plots) and the model card of a run `train` or `distill` finished,
    holding the run folder's writer lock meanwhile.

    Args:
        run_dir: the run folder `train` returned (it holds summary.json).

    Returns:
        (report.md, best/README.md).

    Raises:
        RunLocked: another live process is writing the run folder.
    """
    with runs.writer_lock(run_dir):
        return write_report(run_dir), write_run_card(run_dir)
