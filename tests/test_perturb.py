"""Perturbations: deterministic per seed and row, and each does what its name says."""

from __future__ import annotations

import re

import pytest

from agnews_lora.perturb import (PERTURBATIONS, SUITE, Spec, augment_texts, parse_spec, parse_specs,
                                 perturb_texts)

SENTENCE = ("Stocks rallied on Tuesday as oil prices fell for a third day, traders in London said, "
            "while the central bank kept its key rate at 2.5 percent after a long meeting")
WORDS = [f"w{i:03d}" for i in range(60)]  # distinct words: positions can be traced


def texts(n: int = 200) -> list[str]:
    return [f"{SENTENCE} number {i}" for i in range(n)]


def osa_distance(a: str, b: str) -> int:
    """Edit distance with adjacent transpositions (one typo of any kind costs 1)."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


@pytest.mark.parametrize("spec", SUITE, ids=lambda s: s.label)
def test_every_suite_member_is_deterministic_and_row_stable(spec):
    rows = texts(30)
    once = perturb_texts(rows, spec, seed=3)
    assert once == perturb_texts(rows, spec, seed=3)
    # A row perturbs the same way whichever subset it comes in.
    assert perturb_texts(rows[10:], spec, seed=3, rows=range(10, 30)) == once[10:]
    assert all(t.strip() for t in once)


@pytest.mark.parametrize("spec", [Spec("typos", 0.1), Spec("delete_words", 0.3), Spec("shuffle_words", 3.0),
                                  Spec("replace_entities", 1.0)], ids=lambda s: s.label)
def test_random_perturbations_change_with_the_seed(spec):
    rows = texts(20)
    assert perturb_texts(rows, spec, seed=0) != perturb_texts(rows, spec, seed=1)


@pytest.mark.parametrize("rate", [0.03, 0.10])
def test_typo_rate_is_within_tolerance(rate):
    rows = texts(40)
    out = perturb_texts(rows, Spec("typos", rate), seed=0)
    letters = sum(ch.isalpha() for t in rows for ch in t)
    edits = sum(osa_distance(a, b) for a, b in zip(rows, out))
    # Each chosen letter costs one edit, except a swap with an equal neighbour: slightly under `rate`.
    assert 0.8 * rate <= edits / letters <= 1.1 * rate, edits / letters
    assert perturb_texts(rows, Spec("typos", 0.0), seed=0) == rows


def test_typos_leave_non_letters_alone():
    text = "2004 - 17:45 (#39;) ... 3.5%"
    assert perturb_texts([text], Spec("typos", 1.0))[0] == text


def test_delete_words_drops_the_rate_in_order_and_keeps_one():
    text = " ".join(WORDS * 20)
    out = perturb_texts([text], Spec("delete_words", 0.15), seed=0)[0].split()
    assert 0.12 <= 1 - len(out) / len(text.split()) <= 0.18
    it = iter(text.split())
    assert all(w in it for w in out)  # a subsequence: order kept
    assert [len(t.split()) for t in perturb_texts(texts(10), Spec("delete_words", 1.0))] == [1] * 10


@pytest.mark.parametrize("window", [1.0, 3.0, 8.0])
def test_shuffle_moves_no_word_further_than_the_window(window):
    out = perturb_texts([" ".join(WORDS)], Spec("shuffle_words", window), seed=0)[0].split()
    assert sorted(out) == WORDS
    moves = [abs(out.index(w) - i) for i, w in enumerate(WORDS)]
    assert max(moves) <= window
    assert (max(moves) > 0) == (window > 1)  # window 1: U(0, 1) never reorders


def test_casing_is_exact():
    rows = texts(5)
    assert perturb_texts(rows, parse_spec("lowercase")) == [t.lower() for t in rows]
    assert perturb_texts(rows, parse_spec("uppercase")) == [t.upper() for t in rows]


def test_truncate_keeps_exactly_the_first_words():
    rows = texts(5) + ["short text"]
    out = perturb_texts(rows, Spec("truncate_words", 12.0))
    assert out == [" ".join(t.split()[:12]) for t in rows]
    assert out[-1] == "short text"


def test_replace_entities_changes_names_and_numbers_but_not_escapes():
    text = "Shares of Acme rose 12.5% in 2004, Acme said. Reuters reported it#39;s up #36;40."
    out = perturb_texts([text], Spec("replace_entities", 1.0), seed=0)[0]
    assert "Acme" not in out and "#39;s" in out and "#36;" in out
    assert out.startswith("Shares of ")  # a sentence-start word is not a name
    words = out.split()
    assert words[-5] == "Reuters"  # starts a sentence after "said."
    assert words[2] == words[7] != "Acme"  # the same invented name for every occurrence
    digits = lambda s: re.sub(r"#\d+;", "", s)  # noqa: E731
    assert [c.isdigit() for c in digits(out)].count(True) == [c.isdigit() for c in digits(text)].count(True)
    assert digits(out) != digits(text)
    kept = perturb_texts([text], Spec("replace_entities", 0.0), seed=0)[0]
    assert "Acme" in kept and "Reuters" in kept


def test_a_text_that_would_come_out_empty_is_kept():
    # typos at rate 1 drop a quarter of the letters: some one-letter texts vanish
    assert perturb_texts(["a"] * 40, Spec("typos", 1.0)).count("a") >= 1
    assert all(perturb_texts(["a"] * 40, Spec("typos", 1.0)))


def test_parse_spec_defaults_values_and_labels():
    assert parse_spec("typos") == Spec("typos", PERTURBATIONS["typos"].default)
    assert parse_spec(" typos:0.1 ").label == "typos:0.1"
    assert parse_spec("lowercase").label == "lowercase"
    assert [s.label for s in parse_specs(["truncate_words:20", "shuffle_words"])] == \
        ["truncate_words:20", "shuffle_words:3"]
    assert len({s.label for s in SUITE}) == len(SUITE)


@pytest.mark.parametrize("text, message", [
    ("typoz", "unknown perturbation 'typoz'; valid: typos, delete_words, shuffle_words, lowercase"),
    ("typos:lots", "the value after ':' must be a number"),
    ("typos:1.5", "must be in [0, 1]"),
    ("truncate_words:0", "must be >= 1"),
])
def test_parse_spec_errors_name_the_key_and_the_valid_choices(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_spec(text, key="perturbations")
    assert str(err.value).startswith("perturbations: ")


def test_augment_is_deterministic_and_respects_the_probability():
    rows, specs = texts(200), [Spec("lowercase", 0.0), Spec("uppercase", 0.0)]
    out, changed = augment_texts(rows, specs, prob=0.3, seed=5)
    assert (out, changed) == augment_texts(rows, specs, prob=0.3, seed=5)
    assert changed == sum(a != b for a, b in zip(rows, out))
    assert 40 <= changed <= 80
    assert all(b in (a, a.lower(), a.upper()) for a, b in zip(rows, out))
    assert augment_texts(rows, specs, prob=0.0, seed=5) == (rows, 0)
    assert augment_texts(rows, [], prob=1.0, seed=5) == (rows, 0)
