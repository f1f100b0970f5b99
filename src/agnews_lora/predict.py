"""Classifier: load a model once, predict texts fast; files in -> `ID,Label` CSV out.

One Classifier serves three kinds of folder behind one `predict_logits`: a run folder written
by `train` (the adapter is merged into the weights in memory), a merged folder and an ONNX
folder written by `export` (see export.py).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from agnews_lora import runs
from agnews_lora.config import Config, ConfigError
from agnews_lora.data import Split, clean_text, pad_batch, read_files, tokenize
from agnews_lora.runs import EXPORT_META, ONNX_FILE, folder_kind  # noqa: F401  (re-exported: export, tests)
from agnews_lora.train import resolve_precision  # moves with the precision work (issue 16, items 3-6)

load_run_config = runs.read_config  # the old name, kept for callers outside the package


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agnews-lora")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


class OnnxModel:
    """An exported ONNX classifier run by ONNX Runtime on CPU; `config` is the transformers config."""

    def __init__(self, path: str | Path, config, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})[0]


class Classifier:
    """A trained model, loaded once, for prediction.

    Example:
        clf = Classifier.load("runs/minilm")          # or an exported merged/ONNX folder
        clf.predict(["Stocks rally as oil falls", "Federer wins in Paris"])  # -> [2, 1]
    """

    def __init__(self, model, tokenizer, cfg: Config, precision: str = "auto", info: dict | None = None):
        """Args:
            model: a torch sequence-classification model (output `.logits`) or an OnnxModel.
            tokenizer: its tokenizer.
            cfg: the run's config (data.max_length is used).
            precision: "auto" (the run's train.precision when it is fp32 or bf16, else bf16
                autocast where the hardware has it), "bf16" or "fp32";
                ignored for ONNX, which computes as exported (fp32, or int8 when quantized).
            info: what the model is (source, format, trainable parameters), for `serve`'s /info.
        """
        self.onnx = isinstance(model, OnnxModel)
        self.model = model if self.onnx else model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device("cpu") if self.onnx else next(model.parameters()).device
        self.info = info or {}
        self.precision = (self.info.get("quantize") or "fp32") if self.onnx else \
            resolve_precision(runs.run_precision(precision, cfg), cpu=self.device.type == "cpu")
        self.label_names = runs.label_names(model.config.num_labels, getattr(model.config, "id2label", None))
        self.num_labels = model.config.num_labels
        self.last_throughput = 0.0

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "best", device: str = "cpu", precision: str = "auto",
             threads: int | None = None, merge: bool = True) -> "Classifier":
        """Load a run folder, a merged folder or an ONNX folder (see `folder_kind`).

        Args:
            path: the folder.
            checkpoint: run folders only: "best" (default) or "last".
            device: torch device (ONNX folders run on CPU).
            precision: "auto" (the run's train.precision when it is fp32 or bf16, else bf16 where
                the hardware has it), "bf16" or "fp32".
            threads: CPU threads for torch / ONNX Runtime; None keeps the library default
                (one per physical core).
            merge: run folders only: merge the adapter into the weights (same logits, faster);
                False keeps the peft model (export compares against it).

        Returns:
            The Classifier.
        """
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads}: must be >= 1 (None: one per physical core)")
        if threads:
            torch.set_num_threads(threads)
        kind = folder_kind(path)
        if kind == "onnx":
            return _load_onnx(Path(path), threads)
        if kind == "merged":
            model, tokenizer, cfg, info = _load_merged(Path(path), device)
        else:
            model, tokenizer, cfg, info = _load_run(Path(path), checkpoint, device, merge)
        clf = cls(model, tokenizer, cfg, precision=precision, info=info)
        if clf.precision == "bf16" and not hasattr(model, "peft_config"):
            from agnews_lora.speed import cast_frozen_linears

            # Bit-identical under autocast, without casting every weight on every batch.
            cast_frozen_linears(model.requires_grad_(False), torch.bfloat16)
        return clf

    def _logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.onnx:
            return self.model.logits(input_ids, attention_mask)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(input_ids=torch.from_numpy(input_ids).to(self.device),
                                attention_mask=torch.from_numpy(attention_mask).to(self.device)).logits
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def predict_logits(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Logits [n, classes] in input order.

        Texts are cleaned and tokenized in one call, then batched longest first, so each batch
        pads to nearly its own length.

        Args:
            texts: raw texts.
            batch_size: texts per model call.
            progress: show a progress bar.

        Returns:
            float32 logits; `last_throughput` is set to texts/s (tokenizing included).
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be >= 1")
        start = time.perf_counter()
        ids = tokenize([clean_text(t) for t in texts], self.tokenizer, self.cfg.data.max_length, cache_dir=None)
        order = np.argsort(-np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)), kind="stable")
        out = np.zeros((len(ids), self.num_labels), dtype=np.float32)
        with tqdm(total=len(ids), disable=not progress, desc="predict", unit="text", dynamic_ncols=True) as bar:
            for s in range(0, len(order), batch_size):
                rows = order[s : s + batch_size]
                out[rows] = self._logits(*pad_batch([ids[i] for i in rows], self.tokenizer.pad_token_id,
                                                     self.cfg.data.pad_to_multiple_of))
                bar.update(len(rows))
        self.last_throughput = len(ids) / max(time.perf_counter() - start, 1e-9)
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[int]:
        """Predicted label ids (0 World, 1 Sports, 2 Business, 3 Sci/Tech)."""
        return self.predict_logits(texts, batch_size).argmax(-1).tolist()

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities [n, classes] (softmax of the logits)."""
        return torch.softmax(torch.from_numpy(self.predict_logits(texts, batch_size)), -1).numpy()


