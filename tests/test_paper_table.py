"""experiments/paper_table.py end to end on a tiny 12-layer model: plan, table, plot, resume, refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_roberta

from agnews_lora import runs

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "experiments" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pt = _load_script()


# the rows train in this process (conftest.run_child_in_process), one thread each
pytestmark = pytest.mark.usefixtures("rows_in_process")


@pytest.fixture(scope="module")
def tiny12_dir(tmp_path_factory) -> Path:
    """conftest's tiny RoBERTa with 12 layers, so the targeted row's layers 0,1,5,10,11 exist."""
    return make_tiny_roberta(tmp_path_factory.mktemp("tiny12"), num_layers=12)


@pytest.fixture(scope="module")
def setup(tiny12_dir, ag_files, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("paper_table")
    # 4 steps of batch 8 (the teacher 8); budget 30,000 so the planner picks small ranks on hidden 32.
    args = ["--out", str(base / "runs"), "--table", str(base / "docs" / "table.md"), "--model-dir", str(tiny12_dir),
            "--steps", "4", "--batch-size", "8", "--max-length", "48", "--val-size", "40",
            "--set", f"data.train={ag_files['train']}", "--set", f"data.test={ag_files['test']}",
            "--set", f"data.cache_dir={base / 'cache'}", "--set", "train.precision=fp32",
            "--set", "train.progress=false", "--set", "budget.max_trainable=30000"]
    return {"args": args, "out": base / "runs", "table": base / "docs" / "table.md"}


def _cells(md: str, start: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def _summary(out: Path, row: str) -> dict:
    return json.loads((out / row / "summary.json").read_text())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def test_dry_run_plans_every_row_with_exact_counts(setup, capsys):
    assert pt.main(setup["args"] + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    # hidden 32, 4 labels: RoBERTa head 32*32+32 + 32*4+4 = 1,188, linear head 132; LoRA r per module 2*32*r
    # (FFN modules 96*r), 12 layers unless chosen.
    expected = {"teacher": 12 * 2 * 64 * 8 + 1188, "1-lora-only": 12 * 2 * 64 * 8 + 1188,
                "3-distill-reduced": 12 * 2 * 64 * 4 + 1188, "4-distill-tuned": 12 * 2 * 64 * 16 + 132,
                "5-targeted": 5 * 2 * 64 * 12 + 1188,
                "6-linear-all": 12 * (4 * 64 + 2 * 96) * 5 + 132,  # planner: (30,000 - 132) // 5,376 = 5
                "7-linear-attention": 12 * 4 * 64 * 9 + 132}  # (30,000 - 132) // 3,072 = 9
    for row, count in expected.items():
        assert re.search(rf"^  {re.escape(row)}\s+{count:,}\s+new\s", out, re.M), (row, out)
    assert "agnews-lora distill --config configs/paper-distill.yaml" in out
    assert "lora.r=5 lora.alpha=20" in out and "lora.layers=" not in out  # layers come from the preset
    assert not setup["out"].exists()  # nothing trained, no folders made


def test_over_budget_row_is_refused_before_training(setup, capsys):
    assert pt.main(setup["args"] + ["--rows", "1", "--set", "budget.max_trainable=10000"]) == 2
    err = capsys.readouterr().err
    assert "row 1-lora-only" in err and "13,476" in err and "10,000" in err
    assert not setup["out"].exists()


def test_unknown_row_is_a_clear_error(setup, capsys):
    assert pt.main(setup["args"] + ["--rows", "1,9", "--dry-run"]) == 2
    assert "--rows: unknown 9" in capsys.readouterr().err


@pytest.fixture(scope="module")
def first_run(setup):
    """Rows 2 (KD: brings the teacher) and 6 (planner rank), trained once for the tests below."""
    assert pt.main(setup["args"] + ["--rows", "2,6"]) == 0
    return setup


def test_table_holds_the_runs_numbers(first_run):
    out, md = first_run["out"], first_run["table"].read_text()
    for row, title in (("2-distill", "LoRA + distillation"), ("6-linear-all", "Ours: linear head")):
        s = _summary(out, row)
        cells = _cells(md, f"| {row.split('-')[0]} | **{title}")
        assert cells[2] == f"{s['trainable']['total']:,}"
        assert cells[3] == f"{100 * s['best_val_accuracy']:.2f}%"
        assert cells[4] == f"{100 * s['test_accuracy']:.2f}%"
        assert cells[5] == _minutes(s["train_seconds"])
    teacher = json.loads((out / "2-distill" / "teacher.json").read_text())
    assert teacher["source"] == str(out / "teacher")
    kd_cells = _cells(md, "| 2 | ")
    assert kd_cells[6] == _minutes(_summary(out, "teacher")["train_seconds"] + teacher["logits_computed_seconds"])
    assert _cells(md, "| 6 | ")[6] == "-"
    for row in ("teacher", "2-distill", "6-linear-all"):  # each row is `agnews-lora train|distill`: its write-up too
        assert (out / row / "report.md").is_file() and (out / row / "best" / "README.md").is_file()
    # the planner's rank, with alpha = 4 r
    cfg = yaml.safe_load((out / "6-linear-all" / "config.yaml").read_text())
    assert (cfg["lora"]["r"], cfg["lora"]["alpha"], cfg["model"]["head"]) == (5, 20.0, "linear")
    assert _summary(out, "6-linear-all")["trainable"]["total"] == 12 * 448 * 5 + 132
    # the same conditions for every row; the teacher twice the steps and rows
    for row in ("2-distill", "6-linear-all"):
        c = yaml.safe_load((out / row / "config.yaml").read_text())
        assert (c["train"]["max_steps"], c["data"]["max_train_rows"], c["data"]["val_size"]) == (4, 32, 40)
    t = yaml.safe_load((out / "teacher" / "config.yaml").read_text())
    assert (t["train"]["max_steps"], t["data"]["max_train_rows"]) == (8, 64)


def test_table_header_and_plot(first_run):
    md = first_run["table"].read_text()
    assert f"{len(os.sched_getaffinity(0))} cores (nproc)" in md
    import torch

    assert f"torch {torch.__version__}" in md
    assert "`python experiments/paper_table.py --out" in md and "--rows 2,6" in md
    assert "4 optimizer steps of batch 8 over 32 training rows" in md and "all 120 test rows" in md
    assert "Not run yet: 1-lora-only, 3-distill-reduced, 4-distill-tuned, 5-targeted, 7-linear-attention." in md
    assert "Teacher time (row 2; one teacher, paid once)" in md
    assert "](table.png)" in md
    from PIL import Image

    png = first_run["table"].with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()


def test_second_invocation_skips_finished_rows(first_run, capsys):
    out = first_run["out"]
    finished = {row: (out / row / "summary.json").stat().st_mtime_ns
                for row in ("teacher", "2-distill", "6-linear-all")}
    capsys.readouterr()
    assert pt.main(first_run["args"] + ["--rows", "2,5,6"]) == 0
    log = capsys.readouterr().out
    for row, mtime in finished.items():
        assert f"{row} (" in log and (out / row / "summary.json").stat().st_mtime_ns == mtime
    assert log.count("finished earlier, not rerun") == 3
    assert "5-targeted (8,868 trainable): training" in log  # 5 layers x 2 x 64 x 12 + 1,188
    md = first_run["table"].read_text()
    assert _cells(md, "| 5 | ")[2] == "8,868"
    s5, s6 = _summary(out, "5-targeted"), _summary(out, "6-linear-all")
    word = "beats" if s6["test_accuracy"] > s5["test_accuracy"] else "does not beat"
    assert f"Best row of ours (6-linear-all, 27,012 trainable) {word} the paper's targeted row" in md


def test_interrupted_row_resumes_from_its_checkpoint(first_run, capsys):
    out = first_run["out"]
    run = out / "5-targeted"
    if not (run / "summary.json").is_file():
        assert pt.main(first_run["args"] + ["--rows", "5"]) == 0
    before = _summary(out, "5-targeted")
    logged = (run / "train_log.jsonl").read_text()
    # As if killed while scoring the test split: last/ holds the final step, no summary yet.
    (run / "summary.json").unlink()
    (run / "test_metrics.json").unlink()
    capsys.readouterr()
    assert pt.main(first_run["args"] + ["--rows", "5"]) == 0
    assert "5-targeted (8,868 trainable): resuming from" in capsys.readouterr().out
    after = _summary(out, "5-targeted")
    assert (run / "train_log.jsonl").read_text() == logged  # no step trained again
    assert (after["steps"], after["best_val_accuracy"], after["test_accuracy"]) == \
        (before["steps"], before["best_val_accuracy"], before["test_accuracy"])
    assert json.loads((run / pt.ROW_FILE).read_text())["resumed"] is True


def test_row_interrupted_before_a_checkpoint_restarts_cleanly(first_run, capsys):
    out = first_run["out"]
    run = out / "1-lora-only"
    run.mkdir()  # what train leaves when killed before its first evaluation: marker, config, a few log lines
    runs.write_marker(run, "run")
    shutil.copy(out / "6-linear-all" / "config.yaml", run / "config.yaml")
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 9.875}\n')
    capsys.readouterr()
    assert pt.main(first_run["args"] + ["--rows", "1"]) == 0
    log = capsys.readouterr().out
    assert re.search(r"^  1-lora-only\s+13,476\s+restart\s", log, re.M)
    assert "1-lora-only (13,476 trainable): training" in log
    assert "9.875" not in (run / "train_log.jsonl").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["r"] == 8
    assert _summary(out, "1-lora-only")["steps"] == 4


def test_a_foreign_folder_in_a_rows_place_is_refused(first_run, capsys):
    (first_run["out"] / "3-distill-reduced").mkdir()
    (first_run["out"] / "3-distill-reduced" / "notes.txt").write_text("mine")
    assert pt.main(first_run["args"] + ["--rows", "3", "--dry-run"]) == 2
    assert "3-distill-reduced exists and is not a run folder" in capsys.readouterr().err
    assert (first_run["out"] / "3-distill-reduced" / "notes.txt").read_text() == "mine"


def test_changed_settings_are_refused_for_finished_rows(first_run, capsys):
    assert pt.main(first_run["args"] + ["--rows", "6", "--steps", "5", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "row 6-linear-all" in err and "train.max_steps: 4 there, 5 now" in err


def test_row_status(tmp_path):
    run = runs.RunFolder(tmp_path / "row")
    assert run.status == "new"
    run.path.mkdir()
    (run / "notes.txt").write_text("mine")
    assert run.status == "foreign"  # the rows refuse it: "exists and is not a run folder"
    (run / "notes.txt").unlink()
    (run / runs.CONFIG).write_text("{}")
    assert run.status == "foreign"  # a config.yaml alone: not recognisably the tool's run
    runs.write_marker(run.path, "run")
    assert run.status == "restart"  # interrupted before its first checkpoint
    run.last.mkdir()
    assert run.status == "restart"  # a last/ without state.json is not a checkpoint
    (run.last / runs.STATE).write_text("{}")
    assert run.status == "resume"
    (run / runs.SUMMARY).write_text("{}")
    assert run.status == "done"


def test_table_only_without_finished_rows_is_an_error(tmp_path, capsys):
    assert pt.main(["--out", str(tmp_path / "none"), "--table", str(tmp_path / "t.md"), "--table-only"]) == 2
    assert "no finished row" in capsys.readouterr().err
