"""Hugging Face model cards for a run's best/ folder and its exports (huggingface_hub's ModelCard).

The card's YAML metadata (base model, library, pipeline tag, dataset, metrics as eval results) is
built by `ModelCardData`; its text by `ModelCard.from_template` on templates/model_card.md. Every
figure comes from the run folder: summary.json, test_metrics.json, metrics.jsonl and, where
`agnews-lora robustness` wrote one, robustness.json (the limitations section then reports the
measured shift). `agnews-lora card RUN` rebuilds the cards after the run changed (e.g. after a
robustness report).
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

from agnews_lora import runs
from agnews_lora.config import AG_NEWS_LABELS
from agnews_lora.checkpoint import atomic_write_text
from agnews_lora.errors import ConfigError
from agnews_lora.outputs import claim_file, holder_of, remove_stale
from agnews_lora.precision import display_name
from agnews_lora.report import _f4, _layers, _per_class_table, inert, md_table
from agnews_lora.evaluate import compute_metrics
from agnews_lora.methods import NAMES, describe
from agnews_lora.predict import package_version
from agnews_lora.report import load_run, trainable_rows

CARD = "README.md"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_LIBRARY = {"adapter": "peft", "merged": "transformers", "onnx": "onnx"}


def hub_id(name: str) -> str | None:
    """`name` when it is a Hub model or dataset id (not a local folder or package path)."""
    if name.startswith(("pkg:", ".", "/", "~")) or Path(name).expanduser().exists():
        return None
    return name if _HUB_ID.fullmatch(name) else None


def build_card(run_dir: str | Path, kind: str = "adapter", export_meta: dict | None = None):
    """The model card of a finished run: for its best/ adapter (`kind="adapter"`) or an export of
    it (`"merged"`, `"onnx"`, with the export's agnews_lora.json as `export_meta`).

    Returns:
        A `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in _LIBRARY:
        raise ConfigError(f"model card kind {kind!r}: use one of {', '.join(_LIBRARY)}")
    run = load_run(run_dir)
    cfg = run.cfg
    robustness = runs.read_json(run.path / runs.ROBUSTNESS_JSON)
    dataset = hub_id(cfg.data.hub_dataset) if not cfg.data.train else None
    base = hub_id(cfg.model.name)
    tags = ["text-classification", *(["ag-news"] if _ag_news(cfg) else []), cfg.peft.method, "agnews-lora"]
    if kind == "onnx":
        tags.append("int8" if (export_meta or {}).get("quantize") else "fp32")
    library = "safetensors" if kind == "adapter" and cfg.peft.method == "bitfit" else _LIBRARY[kind]  # no peft
    data = ModelCardData(
        model_name=f"agnews-lora {inert(run.name)}", base_model=base, library_name=library,
        pipeline_tag="text-classification", datasets=[dataset] if dataset else None,
        metrics=["accuracy", "f1"], tags=tags, eval_results=_eval_results(run, dataset) or None)
    template = importlib.resources.files("agnews_lora") / "templates" / "model_card.md"
    per_class_split, per_class = _per_class(run)
    return ModelCard.from_template(
        data, template_str=template.read_text(encoding="utf-8"),
        title=f"agnews-lora: {inert(run.name)}", summary=_summary(run, kind, export_meta),
        usage=_usage(run, kind), placement=_placement(cfg), trainable=_trainable(run),
        recipe=_recipe(run), results=_results(run), per_class_split=per_class_split, per_class=per_class,
        limitations=_limitations(run, robustness), provenance=_provenance(run, kind, export_meta))


def write_run_card(run_dir: str | Path) -> Path:
    """Write the run's card to RUN_DIR/best/README.md (replacing peft's placeholder card)."""
    path = claim_file(Path(run_dir) / runs.BEST / CARD, kind="markdown", label="card", owner=run_dir,
                      owned=(f"best/{CARD}",))
    atomic_write_text(path, str(build_card(run_dir)))
    return path


def write_export_card(folder: str | Path, run_dir: str | Path, meta: dict) -> Path | None:
    """Write the card of an export folder (format and quantization from its metadata); None when
    the run's training has not finished (no summary.json: no figures to report)."""
    if not (Path(run_dir) / runs.SUMMARY).is_file():
        return None
    path = Path(folder) / CARD  # export writes it into its temporary folder; `card` into a checked export
    atomic_write_text(path, str(build_card(run_dir, kind=meta["format"], export_meta=meta)))
    return path


def run_exports(run_dir: str | Path) -> list[Path]:
    """The export folders under RUN_DIR/export/ that are the tool's finished exports (never the
    temporary folder of an export still running or killed: those are removed when stale)."""
    found = []
    for folder in sorted((Path(run_dir) / runs.EXPORTS).glob("*")):
        if folder.name.startswith("."):
            continue
        remove_stale(folder)
        holder = holder_of(folder)
        if holder is not None and holder.kind == "export" and not folder.is_symlink():
            claim_file(folder / CARD, kind="markdown", label="card", owner=folder, owned=(CARD,))
            found.append(folder)
    return found


def rebuild(path: str | Path) -> list[Path]:
    """`agnews-lora card PATH`: a run folder -> its best/ card and the cards of its exports under
    RUN_DIR/export/; an export folder -> its card, from the run it was exported from.

    Returns:
        The cards written.
    """
    path = Path(path)
    kind = runs.folder_kind(path)
    holder = holder_of(path)
    if holder is None or holder.kind not in ("run", "export"):
        raise ConfigError(f"{path}: not a run folder or a folder written by `agnews-lora export`; the tool writes "
                          "model cards only into its own folders")
    if kind == "run":
        written = [write_run_card(path)]
        for folder in run_exports(path):
            written.append(write_export_card(folder, path, runs.read_export_meta(folder)))
        return [p for p in written if p is not None]
    claim_file(path / CARD, kind="markdown", label="card", owner=path, owned=(CARD,))
    meta = runs.read_export_meta(path)
    source = Path(meta.get("source_run", ""))
    if not (source / runs.SUMMARY).is_file():
        raise ConfigError(f"{path}: the run it was exported from ({source}) is not there any more; "
                          "its card can only be rebuilt from that run folder")
    return [write_export_card(path, source, meta)]  # not None: summary.json checked above


# ---------------------------------------------------------------- parts


def _table(headers: list[str], rows: list[list]) -> str:
    # key-value tables (empty headers) read left-aligned; tables of figures right-aligned
    return md_table(headers, rows, align="l" * len(headers) if not any(headers) else "")


def _ag_news(cfg) -> bool:
    """The run learned AG News' four topics (the tool's default dataset)."""
    return list(cfg.data.labels) == list(AG_NEWS_LABELS)


def _dataset_name(cfg) -> str:
    """What the run was trained on, for people: AG News, the Hub dataset, or the training files."""
    if _ag_news(cfg):
        return "AG News"
    if not cfg.data.train:
        return inert(cfg.data.hub_dataset + (f" ({cfg.data.hub_config})" if cfg.data.hub_config else ""))
    return inert(", ".join(Path(f).name for f in cfg.data.train))


def _test_name(run) -> str:
    source = (run.test or {}).get("data") or ",".join(run.cfg.data.test) or run.cfg.data.hub_dataset
    name = _dataset_name(run.cfg)
    return f"{name} test ({inert(Path(str(source)).name)})" if source else f"{name} test"


def _eval_results(run, dataset: str | None) -> list:
    from huggingface_hub import EvalResult

    ag_news = _ag_news(run.cfg)
    common = {"task_type": "text-classification", "task_name": "Topic classification" if ag_news else
              "Text classification", "dataset_type": dataset or ("ag_news" if ag_news else "local")}
    out = []
    if run.test is not None:
        name = _test_name(run)
        out += [EvalResult(**common, dataset_name=name, dataset_split="test", metric_type="accuracy",
                           metric_value=run.test["accuracy"]),
                EvalResult(**common, dataset_name=name, dataset_split="test", metric_type="f1",
                           metric_name="F1 (macro)", metric_config="macro", metric_value=run.test["f1_macro"])]
    if run.summary.get("best_val_accuracy") is not None:
        out.append(EvalResult(**common, dataset_name=f"{_dataset_name(run.cfg)} validation (carved from train)",
                              dataset_split="validation", metric_type="accuracy",
                              metric_value=run.summary["best_val_accuracy"]))
    return out  # the robustness figures (other rows, perturbed) stay in the card's text


def _summary(run, kind: str, meta: dict | None) -> str:
    cfg = run.cfg
    method = NAMES[cfg.peft.method]
    what = {"adapter": f"A {method} adapter and classification head (plain `peft` format)",
            "merged": f"A plain transformers model (the {method} adapter merged into the weights)",
            "onnx": f"An ONNX model (the {method} adapter merged)"}[kind]
    if cfg.peft.method == "bitfit":
        what = {"adapter": "BitFit: the backbone's trained biases and the classification head (safetensors)",
                "merged": "A plain transformers model (BitFit: its biases and head trained)",
                "onnx": "An ONNX model (BitFit: its biases and head trained)"}[kind]
    if kind == "onnx" and (meta or {}).get("quantize"):
        what = what.replace("An ONNX model", "An int8-quantized ONNX model")
    names = inert(", ".join(run.label_names))
    task = f"news texts into {cfg.model.num_labels} topics" if _ag_news(cfg) else \
        f"texts into {cfg.model.num_labels} classes"
    acc = f" Test accuracy {run.test['accuracy']:.4f} on {run.test['n']:,} rows." if run.test else ""
    if (meta or {}).get("checkpoint") == "last":
        acc += " This export is of the run's last checkpoint; the figures below are of its best one."
    return (f"{what} that classifies {task} ({names}), trained on {_dataset_name(cfg)} and fine-tuned "
            f"from `{inert(cfg.model.name)}` with agnews-lora, training "
            f"{run.summary['trainable']['total']:,} parameters (budget {cfg.budget.max_trainable:,}, head "
            f"included).{acc}")


def _usage(run, kind: str) -> str:
    folder = "RUN_DIR" if kind == "adapter" else "THIS_FOLDER"
    cli = ("```bash\n# with agnews-lora installed\nagnews-lora predict " + folder + " --input texts.csv --output "
           "predictions.csv --probs\nagnews-lora serve " + folder + "  # HTTP API and a demo page on "
           "http://127.0.0.1:8000/\n```")
    if kind == "adapter":
        how = {"bitfit": "This folder holds the trained biases and head under their transformers names in "
                         "`adapter_model.safetensors`: `model.load_state_dict(load_file(...), strict=False)` "
                         "puts them into the base model.",
               "prefix": "This folder is a plain peft adapter (the head is saved with it as `modules_to_save`); "
                         "`PeftModel.from_pretrained` loads it onto the base model after "
                         "`agnews_lora.methods.accept_past_key_values(base)` (transformers 5 renamed the argument "
                         "peft passes the prefix in)."}.get(
            run.cfg.peft.method, "This folder is a plain peft adapter (the head is saved with it as "
                                 "`modules_to_save`); `PeftModel.from_pretrained` loads it onto the base model.")
        return (f"{how} agnews-lora loads it from the run "
                f"folder around it (RUN_DIR, here `{inert(run.path.name)}`), with the run's temperature and class "
                f"prior:\n\n{cli}\n\nIn Python:\n\n```python\nfrom agnews_lora.predict import Classifier\n\n"
                "clf = Classifier.load(\"RUN_DIR\")\nclf.predict([\"Stocks rally as oil prices fall\"])\n```")
    if kind == "merged":
        return ("A plain transformers folder:\n\n```python\nfrom transformers import pipeline\n\n"
                "clf = pipeline(\"text-classification\", model=\"THIS_FOLDER\")\n"
                "clf(\"Stocks rally as oil prices fall\")\n```\n\nor with agnews-lora (temperature-scaled "
                f"probabilities, batch prediction, serving):\n\n{cli}")
    return f"ONNX Runtime through agnews-lora (the tokenizer and labels are in this folder):\n\n{cli}"