def _run_trainable(run_dir: Path, cfg: Config) -> int:
    summary = runs.read_summary(run_dir)
    if summary and isinstance(summary.get("trainable"), dict) and "total" in summary["trainable"]:
        return int(summary["trainable"]["total"])
    from agnews_lora.model import budget_breakdown

    return budget_breakdown(cfg).total


def _load_run(run_dir: Path, checkpoint: str, device: str, merge: bool):
    from peft import PeftModel

    from agnews_lora.model import build_model, load_tokenizer

    cfg = runs.read_config(run_dir)
    adapter = runs.checkpoint_dir(run_dir, checkpoint)  # never moves files: the trainer may be mid-swap
    try:
        model = PeftModel.from_pretrained(build_model(cfg, device=device, with_lora=False), str(adapter))
    except (OSError, ValueError, RuntimeError) as err:  # a truncated adapter (SafetensorError), bad json
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{adapter}: the run is damaged ({type(err).__name__}: {str(err)[:200]}); "
                          "restore the checkpoint or train again") from None
    if merge:
        model = model.merge_and_unload()
    info = {"source": str(run_dir), "format": "run", "checkpoint": checkpoint, "model": cfg.model.name,
            "head": cfg.model.head, "trainable": _run_trainable(run_dir, cfg)}
    return model, load_tokenizer(cfg.model.name), cfg, info


def _exported_config(folder: Path) -> tuple[Config, dict]:
    """The run's config and what `serve`'s /info shows of an exported model."""
    cfg, meta = runs.exported_config(folder)
    info = {"source": str(folder), "format": meta.get("format", "merged"), "model": meta.get("model", str(folder)),
            "head": meta.get("head"), "trainable": meta.get("trainable"), "quantize": meta.get("quantize")}
    return cfg, info


def _load_merged(folder: Path, device: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, info = _exported_config(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device)
    return model, AutoTokenizer.from_pretrained(folder), cfg, info


def _load_onnx(folder: Path, threads: int | None) -> Classifier:
    from transformers import AutoConfig, AutoTokenizer

    if not (folder / ONNX_FILE).is_file():
        raise ConfigError(f"{folder}: no {ONNX_FILE}; export it again with `agnews-lora export RUN --format onnx`")
    cfg, info = _exported_config(folder)
    model = OnnxModel(folder / ONNX_FILE, AutoConfig.from_pretrained(folder), threads=threads)
    return Classifier(model, AutoTokenizer.from_pretrained(folder), cfg, info=info)


def write_predictions(preds: Sequence[int], output: str | Path) -> None:
    """The competition format: header `ID,Label`, ID = row index of the input."""
    from agnews_lora.checkpoint import atomic_write_text
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ID", "Label"])
    writer.writerows(enumerate(int(p) for p in preds))
    atomic_write_text(Path(output), buf.getvalue())


def check_output(output: str | Path, inputs: Sequence[str | Path] = (), allowed_in: str | Path | None = None) -> None:
    """Refuse, before any work, an output file that would destroy data or could not be written.

    Args:
        output: the file to write.
        inputs: the input files (an output equal to one of them is refused).
        allowed_in: a run or model folder the output may lie in (evaluate's default RUN/eval.json).

    Raises:
        ConfigError: the output is an input, a folder, inside a run or model folder, or not writable.
    """
    import os
    import tempfile

    out = Path(output).expanduser()
    if out.is_dir():
        raise ConfigError(f"output {out}: is a folder; name the file to write")
    resolved = out.resolve()
    for item in inputs:
        if Path(item).expanduser().resolve() == resolved:
            raise ConfigError(f"output {out}: is also an input file; write the output elsewhere")
    folder = runs.is_inside_model_folder(resolved)
    if folder is not None and (allowed_in is None or folder != Path(allowed_in).resolve()):
        raise ConfigError(f"output {out}: lies inside the run or model folder {folder}; writing there could "
                          "break it; write the output elsewhere")
    parent = next(p for p in resolved.parents if p.exists())  # the folder that will hold it (made if missing)
    try:  # a real probe: permission bits say nothing for root or on a read-only mount
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".agnews-lora-probe.")
        os.close(fd)
        os.unlink(probe)
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError(f"{out} is read-only")
    except OSError as err:
        raise ConfigError(f"output {out}: cannot write there ({err.strerror or err}); choose another path") from None


def predict_file(clf: Classifier, inputs: Sequence[str], output: str | Path, batch_size: int = 64,
                 progress: bool = True) -> tuple[Split, list[int]]:
    """Predict every row of the input file(s) and write `ID,Label` to `output` (checked first)."""
    check_output(output, inputs)
    split = read_files(inputs, num_labels=clf.num_labels)
    preds = clf.predict_logits(split.texts, batch_size=batch_size, progress=progress).argmax(-1).tolist()
    write_predictions(preds, output)
    return split, preds
