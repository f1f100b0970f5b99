"""The shift levers' training-time data: per-epoch augmented training texts (`data.augment`) and
the validation rows under the robustness suite (`train.select=perturbed_val_accuracy`).

`tok` below is the run's tokenizing function (a Split -> token ids, through the token cache), so
these rows are tokenized exactly as the run's own splits are.
"""

from __future__ import annotations

import numpy as np

from agnews_lora.config import Config
from agnews_lora.data import Split, make_loader
from agnews_lora.perturb import SUITE, augment_texts, parse_specs, perturb_texts


def perturbed_val_loader(cfg: Config, val_split, tok, pad: int) -> tuple:
    """The validation rows under every perturbation of the robustness suite, as one loader.

    Returns:
        (the loader, not yet prepared by the accelerator; the labels in its row order).
    """
    texts, labels = [], []
    for spec in SUITE:
        texts += perturb_texts(val_split.texts, spec, seed=cfg.train.seed)
        labels += val_split.labels
    ids = tok(Split(texts, labels))
    loader = make_loader(ids, labels, cfg.train.eval_batch_size, pad_id=pad, shuffle=False,
                         pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    return loader, labels


class Augmenter:
    """Per-epoch training texts under `data.augment`: epoch e perturbs a seeded share of the rows
    (seed train.seed + e), re-tokenizes them and swaps them into the training dataset and its
    sampler's lengths. Validation and test rows are never touched."""

    def __init__(self, cfg: Config, texts: list[str], dataset, sampler, tok):
        self.specs = parse_specs(cfg.data.augment, key="data.augment")
        self.prob, self.seed = cfg.data.augment_prob, cfg.train.seed
        self.texts, self.dataset, self.sampler, self.tok = texts, dataset, sampler, tok
        self.changed = 0

    def __bool__(self) -> bool:
        return bool(self.specs) and self.prob > 0

    def set_epoch(self, epoch: int) -> None:
        texts, self.changed = augment_texts(self.texts, self.specs, prob=self.prob, seed=self.seed + epoch)
        self.dataset.ids = self.tok(Split(texts, None))
        self.dataset.lengths = np.fromiter((len(x) for x in self.dataset.ids), dtype=np.int64,
                                           count=len(self.dataset.ids))
        self.sampler.lengths = self.dataset.lengths