def _placement(cfg) -> str:
    if cfg.peft.method != "lora":
        return _table(["", ""], [["method", NAMES[cfg.peft.method]], ["settings", inert(describe(cfg))],
                                 ["head", inert(cfg.model.head)]])
    rows = [["method", "LoRA"], ["target modules", inert(", ".join(cfg.lora.target_modules))],
            ["layers", _layers(cfg)], ["rank r", cfg.lora.r], ["alpha", f"{cfg.lora.alpha:g}"],
            ["dropout", f"{cfg.lora.dropout:g}"], ["head", inert(cfg.model.head)]]
    return _table(["", ""], rows)


def _trainable(run) -> str:
    t = run.summary["trainable"]
    rows = [[part, inert(name), f"{n:,}"] for part, name, n in trainable_rows(run)]
    rows.append(["total", "", f"{t['total']:,} of {run.cfg.budget.max_trainable:,}"])
    return _table(["part", "module", "parameters"], rows)


def _recipe(run) -> str:
    cfg, s = run.cfg, run.summary
    t = cfg.train
    levers = s.get("shift_levers") or {}
    used = [k for k in ("augment", "label_smoothing", "ema", "self_train") if levers.get(k)]
    rows = [["steps", f"{s['steps']:,} ({s['epochs_completed']} epochs completed)"],
            ["batch", f"{t.batch_size} x {t.grad_accum} (gradient accumulation)"],
            ["optimizer", f"AdamW, lr {t.lr:g}, weight decay {t.weight_decay:g}, {t.scheduler} schedule, "
                          f"warmup {t.warmup_ratio:g}"],
            ["max length", f"{cfg.data.max_length} tokens"],
            ["training rows", "all" if not cfg.data.max_train_rows else f"{cfg.data.max_train_rows:,}"],
            ["validation rows", f"{cfg.data.val_size:,} (stratified, carved from the training rows)"],
            ["precision", display_name(s.get("precision"))], ["device", inert(f"{s['device']} x {s['processes']}")],
            ["seed", t.seed], ["training time", f"{s['train_seconds']:.1f} s"],
            ["shift levers", inert(", ".join(f"{k}={levers[k]}" for k in used)) if used else "none"]]
    return _table(["", ""], rows)


