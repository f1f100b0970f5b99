"""agnews_lora.study on its own, without training: the plan's refusals by row name, what each
run-folder status makes a row do, the paired column on tiny prediction files, the time estimate
and the machine line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import make_shapes_model

from agnews_lora import runs, study
from agnews_lora.errors import BudgetError, ConfigError, UserError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_shapes_model(tmp_path_factory.mktemp("shapes"))


def row(name: str, model_dir: Path, out: Path, *extra: str) -> study.Row:
    return study.Row(name, (f"model.name={model_dir}", "lora.r=4", f"out_dir={out / name}", "train.max_steps=10",
                            "train.eval_every=4", "data.val_size=40", *extra))


def test_plan_counts_every_row_exactly(model_dir, tmp_path):
    planned = study.plan([row("a", model_dir, tmp_path), row("b", model_dir, tmp_path, "lora.r=8"),
                          study.Row("c", unsupported="no key/value cache")])
    # LoRA on query+value of 2 layers: 2 x 2 x (32 x r + r x 32); RoBERTa head 32 x 32 + 32 + 32 x 4 + 4 = 1,188
    assert [(p.name, p.trainable, p.status) for p in planned] == [
        ("a", 2 * 2 * 64 * 4 + 1188, "new"), ("b", 2 * 2 * 64 * 8 + 1188, "new"), ("c", None, "unsupported")]
    assert planned[0].run_dir == tmp_path / "a" and planned[2].cfg is None
    assert not (tmp_path / "a").exists()  # planning makes no folder


def test_plan_refuses_an_over_budget_row_by_name(model_dir, tmp_path):
    rows = [row("fits", model_dir, tmp_path, "budget.max_trainable=3000"),  # r=4: 2,212
            row("too-big", model_dir, tmp_path, "lora.r=8", "budget.max_trainable=3000")]  # r=8: 3,236
    with pytest.raises(BudgetError, match=r"^row too-big: .*3,236.*3,000"):
        study.plan(rows)


def test_plan_refuses_a_foreign_folder_by_name_and_leaves_it(model_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^row mine: .*mine exists and is not a run folder"):
        study.plan([row("mine", model_dir, tmp_path)])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_plan_refuses_a_finished_row_trained_with_other_settings(model_dir, tmp_path):
    earlier = study.resolve(row("done", model_dir, tmp_path))
    folder = tmp_path / "done"
    folder.mkdir()
    runs.write_marker(folder, "run")
    runs.write_config(earlier, folder)
    (folder / runs.SUMMARY).write_text("{}")
    assert study.plan([row("done", model_dir, tmp_path)])[0].status == "done"  # same settings: kept
    with pytest.raises(ConfigError, match=r"^row done: .*train.max_steps: 10 there, 12 now"):
        study.plan([row("done", model_dir, tmp_path, "train.max_steps=12")])


@pytest.fixture
def fake_child(monkeypatch):
    """study.run_child replaced: records the command, makes the run folder as train would."""
    calls = []

    def run_child(argv, what):
        out = next(a.split("=", 1)[1] for a in argv if a.startswith("out_dir="))
        calls.append({"argv": argv, "existed": Path(out).exists()})
        Path(out).mkdir(exist_ok=True)
        return 123.4

    monkeypatch.setattr(study, "run_child", run_child)
    return calls


def _planned(model_dir: Path, tmp_path: Path, status: str) -> study.Planned:
    r = row("r", model_dir, tmp_path)
    return study.Planned(r, study.resolve(r), 2212, status)


def test_each_status_decides_what_the_row_does(model_dir, tmp_path, fake_child, capsys):
    folder = tmp_path / "r"
    assert study.run_row(_planned(model_dir, tmp_path, "done"), index=1, count=3) is None
    assert study.run_row(study.Planned(study.Row("u", unsupported="why"), None, None, "unsupported"),
                         index=2, count=3) is None
    assert not fake_child
    printed = capsys.readouterr().out
    assert "[1/3] r (2,212 trainable): finished earlier, not rerun" in printed
    assert "[2/3] u (- trainable): not supported here: why" in printed

    folder.mkdir()  # interrupted before its first checkpoint: discarded (the tool's folder only), trained afresh
    runs.write_marker(folder, "run")
    (folder / "train_log.jsonl").write_text('{"step": 1}\n')
    record = study.run_row(_planned(model_dir, tmp_path, "restart"), index=1, count=1, command="cmd", record="rec.json")
    assert fake_child[-1]["existed"] is False and not (folder / "train_log.jsonl").exists()
    assert fake_child[-1]["argv"][:4] == [sys.executable, "-m", "agnews_lora.cli", "train"]
    assert "train.resume=true" not in fake_child[-1]["argv"]
    assert record["peak_rss_mb"] == 123.4 and record["resumed"] is False and record["command"] == "cmd"
    assert json.loads((folder / "rec.json").read_text()) == record
    assert study.read_records([folder, tmp_path / "none"], "rec.json") == [record]

    study.run_row(_planned(model_dir, tmp_path, "resume"), index=1, count=1, record="rec.json")
    assert fake_child[-1]["argv"][-1] == "train.resume=true" and fake_child[-1]["existed"] is True
    assert "resuming from" in capsys.readouterr().out
    assert study.read_record(folder, "rec.json")["resumed"] is True


def test_the_distill_command_and_its_config_file():
    r = study.Row("kd", ("lora.r=4",), config="configs/paper-distill.yaml", command="distill")
    argv = study.train_command(study.Planned(r, None, None, "new"))
    assert argv[3:] == ["distill", "--config", "configs/paper-distill.yaml", "lora.r=4"]
    with pytest.raises(ConfigError, match="row x: command 'predict'"):
        study.Row("x", command="predict")


def test_a_failed_child_is_an_error_that_names_the_row():
    assert study.run_child([sys.executable, "-c", "pass"], what="row ok") > 0
    with pytest.raises(UserError, match="row bad: agnews-lora train stopped with a user error"):
        study.run_child([sys.executable, "-c", "import sys; sys.exit(2)"], what="row bad: agnews-lora train")
    with pytest.raises(RuntimeError, match="row bad: agnews-lora train exited with 1"):
        study.run_child([sys.executable, "-c", "import sys; sys.exit(1)"], what="row bad: agnews-lora train")


def test_a_user_error_is_one_line_and_exit_status_2(capsys):
    def execute(args, argv):
        raise ConfigError(f"--rows: unknown {argv[0]}")

    assert study.run_command(lambda argv: None, execute, ["9"]) == 2
    assert capsys.readouterr().err == "error: --rows: unknown 9\n"
    assert study.run_command(lambda argv: None, lambda args, argv: None, []) == 0


def test_the_paired_column_on_two_tiny_prediction_files(tmp_path):
    import numpy as np

    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    best_preds, other_preds = labels, [1, 2, 2, 3, 0, 1, 2, 3]  # the other row misses the first two rows
    for name, preds in (("best", best_preds), ("other", other_preds)):
        (tmp_path / name).mkdir()
        runs.write_predictions(tmp_path / name / runs.TEST_PREDICTIONS, labels, np.eye(4)[preds], source="test.csv")
    best, other = (runs.RunFolder(tmp_path / n).test_predictions() for n in ("best", "other"))
    d = study.paired(other, best)
    # d = [-1, -1, 0, 0, 0, 0, 0, 0]: mean -0.25, sd (ddof 1) sqrt(1.5 / 7), se = sd / sqrt(8)
    assert d["difference"] == -0.25 and d["se"] == pytest.approx((1.5 / 7) ** 0.5 / 8 ** 0.5)
    assert study.paired_cell(d) == "-25.00 ± 16.37"
    assert study.paired_cell(None, best=True) == "-" and study.paired_cell(None) == "n/a"
    assert study.paired(None, best) is None and study.paired(other, None) is None
    shuffled = dict(best, labels=best["labels"][::-1])  # other test rows: not comparable
    assert study.paired(other, shuffled) is None

    note = study.paired_note([("Other", d), ("Old", None)])
    assert note.startswith("vs best (paired): test accuracy minus the best's on the same rows")
    assert "Within two paired standard errors of the best, so not told apart by these rows: Other." in note
    assert note.endswith(" No per-row predictions (n/a): Old.")
    far = dict(d, se=0.01)
    assert "Every other row is more than two paired standard errors behind the best." in study.paired_note(
        [("Other", far)])


def test_seconds_left_counts_steps_scored_rows_and_start_up(model_dir, tmp_path):
    p = _planned(model_dir, tmp_path, "new")
    # 10 steps; validation at 4, 8 and 10 (40 rows each); 100 test rows; 5 s to start
    assert study.seconds_left(p, per_step=1.0, per_scored_row=0.01, per_run=5, test_rows=100) == pytest.approx(
        10 + 2.2 + 5)
    assert study.seconds_left(p, per_step=1.0, per_scored_row=0.01, per_run=5, test_rows=100,
                              extra_rows=80) == pytest.approx(10 + 3.0 + 5)
    (tmp_path / "r" / "last").mkdir(parents=True)
    (tmp_path / "r" / "last" / runs.STATE).write_text('{"step": 6}')
    resumed = _planned(model_dir, tmp_path, "resume")
    assert study.seconds_left(resumed, per_step=1.0, per_scored_row=0.01, per_run=5, test_rows=100) == \
        pytest.approx(4 + 2.2 + 5)
    assert study.seconds_left(_planned(model_dir, tmp_path, "done"), per_step=1.0, per_scored_row=0.01, per_run=5,
                              test_rows=100) == 0.0


def test_machine_names_cpu_cores_bf16_and_versions():
    import peft
    import torch
    import transformers

    from agnews_lora.precision import cpu_has_bf16

    m = study.machine()
    assert m.cores == len(os.sched_getaffinity(0)) and m.bf16 == cpu_has_bf16() and m.cpu
    assert (m.torch, m.transformers, m.peft) == (torch.__version__, transformers.__version__, peft.__version__)
    line = str(m)
    assert f"{m.cores} cores (nproc) of {m.cpu}" in line
    assert ("(native bf16)" if m.bf16 else "(no native bf16)") in line
    assert f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}" in line
