"""Classifier: load a model once, predict texts fast; files in -> `ID,Label` CSV out.

One Classifier serves three kinds of folder behind one `predict_logits`: a run folder written
by `train` (the adapter is merged into the weights in memory), a merged folder and an ONNX
folder written by `export` (see export.py).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from agnews_lora import runs
from agnews_lora.calibration import BATCH_PRIORS, parse_prior  # noqa: F401  (re-exported)
from agnews_lora.config import Config
from agnews_lora.errors import ConfigError, RunDamaged, UserError
from agnews_lora.data import Columns, Split, clean_text, pad_batch, read_files, tokenize
from agnews_lora.outputs import claim_file
from agnews_lora.precision import autocast_dtype, resolve_precision
from agnews_lora.runs import ONNX_FILE, folder_kind  # noqa: F401  (re-exported: export, tests)
from agnews_lora import shift
from agnews_lora.calibration import adjust_to_prior, batch_prior, softmax
from agnews_lora.checkpoint import atomic_write_text, load_adapter_weights
from agnews_lora.data import load_splits
from agnews_lora.extras import require
from agnews_lora.methods import MERGEABLE, merge as merge_adapters
from agnews_lora.model import budget_breakdown, build_model, load_tokenizer, peft_notes_silenced
from agnews_lora.shift import check_reference, check_threshold
from agnews_lora.speed import cast_frozen_linears

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
        require("onnx", "running an ONNX model")
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
            precision: "auto" (the run's train.precision when it is fp32 or bf16, else what
                `precision.resolve_precision` picks for the device), "bf16", "fp16" or "fp32";
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
            resolve_precision(precision, self.device, run_precision=cfg.train.precision)
        self.label_names = runs.label_names(model.config.num_labels, getattr(model.config, "id2label", None),
                                            names=cfg.data.labels)
        self.num_labels = model.config.num_labels
        # Fitted on the run's validation rows by train; 1.0 (raw softmax) for models without it.
        self.temperature = float(self.info.get("temperature") or 1.0)
        prior = self.info.get("class_prior")
        self.class_prior = np.asarray(prior if prior else np.full(self.num_labels, 1 / self.num_labels))
        self.last_throughput = 0.0
        self.last_shift: dict | None = None  # what the last "match-shifted" correction did
        self.last_prior: dict | None = None  # what the last batch prior (em, match, match-shifted) did

    @classmethod
    def load(cls, path: str | Path, checkpoint: str = "best", device: str = "cpu", precision: str = "auto",
             threads: int | None = None, merge: bool = True) -> "Classifier":
        """Load a run folder, a merged folder or an ONNX folder (see `folder_kind`).

        Args:
            path: the folder.
            checkpoint: run folders only: "best" (default) or "last".
            device: torch device (ONNX folders run on CPU).
            precision: "auto" (the run's train.precision when it is fp32 or bf16, else what
                `precision.resolve_precision` picks for the device), "bf16", "fp16" or "fp32".
            threads: ONNX folders: intra-op threads of the ONNX Runtime session (None: its
                default). torch's thread count is process-wide, so the caller sets it
                (`torch.set_num_threads`; the CLI's --threads does).
            merge: run folders only: merge the adapter into the weights (same logits, faster;
                prompt and prefix tuning cannot be merged and stay peft models); False keeps
                the peft model (export compares against it).

        Returns:
            The Classifier.
        """
        if threads is not None and threads < 1:
            raise ConfigError(f"threads={threads}: must be >= 1 (None: one per physical core)")
        kind = folder_kind(path)
        if kind == "onnx":
            return _load_onnx(Path(path), threads)
        if kind == "merged":
            model, tokenizer, cfg, info = _load_merged(Path(path), device)
        else:
            model, tokenizer, cfg, info = _load_run(Path(path), checkpoint, device, merge)
        clf = cls(model, tokenizer, cfg, precision=precision, info=info)
        dtype = autocast_dtype(clf.precision)
        if dtype is not None and not hasattr(model, "peft_config"):
            # Bit-identical under autocast, without casting every weight on every batch.
            cast_frozen_linears(model.requires_grad_(False), dtype)
        return clf

    def training_texts(self) -> list[str]:
        """The run's training rows (the same seeded carve as training, validation rows left out),
        the reference of `prior="match-shifted"`; a clear error when its data cannot be read."""
        try:
            train, _, _ = load_splits(self.cfg.data, seed=self.cfg.train.seed, num_labels=self.num_labels)
        except (ConfigError, ValueError, OSError) as err:
            raise ConfigError(f"prior 'match-shifted' compares the texts with the run's training texts "
                              f"(data.train={self.cfg.data.train or self.cfg.data.hub_dataset}), which cannot be "
                              f"read here: {err}; give them with --reference FILE (any format predict reads)") from None
        return list(train.texts)

    def _logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.onnx:
            return self.model.logits(input_ids, attention_mask)
        dtype = autocast_dtype(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
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
        start = time.perf_counter()
        out = batched_outputs(texts, self.tokenizer, max_length=self.cfg.data.max_length, forward=self._logits,
                              width=self.num_labels, batch_size=batch_size,
                              pad_to_multiple_of=self.cfg.data.pad_to_multiple_of, progress=progress)
        self.last_throughput = len(texts) / max(time.perf_counter() - start, 1e-9)
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64, prior: str | Sequence[float] | None = None) -> list[int]:
        """Predicted label ids (0 World, 1 Sports, 2 Business, 3 Sci/Tech); `prior` as in
        `probabilities`."""
        if prior is None:
            return self.predict_logits(texts, batch_size).argmax(-1).tolist()
        return self.predict_proba(texts, batch_size, prior=prior).argmax(-1).tolist()

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64, temperature: float | None = None,
                      prior: str | Sequence[float] | None = None) -> np.ndarray:
        """Class probabilities [n, classes]: softmax(logits / temperature), see `probabilities`."""
        return self.probabilities(self.predict_logits(texts, batch_size), temperature=temperature, prior=prior)

    def probabilities(self, logits: np.ndarray, temperature: float | None = None,
                      prior: str | Sequence[float] | None = None, texts: Sequence[str] | None = None,
                      reference: Sequence[str] | None = None, shift_threshold: float | None = None,
                      shift_calibration: str | None = None) -> np.ndarray:
        """Probabilities from logits: temperature-scaled, optionally corrected to another class prior.

        Args:
            logits: [n, classes].
            temperature: None = the run's own (fitted on its validation rows at the end of
                training; 1.0 for models without one); 1.0 = the raw softmax.
            prior: None (the training prior, unchanged); "uniform"; "em" (re-estimate the prior
                of these rows by EM, Saerens et al. 2002: use it on a whole unlabelled batch);
                "match" (re-weight the classes so that the batch's mean probability is the
                training prior); "match-shifted" (the same on the rows a domain classifier finds
                shifted away from the training texts only, see shift.py; needs `texts`); or one
                share per class (normalized). The batch priors (em, match, match-shifted) leave a
                batch of fewer than `calibration.MIN_BATCH_ROWS` rows unchanged; `last_prior` says
                what they did ("skipped": why nothing changed).
            texts: the texts of `logits` ("match-shifted" only).
            reference: texts of the training distribution ("match-shifted"; default: the run's
                training rows, `training_texts`).
            shift_threshold: "match-shifted": rows with a shift score above it are matched
                (default shift.DEFAULT_THRESHOLD).
            shift_calibration: "match-shifted": "none" (default) or "keep-confidence" (a temperature
                on the matched rows restores their mean top probability from before matching;
                labels unchanged; see shift.py).

        Returns:
            float32 [n, classes], rows summing to 1.
        """
        probs = softmax(logits, self.temperature if temperature is None else temperature)
        if prior is None:
            return probs.astype(np.float32)
        if isinstance(prior, str) and prior in ("em", "match"):  # unchanged on too small a batch: see last_prior
            out, self.last_prior = batch_prior(probs, prior, self.class_prior)
            return out.astype(np.float32)
        if isinstance(prior, str) and prior == "match-shifted":
            if texts is None or len(texts) != len(probs):
                raise ConfigError("prior 'match-shifted' needs the texts of the rows (one per row of logits)")
            threshold = shift.DEFAULT_THRESHOLD if shift_threshold is None else shift_threshold
            out, self.last_shift = shift.match_shifted_texts(
                probs, texts, reference=self.training_texts if reference is None else reference,
                prior=self.class_prior, threshold=threshold, calibration=shift_calibration or "none")
            self.last_prior = {"prior": prior, **self.last_shift}
            return out.astype(np.float32)
        target = np.full(self.num_labels, 1.0) if isinstance(prior, str) and prior == "uniform" else \
            parse_prior(prior, self.num_labels)
        return adjust_to_prior(probs, self.class_prior, target / target.sum()).astype(np.float32)


def batched_outputs(texts: Sequence[str], tokenizer, max_length: int,
                    forward: Callable[[np.ndarray, np.ndarray], np.ndarray], width: int, batch_size: int = 64,
                    pad_to_multiple_of: int = 1, progress: bool = False) -> np.ndarray:
    """Run a model over texts: cleaned and tokenized in one call, batched longest first (each
    batch pads to nearly its own length).

    Args:
        texts: raw texts.
        tokenizer: the model's tokenizer.
        max_length: truncation length.
        forward: (input_ids, attention_mask), int64 arrays [batch, length] -> float [batch, width].
        width: columns of forward's output.
        batch_size: texts per forward call.
        pad_to_multiple_of: batches pad to a multiple of this many tokens.
        progress: show a progress bar.

    Returns:
        float32 [n, width] in input order.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    ids = tokenize([clean_text(t) for t in texts], tokenizer, max_length, cache_dir=None)
    order = np.argsort(-np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids)), kind="stable")
    out = np.zeros((len(ids), width), dtype=np.float32)
    with tqdm(total=len(ids), disable=not progress, desc="predict", unit="text", dynamic_ncols=True) as bar:
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            out[rows] = forward(*pad_batch([ids[i] for i in rows], tokenizer.pad_token_id, pad_to_multiple_of))
            bar.update(len(rows))
    return out