def _results(run) -> str:
    s = run.summary
    rows = [["best validation accuracy", _f4(s.get("best_val_accuracy")), f"step {s['best_step']}"]]
    best = run.best_eval or {}
    if "val_f1_macro" in best:
        rows.append(["validation F1 (macro)", _f4(best["val_f1_macro"]), ""])
    if run.test is not None:
        n = f"{run.test['n']:,} rows"
        rows += [["test accuracy", _f4(run.test["accuracy"]), n], ["test F1 (macro)", _f4(run.test["f1_macro"]), n]]
        if "ece" in run.test:
            rows.append(["test ECE (15 bins)", f"{_f4(run.test['ece'])} -> {_f4(run.test['ece_calibrated'])}",
                         f"after temperature {run.test['temperature']:.3f} (fitted on validation)"])
    return _table(["metric", "value", ""], rows)


def _per_class(run) -> tuple[str, str]:
    if run.test and run.test.get("per_class"):
        return "test", _per_class_table(run.test)
    confusion = (run.best_eval or {}).get("val_confusion")
    if not confusion:
        return "validation", "No labelled evaluation rows."
    # the confusion matrix back to (gold, predicted) pairs: the one definition of the metrics
    gold = [g for g, row in enumerate(confusion) for p, n in enumerate(row) for _ in range(n)]
    pred = [p for row in confusion for p, n in enumerate(row) for _ in range(n)]
    return "validation", _per_class_table(compute_metrics(gold, pred, run.label_names))


