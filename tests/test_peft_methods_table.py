"""experiments/peft_methods.py on the tiny model: the plan (sizes, exact counts, a row that cannot
run), the table and plot from real runs, skipping finished rows, resuming, and refusals."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("peft_methods", ROOT / "experiments" / "peft_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peft_methods"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pm = _load_script()

# the rows train in this process (conftest.run_child_in_process), one thread each
pytestmark = pytest.mark.usefixtures("rows_in_process")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, ag_files, tmp_path_factory) -> dict:
    from transformers import MPNetConfig

    base = tmp_path_factory.mktemp("peft_methods")
    mpnet = base / "mpnet"  # shapes only: the dry run counts on the meta device
    MPNetConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=130).save_pretrained(mpnet)
    args = ["--out", str(base / "runs"), "--table", str(base / "docs" / "table.md"), "--minilm-dir", str(tiny_model_dir),
            "--mpnet-dir", str(mpnet), "--steps", "4", "--batch-size", "8", "--max-length", "48", "--val-size", "40",
            "--set", f"data.train={ag_files['train']}", "--set", f"data.test={ag_files['test']}",
            "--set", f"data.cache_dir={base / 'cache'}", "--set", "train.precision=fp32",
            "--set", "budget.max_trainable=30000"]
    return {"args": args, "out": base / "runs", "table": base / "docs" / "table.md"}


def test_dry_run_plans_every_row_with_exact_counts(setup, capsys):
    assert pm.main(setup["args"] + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    # hidden 32, 2 layers, linear head 132; every projection: 4 x 64 + 2 x 96 per layer and unit of rank
    expected = {"minilm-lora": ("r=33", 2 * 448 * 33 + 132),  # (30,000 - 132) // 896
                "minilm-loha": ("r=16", 2 * 2 * 448 * 16 + 132),  # twice LoRA's factors
                "minilm-vera": ("r=256", 2 * (4 * (32 + 256) + (64 + 256) + (32 + 256)) + 132),  # lambda_b + lambda_d
                "minilm-ia3": ("-", 2 * (4 * 32 + 64 + 64) + 132),  # ffn_out scales its 64 inputs
                "minilm-prompt": ("num_virtual_tokens=32", 32 * 32 + 132),  # capped for time
                "minilm-bitfit": ("-", 2 * 288 + 32 + 132)}
    for row, (size, count) in expected.items():
        assert re.search(rf"^  {row}\s+{re.escape(size)}\s+{count:,}\s+new\s", out, re.M), (row, out)
    assert re.search(r"^  mpnet-prefix\s+-\s+-\s+unsupported\s.*mpnet's attention takes no past keys", out, re.M)
    assert "capped for time (the budget allows" in out and "agnews-lora train name=minilm-lora" in out
    assert not setup["out"].exists()  # nothing trained, no folders made


def test_over_budget_and_unknown_names_are_refused(setup, capsys):
    assert pm.main(setup["args"] + ["--methods", "bitfit", "--set", "budget.max_trainable=500", "--dry-run"]) == 2
    assert "row minilm-bitfit" in capsys.readouterr().err
    assert pm.main(setup["args"] + ["--methods", "lora,nope", "--dry-run"]) == 2
    assert "--methods: unknown nope" in capsys.readouterr().err
    assert not setup["out"].exists()


@pytest.fixture(scope="module")
def first_run(setup):
    assert pm.main(setup["args"] + ["--backbones", "minilm", "--methods", "prompt,bitfit"]) == 0  # two children
    return setup


def _cells(md: str, start: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip().strip("*") for c in line.strip("|").split("|")]


def _best_and_other(out: Path) -> tuple[str, str]:
    acc = {m: json.loads((out / f"minilm-{m}" / "summary.json").read_text())["test_accuracy"] for m in ("bitfit", "prompt")}
    best = max(acc, key=acc.get)  # equal: the first folder by name (bitfit), as the table picks
    return best, next(m for m in acc if m != best)


def test_table_holds_the_runs_numbers(first_run):
    out, md = first_run["out"], first_run["table"].read_text()
    s = json.loads((out / "minilm-prompt" / "summary.json").read_text())
    record = json.loads((out / "minilm-prompt" / pm.ROW_FILE).read_text())
    cells = _cells(md, "| **Prompt tuning** |" if _best_and_other(out)[0] == "prompt" else "| Prompt tuning |")
    assert cells[1] == "num_virtual_tokens=32" and cells[2] == f"{s['trainable']['total']:,}" == "1,156"
    assert cells[3] == f"{100 * s['best_val_accuracy']:.2f}%" and cells[4] == f"{100 * s['test_accuracy']:.2f}%"
    assert cells[7] == f"{s['train_seconds'] / s['steps']:.2f} s"
    assert cells[8] == f"{record['peak_rss_mb']:,.0f} MB" and record["peak_rss_mb"] > 100
    assert "4 optimizer steps of batch 8 over 32 training rows" in md and "all 120 test rows" in md
    assert "Best test accuracy on minilm:" in md and "](table.png)" in md
    assert first_run["table"].with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_row_is_compared_with_the_best_on_the_same_rows(first_run, capsys):
    """The paired column comes from the rows' test_predictions.npz; a row trained before that file
    existed is scored again at the end of the next call, to the same figures."""
    from agnews_lora import runs
    from agnews_lora.evaluate import paired_difference
    from agnews_lora.methods import NAMES

    out, table = first_run["out"], first_run["table"]
    best, other = _best_and_other(out)
    a = runs.read_predictions(out / f"minilm-{other}" / runs.TEST_PREDICTIONS)
    b = runs.read_predictions(out / f"minilm-{best}" / runs.TEST_PREDICTIONS)
    d = paired_difference(a["labels"], a["preds"], b["preds"])
    expected = f"{100 * d['difference']:+.2f} ± {100 * d['se']:.2f}"
    assert _cells(table.read_text(), f"| {NAMES[other]} |")[5] == expected
    assert _cells(table.read_text(), f"| **{NAMES[best]}** |")[5] == "-"
    assert "vs best (paired): test accuracy minus the best's on the same rows" in table.read_text()

    (out / f"minilm-{other}" / runs.TEST_PREDICTIONS).unlink()  # as if trained before the file existed
    assert pm.main(["--table-only", *first_run["args"]]) == 0  # --table-only scores nothing
    assert _cells(table.read_text(), f"| {NAMES[other]} |")[5] == "n/a"
    assert f"No per-row predictions (n/a): {NAMES[other]}." in table.read_text()
    capsys.readouterr()
    assert pm.main(first_run["args"] + ["--backbones", "minilm", "--methods", "prompt,bitfit"]) == 0
    printed = capsys.readouterr().out
    assert f"minilm-{other}: scoring best/ on its test rows again" in printed and "rows differ" not in printed
    again = runs.read_predictions(out / f"minilm-{other}" / runs.TEST_PREDICTIONS)
    assert again["preds"].tolist() == a["preds"].tolist() and again["labels"].tolist() == a["labels"].tolist()
    assert _cells(table.read_text(), f"| {NAMES[other]} |")[5] == expected


def test_second_invocation_skips_finished_rows_and_resumes_an_interrupted_one(first_run, capsys):
    args = first_run["args"] + ["--backbones", "minilm", "--methods", "prompt"]
    run = first_run["out"] / "minilm-prompt"
    capsys.readouterr()
    assert pm.main(args) == 0
    assert "minilm-prompt (1,156 trainable): finished earlier, not rerun" in capsys.readouterr().out
    before = json.loads((run / "summary.json").read_text())
    logged = (run / "train_log.jsonl").read_text()
    (run / "summary.json").unlink()  # as if killed while scoring the test split
    assert pm.main(args) == 0
    assert "minilm-prompt (1,156 trainable): resuming from" in capsys.readouterr().out
    after = json.loads((run / "summary.json").read_text())
    assert (run / "train_log.jsonl").read_text() == logged  # no step trained again
    assert (after["steps"], after["test_accuracy"]) == (before["steps"], before["test_accuracy"])
    assert json.loads((run / pm.ROW_FILE).read_text())["resumed"] is True


def test_changed_settings_are_refused_for_finished_rows(first_run, capsys):
    assert pm.main(first_run["args"] + ["--backbones", "minilm", "--methods", "prompt", "--lr", "prompt=0.1",
                                        "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "row minilm-prompt" in err and "train.lr: 0.03 there, 0.1 now" in err


def test_close_marks_get_labels_on_different_sides():
    """DoRA and LoRA at nearly the same count and accuracy: their labels must not overlap; a lone
    mark keeps the default right-above place."""
    sides = pm.label_offsets([(976_132, 0.8983), (996_868, 0.8982), (29_188, 0.8900)])
    assert sides[0] != sides[1]
    assert sides[2] == (4, 3, "left")
    # MPNet's DoRA (left, higher) and LoRA (right, lower): each label on its own side, away from the
    # other mark, so neither name sits beside the wrong mark
    dora, lora = pm.label_offsets([(915_460, 0.8960), (998_404, 0.8935), (27_652, 0.8900), (999_556, 0.8250)])[:2]
    assert dora[0] < 0 and dora[2] == "right" and dora[1] > 0  # left of its mark, above
    assert lora[0] > 0 and lora[2] == "left" and lora[1] < 0  # right of its mark, below
    same = pm.label_offsets([(1000, 0.5), (1000, 0.5), (10, 0.1)])
    assert same[0] != same[1]


def test_test_rows_draw_is_stratified_fixed_and_checked(tmp_path):
    """--test-rows N: a stratified, seeded draw of N test rows, written once and reused; a file that
    no longer matches the draw is refused instead of silently scoring other rows."""
    import csv

    from agnews_lora.config import ConfigError
    from agnews_lora.data import read_file

    full = tmp_path / "test.csv"
    with open(full, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([f"news item {i}", i % 4] for i in range(200))
    out = tmp_path / "out"
    assert pm.test_file(full, 0, out) == full
    path = pm.test_file(full, 40, out)
    drawn = read_file(path)
    assert path.name == "test_40.csv" and len(drawn) == 40
    assert sorted(drawn.labels) == sorted([0, 1, 2, 3] * 10)  # stratified: 10 per class
    assert set(drawn.texts) <= {f"news item {i}" for i in range(200)}
    before = path.read_text()
    assert pm.test_file(full, 40, out) == path and path.read_text() == before  # same draw on reuse
    path.write_text(before.replace("news item", "other item", 1))
    with pytest.raises(ConfigError, match="differs from a fresh draw"):
        pm.test_file(full, 40, out)
    with pytest.raises(ConfigError, match="has only 200 rows"):
        pm.test_file(full, 200, out)


def test_table_names_a_test_rows_draw():
    from types import SimpleNamespace

    def run(path, n):
        return SimpleNamespace(test={"n": n}, cfg=SimpleNamespace(data=SimpleNamespace(test=[path])))

    assert pm._test_rows_text(run("/x/test.csv.gz", 7600)) == "all 7,600 test rows"
    assert pm._test_rows_text(run("/x/out/test_2000.csv", 2000)).startswith(
        "a stratified draw (seed 42) of 2,000 of the 7,600 test rows (`--test-rows 2000`")