def _run_trainable(run_dir: Path, cfg: Config) -> int:
    summary = runs.read_summary(run_dir)
    if summary and isinstance(summary.get("trainable"), dict) and "total" in summary["trainable"]:
        return int(summary["trainable"]["total"])
    return budget_breakdown(cfg).total


def _run_calibration(run_dir: Path) -> dict:
    """The temperature and training class prior train saved in summary.json (absent: {})."""
    data = runs.read_summary(run_dir)
    if not data:
        return {}
    return {"temperature": (data.get("calibration") or {}).get("temperature"), "class_prior": data.get("class_prior")}


def _load_run(run_dir: Path, checkpoint: str, device: str, merge: bool):
    from peft import PeftModel

    cfg = runs.read_config(run_dir)
    adapter = runs.checkpoint_dir(run_dir, checkpoint)  # never moves files: the trainer may be mid-swap
    from safetensors import SafetensorError

    try:
        if cfg.peft.method == "bitfit":  # no peft: the trained biases and head go into the built model
            model = build_model(cfg, device=device)
            load_adapter_weights(model, adapter)
        else:
            with peft_notes_silenced():
                model = PeftModel.from_pretrained(build_model(cfg, device=device, with_lora=False), str(adapter))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # a truncated adapter, bad json
        if isinstance(err, UserError):
            raise
        raise RunDamaged(f"{adapter}: the run is damaged ({type(err).__name__}: {str(err)[:200]}); "
                          "restore the checkpoint or train again") from None
    if merge and cfg.peft.method in MERGEABLE:
        model = merge_adapters(model)
    info = {"source": str(run_dir), "format": "run", "checkpoint": checkpoint, "model": cfg.model.name,
            "head": cfg.model.head, "trainable": _run_trainable(run_dir, cfg), **_run_calibration(run_dir)}
    return model, load_tokenizer(cfg.model.name), cfg, info