def _limitations(run, robustness: dict | None) -> str:
    general = ("Trained and measured on AG News (English news agency text, 2004-2005). Texts of other "
               "styles, newer entities or machine-generated news are a shifted domain: published systems "
               "lose 6-9 points of accuracy on the course's hidden test file (half AG News test, half "
               "generated news) against their validation accuracy, and over-predict Sci/Tech there.") \
        if _ag_news(run.cfg) else \
        (f"Trained and measured on {_dataset_name(run.cfg)}. Texts unlike its training texts (other styles, "
         "sources, topics or times) are a shifted domain, where accuracy is lower than on its test rows.")
    if not robustness:
        return (general + "\n\nNo robustness report for this run yet: `agnews-lora robustness RUN "
                "--unlabelled FILE` measures it, and `agnews-lora card RUN` then adds the figures here.")
    rows = [["clean", _f4(robustness["clean"]["accuracy"]), ""]]
    rows += [[f"`{inert(p['label'])}`", _f4(p["accuracy"]), f"{100 * p['drop']:.2f}"]
             for p in robustness["perturbations"]]
    rows.append(["suite mean", _f4(robustness["suite_mean_accuracy"]), f"{100 * robustness['suite_mean_drop']:.2f}"])
    data = robustness["data"]
    parts = [general, "",
             f"Measured by `agnews-lora robustness` on {data['rows']:,} rows of `{inert(Path(data['source']).name)}` "
             f"({robustness['checkpoint']} checkpoint, {display_name(robustness.get('precision'))}):", "",
             _table(["perturbation", "accuracy", "drop (points)"], rows)]
    cal = robustness.get("calibration") or {}
    if cal.get("before"):
        parts += ["", f"Calibration on those rows: ECE {cal['before']['ece']:.4f} before and "
                      f"{cal['after']['ece']:.4f} after temperature scaling (T={cal['temperature']:.3f}, "
                      "fitted on validation)."]
    u = robustness.get("unlabelled")
    if u:
        names = run.label_names
        shares = [[n, f"{u['predicted_share'][i]:.1%}", f"{u['train_prior'][i]:.1%}"] for i, n in enumerate(names)]
        parts += ["", f"On {u['n']:,} unlabelled texts of `{inert(Path(u['source']).name)}` (signs of shift, no labels "
                      f"used): mean confidence {u['mean_confidence']:.3f}, "
                      f"{u['low_confidence_share']:.1%} below {u['threshold']:g}; predicted classes against the "
                      "training prior:", "", _table(["class", "predicted", "training prior"], shares)]
    return "\n".join(parts)


def _provenance(run, kind: str, meta: dict | None) -> str:
    rows = [["run folder", f"`{inert(run.path)}`"], ["backbone", f"`{inert(run.cfg.model.name)}`"],
            ["agnews-lora", package_version()]]
    if meta:
        quantize = f" ({meta['quantize']})" if meta.get("quantize") else ""
        rows += [["exported", inert(meta.get("created", ""))], ["format", inert(meta["format"] + quantize)],
                 ["checkpoint", inert(meta.get("checkpoint", ""))]]
    return _table(["", ""], rows)
