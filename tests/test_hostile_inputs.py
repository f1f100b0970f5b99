"""Hostile inputs (issue 24): a refused value, an unchanged prediction or an escaped string, never a
silent wrong answer or a traceback. One test (or group) per item; item numbers in the names."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from agnews_lora import shift
from agnews_lora.calibration import MIN_BATCH_ROWS, batch_prior, parse_prior, softmax
from agnews_lora.cli import main
from agnews_lora.errors import ConfigError, DataError
from agnews_lora.data import read_file
from agnews_lora.predict import Classifier

NON_FINITE = ("nan,nan,nan,nan", "inf,1,1,1", "0.25,0.25,0.25,1e309", "-inf,1,1,1")


@pytest.fixture(scope="module")
def clf(tiny_run) -> Classifier:
    return Classifier.load(tiny_run, precision="fp32")


def _labels(path: Path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(row[1]) for row in list(csv.reader(fh))[1:]]


def _predict(run: Path, inputs: list[Path], output: Path, *extra: str) -> None:
    main(["predict", str(run), "--input", *map(str, inputs), "--output", str(output), "--precision", "fp32",
          *extra])


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# ---------------------------------------------------------------- 8: non-finite priors


@pytest.mark.parametrize("prior", NON_FINITE)
def test_8_parse_prior_refuses_non_finite_shares_naming_the_value(prior):
    bad = next(v for v in prior.split(",") if not np.isfinite(float(v)))
    with pytest.raises(ConfigError, match=rf"prior '{prior}'.*{bad!r} is not a finite number"):
        parse_prior(prior, 4)
    with pytest.raises(ConfigError, match="not a finite number"):
        parse_prior([float(v) for v in prior.split(",")], 4)


def test_8_huge_finite_shares_stay_finite_and_normalized():
    np.testing.assert_allclose(parse_prior("1e308,1e308,1e308,1e308", 4), [0.25] * 4)
    np.testing.assert_allclose(parse_prior([2, 1, 1, 0], 4), [0.5, 0.25, 0.25, 0.0])


def test_8_non_finite_prior_is_refused_by_predict_serve_config_and_the_api(tiny_run, clf, ag_files, tmp_path,
                                                                           capsys):
    from agnews_lora.config import load_config
    from agnews_lora.serve import create_app

    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as exit_:
        _predict(tiny_run, [ag_files["test"]], out, "--prior", "nan,nan,nan,nan")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "prior 'nan,nan,nan,nan'" in err and "'nan' is not a finite number" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="not a finite number"):
        create_app(clf, prior="1e309,1,1,1")
    with pytest.raises(ConfigError, match=r"predict\.prior.*not a finite number"):
        load_config(overrides=["predict.prior=nan,nan,nan,nan"])
    with pytest.raises(ConfigError, match="not a finite number"):
        clf.probabilities(np.zeros((2, 4)), prior=[float("nan")] * 4)


def test_8_cli_message_names_the_value(tiny_run, ag_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _predict(tiny_run, [ag_files["test"]], tmp_path / "p.csv", "--prior", "inf,1,1,1")
    err = capsys.readouterr().err
    assert "error: prior 'inf,1,1,1'" in err and "'inf' is not a finite number" in err and "Traceback" not in err


# ---------------------------------------------------------------- 10: batch priors on small batches


@pytest.mark.parametrize("prior", ["em", "match", "match-shifted"])
def test_10_batch_priors_leave_a_small_batch_unchanged_with_a_note(clf, ag_files, prior):
    texts = read_file(ag_files["test"]).texts
    for n in (1, 4, MIN_BATCH_ROWS - 1):
        logits = clf.predict_logits(texts[:n])
        got = clf.probabilities(logits, prior=prior, texts=texts[:n], reference=["never read"])
        np.testing.assert_allclose(got, clf.probabilities(logits), atol=1e-7)
        assert clf.last_prior["prior"] == prior and clf.last_prior["rows"] == n
        assert f"{n} rows" in clf.last_prior["skipped"] and f"(< {MIN_BATCH_ROWS})" in clf.last_prior["skipped"]


def test_10_batch_priors_still_apply_from_the_minimum_on(clf, ag_files):
    logits = clf.predict_logits(read_file(ag_files["test"]).texts[:MIN_BATCH_ROWS])
    for prior in ("em", "match"):
        got = clf.probabilities(logits, prior=prior)
        assert "skipped" not in clf.last_prior and not np.allclose(got, clf.probabilities(logits), atol=1e-4)
    assert clf.last_prior["weights"] is not None


def test_10_batch_prior_and_match_shifted_texts_unit():
    probs = softmax(np.random.default_rng(0).normal(size=(3, 4)))
    for prior in ("em", "match"):
        out, info = batch_prior(probs, prior, [0.7, 0.1, 0.1, 0.1])
        np.testing.assert_array_equal(out, probs)
        assert "too few" in info["skipped"]

    def reference():
        raise AssertionError("a batch too small to match must not read the reference")

    out, info = shift.match_shifted_texts(probs, ["a", "b", "c"], reference=reference, prior=[0.25] * 4)
    np.testing.assert_array_equal(out, probs)
    assert info["weights"] is None and "3 rows in the batch" in info["skipped"]


def test_10_robust_preset_on_a_one_row_file_predicts_as_without_prior(tiny_run, ag_files, tmp_path, capsys):
    one = _jsonl(tmp_path / "one.jsonl", read_file(ag_files["test"]).texts[:1])
    plain = tmp_path / "plain.csv"
    _predict(tiny_run, [one], plain)
    for prior in ("em", "match", "match-shifted"):
        out = tmp_path / f"{prior}.csv"
        _predict(tiny_run, [one], out, "--prior", prior, "--probs")
        assert _labels(out) == _labels(plain)
    assert "too few" in capsys.readouterr().out  # match-shifted's note


# ---------------------------------------------------------------- 11: unterminated CSV quotes


@pytest.mark.parametrize("body, line, says", [
    ('3,"Wall St.","Stocks rise"\n1,"Open title,desc of row two\n2,"Sports","Team wins"\n', 2, "runs on to line 3"),
    ('3,"Wall St.","Stocks rise"\n2,"Sports","Team wins"\n1,"Open title,desc\n4,"Tech","Chips"\n', 3, "runs on"),
    ('3,"Wall St.","Stocks rise"\n2,"Sports","Team wins"\n1,"Title","never closed\n', 3, "never closed"),
    ('text,label\nfirst row,0\n"an open quote,1\nthird row,2\nfourth row,3\n', 3, "never closed"),
])
def test_11_an_unterminated_quote_is_refused_at_the_line_it_opened(tmp_path, body, line, says):
    path = tmp_path / "quotes.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}: line {line}: a quoted field opens here.*{says}"):
        read_file(path)


def test_11_sound_quoting_still_reads(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('text,label\n"two\nlines, and ""quotes""",0\nplain,1\n', encoding="utf-8")
    assert read_file(path).texts == ['two lines, and "quotes"', "plain"]