def _exported_config(folder: Path) -> tuple[Config, dict]:
    """The run's config and what `serve`'s /info shows of an exported model."""
    cfg, meta = runs.exported_config(folder)
    info = {"source": str(folder), "format": meta.get("format", "merged"), "model": meta.get("model", str(folder)),
            "head": meta.get("head"), "trainable": meta.get("trainable"), "quantize": meta.get("quantize"),
            "temperature": meta.get("temperature"), "class_prior": meta.get("class_prior")}
    return cfg, info


def _load_merged(folder: Path, device: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, info = _exported_config(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device)
    return model, AutoTokenizer.from_pretrained(folder), cfg, info


def _load_onnx(folder: Path, threads: int | None) -> Classifier:
    from transformers import AutoConfig, AutoTokenizer

    if not (folder / ONNX_FILE).is_file():
        raise RunDamaged(f"{folder}: no {ONNX_FILE}; export it again with `agnews-lora export RUN --format onnx`")
    cfg, info = _exported_config(folder)
    model = OnnxModel(folder / ONNX_FILE, AutoConfig.from_pretrained(folder), threads=threads)
    return Classifier(model, AutoTokenizer.from_pretrained(folder), cfg, info=info)


def write_predictions(preds: Sequence[int], output: str | Path, label_names: Sequence[str] | None = None) -> None:
    """The competition format: header `ID,Label`, ID = row index of the input, Label = the class id
    (or its name from `label_names`)."""
    label = (lambda p: label_names[p]) if label_names else int
    _write_csv(["ID", "Label"], ([i, label(p)] for i, p in enumerate(preds)), output)


def probabilities_path(output: str | Path) -> Path:
    """Where `--probs` writes: beside the `ID,Label` file, `NAME.probs.csv`."""
    output = Path(output)
    return output.with_name(f"{output.stem}.probs.csv")


def write_probabilities(probs: np.ndarray, label_names: Sequence[str], output: str | Path) -> None:
    """`ID,p_<class>...`: one row per input row, probabilities rounded to 6 digits."""
    header = ["ID"] + [f"p_{name}" for name in label_names]
    _write_csv(header, ([i, *(f"{v:.6f}" for v in row)] for i, row in enumerate(probs)), output)


def _write_csv(header: list[str], rows, output: str | Path) -> None:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(Path(output), buf.getvalue())


def check_output(output: str | Path, inputs: Sequence[str | Path] = (), probs: bool = False) -> None:
    """Refuse, before any work, outputs of `predict_file` that would destroy data or could not be
    written (outputs.claim_file: never an input, a folder, a file in a run or model folder, or a
    file the tool did not write).

    Args:
        output: the ID,Label CSV to write.
        inputs: the input files (and reference files) of the call.
        probs: the probabilities are also written, to `probabilities_path(output)`.

    Raises:
        OutputRefused: naming the path and why.
    """
    claim_file(output, kind="predictions", label="--output", inputs=inputs)
    if probs:
        claim_file(probabilities_path(output), kind="predictions", label="--probs", inputs=inputs)


RUN_PRIOR = "run"  # predict_file's default prior: the run's predict.prior (config); empty = the training prior


def resolve_prior(clf: Classifier, prior: str | Sequence[float] | None,
                  shift_threshold: float | None = None) -> tuple[str | Sequence[float] | None, float | None]:
    """The prior and shift threshold a prediction call uses, checked before any prediction.

    Args:
        clf: the loaded model (its config holds the run's defaults).
        prior: RUN_PRIOR ("run": the run's predict.prior), None or "none" (the training
            prior), or a prior `Classifier.probabilities` takes.
        shift_threshold: "match-shifted" only; None: the run's predict.shift_threshold.

    Returns:
        (prior or None, threshold or None).

    Raises:
        ConfigError: a bad prior, or a threshold without "match-shifted".
    """
    if isinstance(prior, str) and prior == RUN_PRIOR:
        prior = clf.cfg.predict.prior or None
    if isinstance(prior, str) and prior == "none":
        prior = None
    if prior is not None:
        parse_prior(prior, clf.num_labels)  # a bad value fails before any prediction
    if shift_threshold is not None:
        if not (isinstance(prior, str) and prior == "match-shifted"):
            raise ConfigError("shift_threshold goes with prior 'match-shifted'")
        check_threshold(shift_threshold, "shift_threshold")
    elif isinstance(prior, str) and prior == "match-shifted":
        shift_threshold = clf.cfg.predict.shift_threshold
    return prior, shift_threshold


def resolve_shift_calibration(clf: Classifier, prior: str | Sequence[float] | None,
                              calibration: str | None = None) -> str | None:
    """The shift calibration a prediction call uses, checked before any prediction.

    Args:
        clf: the classifier (its run's predict.shift_calibration is the default).
        prior: the prior `resolve_prior` returned.
        calibration: None (the run's predict.shift_calibration with "match-shifted"), "none" or
            "keep-confidence".

    Returns:
        The calibration with "match-shifted", else None.

    Raises:
        ConfigError: an unknown value, or one given without "match-shifted".
    """
    if calibration is not None:
        shift.check_calibration(calibration, "shift_calibration")
        if not (isinstance(prior, str) and prior == "match-shifted"):
            raise ConfigError("shift_calibration goes with prior 'match-shifted'")
        return calibration
    if isinstance(prior, str) and prior == "match-shifted":
        return clf.cfg.predict.shift_calibration
    return None


def predict_file(clf: Classifier, inputs: Sequence[str], output: str | Path, batch_size: int = 64,
                 progress: bool = True, prior: str | Sequence[float] | None = RUN_PRIOR,
                 probs: bool = False, reference: Sequence[str] | None = None,
                 shift_threshold: float | None = None,
                 reference_files: Sequence[str | Path] = (),
                 shift_calibration: str | None = None, names: bool = False) -> tuple[Split, list[int]]:
    """Predict every row of the input file(s) and write `ID,Label` to `output` (checked first).

    Args:
        prior: RUN_PRIOR (default: the run's predict.prior, as `agnews-lora predict` without
            --prior), None or "none" (the training prior), "uniform", "em" (re-estimated over all
            rows of the input), "match" / "match-shifted" (see `Classifier.probabilities`) or
            shares per class: labels are then the argmax of the prior-corrected probabilities
            (`resolve_prior`).
        reference, shift_threshold, shift_calibration: for "match-shifted", as in
            `Classifier.probabilities` (defaults: the run's predict.shift_threshold and
            predict.shift_calibration; `resolve_shift_calibration`).
        probs: also write the (temperature-scaled, prior-corrected) probabilities to
            `probabilities_path(output)`.
        reference_files: the files `reference` was read from (never written over).
        names: the Label column holds class names (`Classifier.label_names`) instead of class ids.
    """
    check_output(output, [*inputs, *(reference_files or ())], probs=probs)
    prior, shift_threshold = resolve_prior(clf, prior, shift_threshold)
    shift_calibration = resolve_shift_calibration(clf, prior, shift_calibration)
    split = read_files(inputs, num_labels=clf.num_labels, names=clf.label_names, columns=Columns.of(clf.cfg.data))
    if prior == "match-shifted" and reference is not None:
        check_reference(reference)  # a reference the shift classifier cannot use fails before predicting
    logits = clf.predict_logits(split.texts, batch_size=batch_size, progress=progress)
    p = clf.probabilities(logits, prior=prior, texts=split.texts, reference=reference, shift_threshold=shift_threshold,
                          shift_calibration=shift_calibration) if (prior is not None or probs) else None
    preds = (logits if p is None else p).argmax(-1).tolist()
    write_predictions(preds, output, label_names=clf.label_names if names else None)
    if probs:
        write_probabilities(p, clf.label_names, probabilities_path(output))
    return split, preds
