"""Export a run: a merged transformers folder, or ONNX (fp32 or int8), each checked at export time.

Every export folder holds the model, its tokenizer, the run's `config.yaml`, `agnews_lora.json`
(format, labels, max_length, where it came from) and `parity.json`: the exported model against
the PyTorch peft model (fp32) on a sample of texts. An export that misses the tolerances below
raises ParityError and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agnews_lora.card import write_export_card
from agnews_lora.errors import ConfigError, ParityError
from agnews_lora.checkpoint import atomic_write_json, replace_dir
from agnews_lora.config import Config
from agnews_lora.data import Columns, DataError, read_files
from agnews_lora.methods import merge
from agnews_lora.model import quiet_logger
from agnews_lora.predict import Classifier, package_version
from agnews_lora.outputs import claim_folder, remove_stale
from agnews_lora.runs import EXPORTS, ONNX_FILE, PARITY, folder_kind, write_config, write_export_meta, write_marker
from agnews_lora.extras import require
from agnews_lora.methods import MERGEABLE, NAMES
from agnews_lora.runs import checkpoint_dir, read_config

FORMATS = ("merged", "onnx")
QUANTIZE = ("int8",)
OPSET = 18
MIN_LABEL_AGREEMENT = 0.99
# Largest |logit difference| allowed against the PyTorch peft model, fp32. Merging only
# reorders the LoRA sums (x@W + s*(x@A)@B vs x@(W + s*B@A)) and ONNX Runtime only fuses kernels:
# both stay near float32 rounding (runs/cpu-minilm, MiniLM stand-in, 1,008 texts, logits up to
# ~6: merged 4.8e-6, ONNX 6.7e-6). Dynamic int8 quantization rounds weights and activations to
# 256 levels, so its logits move by tenths (0.53 there): 1.0 catches a broken quantization, and
# the label agreement is what guards accuracy.
TOLERANCES = {"merged": 1e-4, "onnx": 1e-4, "onnx-int8": 1.0}

# Used when the run's data files are not readable, and always appended: they reach the longest
# (truncated) and shortest inputs, which a sample of news rows may not.
SAMPLE_TEXTS = [
    "Stocks rallied on Wall Street as oil prices fell for a third day.",
    "Federer beats Nadal in five sets to reach the final in Paris.",
    "The central bank left interest rates unchanged, citing slower growth.",
    "NASA's new telescope sends back its first images of distant galaxies.",
    "Rebels and government troops agree to a ceasefire after weeks of fighting.",
    "Chipmaker unveils a faster processor for laptops and phones.",
    "Hi",
    " ".join(["Officials said the talks would continue next week in Geneva."] * 40),
]




def default_output(run_dir: str | Path, fmt: str, quantize: str | None = None) -> Path:
    """`RUN_DIR/export/merged`, `RUN_DIR/export/onnx` or `RUN_DIR/export/onnx-int8`."""
    return Path(run_dir) / EXPORTS / (f"{fmt}-{quantize}" if quantize else fmt)


def export(run_dir: str | Path, fmt: str, output: str | Path | None = None, quantize: str | None = None,
           checkpoint: str = "best", parity_rows: int = 1000) -> Path:
    """Export a run's checkpoint and check it against the PyTorch model.

    Args:
        run_dir: a run folder written by `train`.
        fmt: "merged" (plain transformers folder) or "onnx".
        output: destination folder: new, empty, or an earlier export (replaced; outputs.claim_folder);
            default `default_output(run_dir, fmt, quantize)`.
        quantize: None, or "int8" (ONNX only: dynamic quantization, int8 weights).
        checkpoint: "best" or "last".
        parity_rows: rows of the run's test data (else train data) checked, besides SAMPLE_TEXTS.

    Returns:
        The export folder, holding parity.json.

    Raises:
        ConfigError: a wrong option, or a merged export of a model.head=linear run.
        ParityError: the export misses the tolerances.
        OutputRefused: `output` is a file, the run, a checkpoint, or a folder the tool did not write.
    """
    _check_options(run_dir, fmt=fmt, quantize=quantize, parity_rows=parity_rows)
    _check_mergeable(run_dir, fmt=fmt, checkpoint=checkpoint)
    dest = claim_folder(output if output else default_output(run_dir, fmt, quantize), kind="export",
                        label="export --output", owner=run_dir, owned=(f"{EXPORTS}/*",))
    remove_stale(dest)  # what a killed export left beside it
    reference = Classifier.load(run_dir, checkpoint=checkpoint, precision="fp32", merge=False)
    if fmt == "merged" and reference.cfg.model.head == "linear":
        raise ConfigError(
            f"{run_dir}: model.head=linear has no plain transformers equivalent (the native RoBERTa and "
            "BERT heads apply a dense layer and tanh before the output layer), so a merged folder could "
            "not reproduce its logits. Use `export --format onnx` (exact), or predict/serve the run folder.")
    texts, source = parity_sample(reference.cfg, parity_rows)
    expected = reference.predict_logits(texts, batch_size=32)
    name = f"{fmt}-{quantize}" if quantize else fmt

    def build(tmp: Path) -> None:
        write_model(reference, tmp, fmt=fmt, quantize=quantize)
        meta = export_metadata(reference, fmt=fmt, quantize=quantize, run_dir=run_dir, checkpoint=checkpoint)
        write_export_meta(tmp, meta)
        write_marker(tmp, "export")
        write_export_card(tmp, run_dir, meta)
        got = Classifier.load(tmp, precision="fp32").predict_logits(texts, batch_size=32)
        parity = check_parity(expected, got, tolerance=TOLERANCES[name], name=name)
        atomic_write_json(tmp / PARITY, {**parity, "sample": source})
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # some writers make private files; an export is a shared artefact

    replace_dir(build, dest)
    return dest


def _check_options(run_dir: str | Path, fmt: str, quantize: str | None, parity_rows: int) -> None:
    if fmt == "onnx":
        require("onnx", "exporting to ONNX")
    if fmt not in FORMATS:
        raise ConfigError(f"export --format {fmt!r}: use one of {', '.join(FORMATS)}")
    if quantize is not None and (fmt != "onnx" or quantize not in QUANTIZE):
        raise ConfigError(f"export --quantize {quantize}: only --format onnx --quantize int8 is supported")
    if parity_rows < 0:
        raise ConfigError(f"export --parity-rows {parity_rows}: must be >= 0")
    if folder_kind(run_dir) != "run":
        raise ConfigError(f"{run_dir}: is an exported folder; export from the run folder that `train` wrote")


def _check_mergeable(run_dir: str | Path, fmt: str, checkpoint: str) -> None:
    """Refuse, before loading anything, to export a method whose adapter cannot become plain weights."""
    method = read_config(run_dir).peft.method
    if method in MERGEABLE or method == "bitfit":
        return
    raise ConfigError(
        f"{run_dir}: peft.method={method} ({NAMES[method]}) cannot be exported as {fmt}: its virtual tokens are "
        "inputs of every forward, not a change of the weights, so peft cannot merge them into a plain model. "
        f"The checkpoint {checkpoint_dir(run_dir, checkpoint)} is itself the unmerged export: it loads with "
        "`PeftModel.from_pretrained` on the backbone"
        + (" (after `agnews_lora.methods.accept_past_key_values(backbone)`: transformers 5 renamed the argument peft "
           "passes the prefix in)" if method == "prefix" else "") + ", or predict/serve the run folder.")


def write_model(reference: Classifier, dest: Path, fmt: str, quantize: str | None = None) -> None:
    """Merge the adapter into the weights (in place; BitFit's model is plain already) and write the
    model, tokenizer and config.yaml.

    Args:
        reference: a Classifier holding the run's peft model (loaded with merge=False).
        dest: the folder to fill.
        fmt: "merged" or "onnx".
        quantize: None or "int8" (ONNX only).
    """
    model = reference.model
    merged = (merge(model) if hasattr(model, "peft_config") else model).eval()  # BitFit: plain already
    if fmt == "merged":
        merged.save_pretrained(dest, safe_serialization=True)
    else:
        merged.config.save_pretrained(dest)  # labels and architecture, for Classifier.load
        # Plain matmul-softmax attention exports to a leaner graph than SDPA's (no NaN guards),
        # which ONNX Runtime ran ~15% faster here; the logits match either way.
        merged.set_attn_implementation("eager")
        export_onnx(merged, reference.tokenizer, dest / ONNX_FILE, quantize=quantize)
    reference.tokenizer.save_pretrained(dest)
    write_config(reference.cfg, dest)


def export_metadata(reference: Classifier, fmt: str, quantize: str | None, run_dir: str | Path,
                    checkpoint: str) -> dict:
    """What `Classifier.load` and `serve` need beside the model, and where it came from."""
    import transformers

    meta = {"format": fmt, "quantize": quantize, "labels": reference.label_names,
            "max_length": reference.cfg.data.max_length, "model": reference.cfg.model.name,
            "head": reference.cfg.model.head, "trainable": reference.info.get("trainable"),
            "temperature": reference.temperature, "class_prior": reference.class_prior.tolist(),
            "source_run": str(Path(run_dir).resolve()), "checkpoint": checkpoint,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "agnews_lora": package_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if fmt == "onnx":
        meta.update({"opset": OPSET, "inputs": {"input_ids": "int64 [batch, sequence]",
                                                "attention_mask": "int64 [batch, sequence]"},
                     "outputs": {"logits": f"float32 [batch, {reference.num_labels}]"}})
    return meta


def parity_sample(cfg: Config, rows: int) -> tuple[list[str], str]:
    """`rows` evenly spaced rows of the run's test files (else its train files), plus SAMPLE_TEXTS.

    Returns:
        (texts, a description of where they came from).
    """
    for files in (cfg.data.test, cfg.data.train):
        if not files or rows == 0:
            continue
        try:
            texts = read_files(files, columns=Columns.of(cfg.data), labels=False).texts
        except DataError:
            continue  # files moved since training: the built-in texts still check the export
        idx = np.linspace(0, len(texts) - 1, num=min(rows, len(texts))).round().astype(int)
        return [texts[i] for i in idx] + SAMPLE_TEXTS, f"{len(idx)} rows of {','.join(files)} + " \
                                                       f"{len(SAMPLE_TEXTS)} built-in texts"
    return list(SAMPLE_TEXTS), f"{len(SAMPLE_TEXTS)} built-in texts"


def check_parity(expected: np.ndarray, got: np.ndarray, tolerance: float, name: str) -> dict:
    """Compare logits; raise ParityError unless labels agree on >= 99% of rows and
    max |difference| <= tolerance.

    Returns:
        rows, label_agreement, max/mean |logit difference|, the thresholds, passed.
    """
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    agreement = float((expected.argmax(-1) == got.argmax(-1)).mean())
    result = {"export": name, "reference": "PyTorch peft model, fp32", "rows": int(len(expected)),
              "label_agreement": agreement, "min_label_agreement": MIN_LABEL_AGREEMENT,
              "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
              "tolerance": tolerance}
    result["passed"] = agreement >= MIN_LABEL_AGREEMENT and result["max_abs_logit_diff"] <= tolerance
    if not result["passed"]:
        raise ParityError(f"{name} export fails its parity check on {len(expected)} texts: labels agree on "
                          f"{agreement:.2%} (need {MIN_LABEL_AGREEMENT:.0%}), max |logit diff| "
                          f"{result['max_abs_logit_diff']:.3g} (tolerance {tolerance:g}); nothing was written")
    return result


class _Logits(nn.Module):
    """The classifier with tensors in and logits out: the ONNX graph's whole interface."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: nn.Module, tokenizer, dest: Path, quantize: str | None = None) -> None:
    """torch.onnx (dynamo) export with dynamic batch and sequence, one file; int8 if asked.

    Args:
        model: a merged fp32 sequence-classification model in eval mode.
        tokenizer: its tokenizer (builds the example input).
        dest: the .onnx file to write.
        quantize: None or "int8" (onnxruntime dynamic quantization, QInt8 weights).
    """
    example = tokenizer(SAMPLE_TEXTS[:2], padding=True, return_tensors="pt")
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    fp32 = dest.with_name("model.fp32.onnx") if quantize else dest
    with warnings.catch_warnings(), torch.no_grad(), quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")  # exporter deprecation chatter, not about this model
        torch.onnx.export(_Logits(model).eval(), (example["input_ids"], example["attention_mask"]), str(fp32),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes=dims, opset_version=OPSET, external_data=False, dynamo=True,
                          verbose=False)
    if quantize:
        quantize_int8(fp32, dest)
        fp32.unlink()


def quantize_int8(src: Path, dest: Path) -> None:
    """Dynamic quantization: int8 weights (one scale per output channel), activations quantized
    per batch at run time. Per-channel scales halved the logit error of per-tensor ones on the
    MiniLM stand-in (max 0.6 vs 1.6 on 1,000 test rows; labels 99.5% vs 98.9% the same)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_logger(""):  # the root logger's "consider pre-processing" advice, on every call
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True)


def format_parity(folder: str | Path) -> str:
    """One line about an export folder's parity check."""
    p = json.loads((Path(folder) / PARITY).read_text())
    return (f"parity ({p['export']}, {p['rows']} texts: {p['sample']}): labels agree {p['label_agreement']:.2%}, "
            f"max |logit diff| {p['max_abs_logit_diff']:.2e} (tolerance {p['tolerance']:g})")