# ---------------------------------------------------------------- 17: surrogates, seeds, references


def test_17_a_lone_surrogate_is_refused_in_every_format(tmp_path):
    jsonl = _jsonl(tmp_path / "s.jsonl", ["fine text", "broken \ud800 text"])
    pkl = tmp_path / "s.pkl"
    pkl.write_bytes(pickle.dumps({"text": ["fine text", "also fine", "cut \udc00"]}))
    for path, row in ((jsonl, 2), (pkl, 3)):
        with pytest.raises(DataError, match=rf"{path}: row {row}: text holds a lone surrogate"):
            read_file(path)
    csv_path = tmp_path / "s.csv"  # CSV bytes cannot hold one: invalid UTF-8, refused the same way
    csv_path.write_bytes(b"text\nbroken \xed\xa0\x80 text\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_file(csv_path)
    assert read_file(_jsonl(tmp_path / "e.jsonl", ["emoji \U0001F600 ok"])).texts == ["emoji \U0001F600 ok"]


def test_17_surrogate_in_predict_and_robustness_is_a_message(tiny_run, tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", ["fine text", "broken \ud800 text"])
    with pytest.raises(SystemExit) as exit_:
        _predict(tiny_run, [bad], tmp_path / "p.csv")
    assert exit_.value.code == 2 and "row 2: text holds a lone surrogate" in capsys.readouterr().err
    from agnews_lora.robustness import robustness_report

    with pytest.raises(DataError, match="row 2: text holds a lone surrogate"):
        robustness_report(tiny_run, unlabelled=[str(bad)], output=tmp_path / "rob", max_rows=8)


def test_17_negative_seed_is_refused(tiny_run, tmp_path, capsys):
    from agnews_lora.robustness import robustness_report

    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=rf"seed must be an integer in 0\.\.{2**32 - 1}, got {seed}"):
            robustness_report(tiny_run, output=tmp_path / "rob", max_rows=8, seed=seed)
    with pytest.raises(SystemExit) as exit_:
        main(["robustness", str(tiny_run), "--output", str(tmp_path / "rob"), "--max-rows", "8", "--seed", "-1"])
    assert exit_.value.code == 2 and "seed must be" in capsys.readouterr().err
    assert not (tmp_path / "rob" / "robustness.json").exists()


def test_17_reference_without_usable_words_is_a_clear_error(tiny_run, ag_files, tmp_path, capsys):
    texts = read_file(ag_files["test"]).texts
    words = ["!!", "?? !", "- -", "...", "a b c", "x", "§", "%%"]
    with pytest.raises(DataError, match=r"reference texts \(8 rows\).*no usable word.*give texts of the training"):
        shift.check_reference(words)
    with pytest.raises(DataError, match=r"reference texts \(8 rows\).*no usable word"):
        shift.shift_scores(words, texts)
    with pytest.raises(DataError, match=r"reference texts \(8 rows\).*no usable word"):  # empty vocabulary
        shift.shift_scores(words, ["?"] * 10)
    ref = tmp_path / "ref.csv"
    ref.write_text("text\n" + "".join(f"{w}\n" for w in words), encoding="utf-8")
    out = tmp_path / "p.csv"
    with pytest.raises(SystemExit) as exit_:
        _predict(tiny_run, [ag_files["test"]], out, "--prior", "match-shifted", "--reference", str(ref))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "reference texts (8 rows)" in err and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------- 18: the model card


@pytest.mark.parametrize("name", ["<img src=x onerror=alert(1)>", "run\n## Injected: test accuracy 0.99\n\nx",
                                  "a`b | c [link](javascript:alert(1))"])
def test_18_user_strings_in_the_card_are_inert(tiny_run, tmp_path, name):
    from huggingface_hub import ModelCard

    from agnews_lora.card import build_card, hub_id, inert

    run = tmp_path / name
    shutil.copytree(tiny_run, run)
    text = str(build_card(run))
    body = text.split("\n---\n", 1)[1]
    assert "<img" not in text and "onerror=alert(1)>" not in body.replace("&gt;", "")
    assert not any(line.startswith("## Injected") for line in text.splitlines())
    assert "](javascript" not in text and "`b |" not in text
    assert f"# agnews-lora: {inert(name)}" in body
    card = ModelCard(text)  # the YAML front matter still parses, one line of name
    assert card.data.model_name == f"agnews-lora {inert(name)}" and "\n" not in card.data.model_name
    assert hub_id("roberta-base\n## x") is None and hub_id("roberta-base") == "roberta-base"


def test_18_inert_escapes_html_and_collapses_newlines():
    from agnews_lora.card import inert

    assert inert("<b>x</b> & y") == "&lt;b&gt;x&lt;/b&gt; &amp; y"
    assert inert("a\n\n## b\r\nc\td") == "a ## b c d"
    assert inert("plain-name_v2.1/run") == "plain-name_v2.1/run"
