"""Classifier: load a run once, predict texts fast; files in -> `ID,Label` CSV out."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from agnews_lora.config import Config, ConfigError, config_from_dict
from agnews_lora.data import LABEL_NAMES, Split, clean_text, make_collate, read_files, tokenize
from agnews_lora.train import resolve_precision


def load_run_config(run_dir: str | Path) -> Config:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml); pass the folder `train` wrote")
    return config_from_dict(yaml.safe_load(path.read_text()))


class Classifier:
    """A trained run, loaded once, for prediction.

    Example:
        clf = Classifier.load("runs/minilm")
        clf.predict(["Stocks rally as oil falls", "Federer wins in Paris"])  # -> [2, 1]
    """

    def __init__(self, model, tokenizer, cfg: Config, precision: str = "auto"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, cpu=self.device.type == "cpu")
        self.label_names = [model.config.id2label[i] for i in range(model.config.num_labels)] \
            if model.config.num_labels != len(LABEL_NAMES) else list(LABEL_NAMES)
        self.last_throughput = 0.0

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str = "best", device: str = "cpu",
             precision: str = "auto") -> "Classifier":
        """Load `run_dir/checkpoint` with plain peft on the backbone the run names.

        Args:
            run_dir: a run folder written by `train`.
            checkpoint: "best" (default) or "last".
            device: torch device.
            precision: "auto" (bf16 where the hardware has it), "bf16" or "fp32".
        """
        from peft import PeftModel

        from agnews_lora.model import build_model, load_tokenizer

        cfg = load_run_config(run_dir)
        adapter = Path(run_dir) / checkpoint
        if not (adapter / "adapter_model.safetensors").is_file():
            raise ConfigError(f"{adapter}: no adapter_model.safetensors; did training finish an evaluation?")
        base = build_model(cfg, device=device, with_lora=False)
        model = PeftModel.from_pretrained(base, str(adapter))
        return cls(model, load_tokenizer(cfg.model.name), cfg, precision=precision)

    @torch.inference_mode()
    def predict_logits(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Logits [n, classes] in input order; batches are formed from length-sorted texts."""
        from tqdm.auto import tqdm

        cleaned = [clean_text(t) for t in texts]
        ids = tokenize(cleaned, self.tokenizer, self.cfg.data.max_length, cache_dir=None)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), self.model.config.num_labels), dtype=np.float32)
        collate = make_collate(self.tokenizer.pad_token_id)
        use_bf16 = self.precision == "bf16"
        start = time.perf_counter()
        for s in tqdm(range(0, len(order), batch_size), disable=not progress, desc="predict"):
            rows = order[s : s + batch_size]
            batch = collate([(ids[i], -100, i) for i in rows])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = self.model(input_ids=batch["input_ids"].to(self.device),
                                    attention_mask=batch["attention_mask"].to(self.device)).logits
            out[rows] = logits.float().cpu().numpy()
        self.last_throughput = len(ids) / max(time.perf_counter() - start, 1e-9)
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[int]:
        """Predicted label ids (0 World, 1 Sports, 2 Business, 3 Sci/Tech)."""
        return self.predict_logits(texts, batch_size).argmax(-1).tolist()

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.predict_logits(texts, batch_size)), -1).numpy()


def write_predictions(preds: Sequence[int], output: str | Path) -> None:
    """The competition format: header `ID,Label`, ID = row index of the input."""
    from agnews_lora.checkpoint import atomic_write_text
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ID", "Label"])
    writer.writerows(enumerate(int(p) for p in preds))
    atomic_write_text(Path(output), buf.getvalue())


def predict_file(clf: Classifier, inputs: Sequence[str], output: str | Path, batch_size: int = 64,
                 progress: bool = True) -> tuple[Split, list[int]]:
    """Predict every row of the input file(s) and write `ID,Label` to `output`."""
    split = read_files(inputs, num_labels=clf.model.config.num_labels)
    preds = clf.predict_logits(split.texts, batch_size=batch_size, progress=progress).argmax(-1).tolist()
    write_predictions(preds, output)
    return split, preds
