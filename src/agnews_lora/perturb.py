"""Text perturbations: small, seeded functions for the robustness suite and for augmentation.

Each perturbation is `fn(text, rng, value) -> str`, where `rng` is a `random.Random` and
`value` its one parameter (a rate, a window, a word count). `perturb_texts` gives every text
its own generator, seeded from (seed, perturbation, row index), so a row's perturbed text does
not depend on which other rows are perturbed with it, nor on the process (no `hash()`).

The same functions serve `robustness` (a fixed suite, `SUITE`) and training-time augmentation
(`data.augment`, see `parse_specs`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _keyboard_neighbours() -> dict[str, str]:
    """Letter -> the letters beside it and above/below it on a QWERTY keyboard."""
    out = {}
    for r, row in enumerate(_KEYBOARD):
        for c, ch in enumerate(row):
            near = [row[j] for j in (c - 1, c + 1) if 0 <= j < len(row)]
            near += [_KEYBOARD[k][c] for k in (r - 1, r + 1) if 0 <= k < 3 and c < len(_KEYBOARD[k])]
            out[ch] = "".join(near)
    return out


_NEIGHBOURS = _keyboard_neighbours()

# Invented names: the generated half of the hidden file is about entities AG News never saw.
_NAMES = ["Velmora", "Kestrin", "Daxton", "Oriel", "Thandeka", "Zorvath", "Marisol", "Quenby",
          "Ilyasov", "Brannock", "Sefton", "Nakamura-Holt", "Averon", "Castellane", "Juniper",
          "Okonkwo", "Rasmussen", "Tivoli", "Wexford", "Yarrowby"]
_NUMBER = re.compile(r"\d")


def typos(text: str, rng: random.Random, rate: float) -> str:
    """Character noise: each letter, with probability `rate`, is replaced by a keyboard
    neighbour, dropped, doubled, or swapped with the next character (equally likely)."""
    out, chars, i = [], list(text), 0
    while i < len(chars):
        ch = chars[i]
        if not ch.isalpha() or rng.random() >= rate:
            out.append(ch)
            i += 1
            continue
        kind = rng.randrange(4)
        if kind == 0:
            near = _NEIGHBOURS.get(ch.lower()) or "e"
            sub = rng.choice(near)
            out.append(sub.upper() if ch.isupper() else sub)
        elif kind == 2:
            out += [ch, ch]
        elif kind == 3 and i + 1 < len(chars):
            out += [chars[i + 1], ch]
            i += 1
        elif kind == 3:
            out.append(ch)
        i += 1  # kind 1: dropped
    return "".join(out)


def delete_words(text: str, rng: random.Random, rate: float) -> str:
    """Drop each word with probability `rate`; at least one word is kept."""
    words = text.split()
    kept = [w for w in words if rng.random() >= rate]
    return " ".join(kept) if kept else (rng.choice(words) if words else text)


def shuffle_words(text: str, rng: random.Random, window: float) -> str:
    """Local word-order shuffle: sort words by position + U(0, window), so no word moves
    more than `window` places."""
    words = text.split()
    keys = [i + rng.uniform(0, window) for i in range(len(words))]
    return " ".join(w for _, w in sorted(zip(keys, words), key=lambda kw: kw[0]))


def lowercase(text: str, rng: random.Random, value: float = 0.0) -> str:
    """All lower case (the generator argument is unused)."""
    return text.lower()


def uppercase(text: str, rng: random.Random, value: float = 0.0) -> str:
    """All upper case (the generator argument is unused)."""
    return text.upper()


def truncate_words(text: str, rng: random.Random, words: float) -> str:
    """Keep the first `words` words."""
    return " ".join(text.split()[: max(1, int(words))])


def replace_entities(text: str, rng: random.Random, rate: float) -> str:
    """Replace names and numbers: every digit by a random digit, and each capitalized word that
    does not start a sentence (a cheap stand-in for a name) by an invented name with
    probability `rate`, the same name for every occurrence within the text."""
    text = _NUMBER.sub(lambda _: str(rng.randrange(10)), text)
    words, mapping = text.split(), {}
    for i, w in enumerate(words):
        core = w.strip(".,;:!?\"'()")
        sentence_start = i == 0 or words[i - 1].endswith((".", "!", "?"))
        if sentence_start or len(core) < 2 or not core[0].isupper() or not core[1:].islower():
            continue
        if core not in mapping:
            mapping[core] = rng.choice(_NAMES) if rng.random() < rate else core
        words[i] = w.replace(core, mapping[core])
    return " ".join(words)


@dataclass(frozen=True)
class Perturbation:
    fn: Callable[[str, random.Random, float], str]
    default: float  # the value used when a spec names none
    param: str  # what the value means, for help and errors


PERTURBATIONS: dict[str, Perturbation] = {
    "typos": Perturbation(typos, 0.05, "share of letters changed"),
    "delete_words": Perturbation(delete_words, 0.15, "share of words dropped"),
    "shuffle_words": Perturbation(shuffle_words, 3.0, "most places a word moves"),
    "lowercase": Perturbation(lowercase, 0.0, "unused"),
    "uppercase": Perturbation(uppercase, 0.0, "unused"),
    "truncate_words": Perturbation(truncate_words, 12.0, "words kept"),
    "replace_entities": Perturbation(replace_entities, 1.0, "share of names replaced"),
}


@dataclass(frozen=True)
class Spec:
    """One perturbation with its value, written `name` or `name:value` (e.g. `typos:0.1`)."""

    name: str
    value: float

    @property
    def label(self) -> str:
        p = PERTURBATIONS[self.name]
        return self.name if p.param == "unused" else f"{self.name}:{self.value:g}"


# The robustness suite: fixed, so reports of different runs compare row for row.
SUITE: tuple[Spec, ...] = (
    Spec("typos", 0.03), Spec("typos", 0.10), Spec("delete_words", 0.15), Spec("shuffle_words", 3.0),
    Spec("lowercase", 0.0), Spec("uppercase", 0.0), Spec("truncate_words", 12.0),
    Spec("replace_entities", 1.0),
)


def parse_spec(text: str, key: str = "perturbation") -> Spec:
    """`name` or `name:value` -> Spec; unknown names and bad values raise ValueError naming `key`
    and the valid names."""
    name, _, value = str(text).strip().partition(":")
    if name not in PERTURBATIONS:
        raise ValueError(f"{key}: unknown perturbation {name!r}; valid: {', '.join(PERTURBATIONS)}")
    p = PERTURBATIONS[name]
    try:
        v = float(value) if value else p.default
    except ValueError:
        raise ValueError(f"{key}: {text!r}: the value after ':' must be a number ({p.param})") from None
    if name in ("typos", "delete_words", "replace_entities") and not 0 <= v <= 1:
        raise ValueError(f"{key}: {text!r}: {p.param} must be in [0, 1]")
    if name in ("shuffle_words", "truncate_words") and v < 1:
        raise ValueError(f"{key}: {text!r}: {p.param} must be >= 1")
    return Spec(name, v)


def parse_specs(texts: Sequence[str], key: str = "perturbation") -> list[Spec]:
    return [parse_spec(t, key) for t in texts]


def _rng(seed: int, label: str, index: int) -> random.Random:
    # A str seed is hashed with SHA-512 by random.Random: stable across processes.
    return random.Random(f"{seed}:{label}:{index}")


def perturb_texts(texts: Sequence[str], spec: Spec, seed: int = 0, rows: Sequence[int] | None = None) -> list[str]:
    """Apply one perturbation to every text.

    Args:
        texts: the texts.
        spec: which perturbation, with its value.
        seed: the suite's or the epoch's seed.
        rows: each text's row index for its generator (default 0..n-1), so a row perturbs the
            same way whichever subset it comes in.

    Returns:
        The perturbed texts, in order; a text that would come out empty is kept as it was.
    """
    fn, rows = PERTURBATIONS[spec.name].fn, range(len(texts)) if rows is None else rows
    out = []
    for text, row in zip(texts, rows):
        new = fn(text, _rng(seed, spec.label, row), spec.value)
        out.append(new if new.strip() else text)
    return out


def augment_texts(texts: Sequence[str], specs: Sequence[Spec], prob: float, seed: int) -> tuple[list[str], int]:
    """Training-time augmentation: each text, with probability `prob`, is replaced by one of
    `specs` (chosen uniformly) applied to it. Deterministic for (texts, specs, prob, seed).

    Returns:
        The new texts and how many were perturbed.
    """
    if not specs or prob <= 0:
        return list(texts), 0
    out, changed = list(texts), 0
    for i, text in enumerate(texts):
        pick = _rng(seed, "augment", i)
        if pick.random() >= prob:
            continue
        spec = specs[pick.randrange(len(specs))]
        out[i] = perturb_texts([text], spec, seed=seed, rows=[i])[0]
        changed += 1
    return out, changed
