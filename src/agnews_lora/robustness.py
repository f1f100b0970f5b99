"""Shift report: a run under perturbed text, its calibration, and what an unlabelled batch looks
like to it -> robustness.md + robustness.json + PNG plots.

robustness.json is the source of every figure in robustness.md and of every plot (histograms are
stored as edges and counts), so scripts read the JSON and never parse the Markdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from agnews_lora.calibration import em_prior, expected_calibration_error, fit_temperature, nll, reliability, softmax
from agnews_lora import runs
from agnews_lora.config import Config, ConfigError
from agnews_lora.data import Columns, Split, load_splits, load_test_split, read_files, stratified_indices
from agnews_lora.outputs import claim_file
from agnews_lora.perturb import PERTURBATIONS, SUITE, Spec, parse_specs, perturb_texts
from agnews_lora.card import rebuild
from agnews_lora.checkpoint import atomic_write_json, atomic_write_text
from agnews_lora.evaluate import compute_metrics
from agnews_lora.predict import Classifier, load_run_config
from agnews_lora.report import _f4, _figure, _save, md_table

ECE_BINS = 15  # Guo et al. 2017
HIST_BINS = 20
PLOTS = {"perturbations": "robustness_perturbations.png", "reliability": "robustness_reliability.png",
         "classes": "robustness_classes.png", "confidence": "robustness_confidence.png",
         "entropy": "robustness_entropy.png", "length": "robustness_length.png"}


@dataclass
class Inputs:
    """Every row the report scores, read before the model is loaded (bad files fail fast)."""

    labelled: Split
    rows: list[int]  # each labelled row's index in its file: its perturbation generator's seed
    rows_in_file: int
    train: Split
    val: Split
    unlabelled: Split | None


def resolve_suite(perturbations: Sequence[str] | None) -> list[Spec]:
    """The perturbations to run: `perturb.SUITE`, or specs like `typos:0.1` (ConfigError if bad)."""
    if perturbations is None:
        return list(SUITE)
    try:
        specs = parse_specs(perturbations, key="perturbations")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not specs:
        raise ConfigError(f"perturbations: give at least one; valid: {', '.join(PERTURBATIONS)}")
    return specs


def _check_args(max_rows: int, batch_size: int, low_confidence: float, seed: int) -> None:
    if not 0 <= seed < 2**32:  # the seeds numpy and scikit-learn accept
        raise ConfigError(f"seed must be an integer in 0..{2**32 - 1}, got {seed}")
    if max_rows < 0:
        raise ConfigError(f"max_rows must be >= 0 (0 = all rows), got {max_rows}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < low_confidence < 1:
        raise ConfigError(f"low_confidence must be in (0, 1), got {low_confidence}")


def load_inputs(cfg: Config, data: Sequence[str] | None, unlabelled: Sequence[str] | None, max_rows: int,
                seed: int) -> Inputs:
    """Read the labelled rows (`data`, default the run's test data), the run's own train/validation
    split (the same seeded carve as training) and the unlabelled file(s).

    Args:
        cfg: the run's config.
        data: labelled file(s); None: the run's data.test (the Hub test split when it has none).
        unlabelled: file(s) whose labels, if any, are ignored; None: no unlabelled section.
        max_rows: a stratified, seeded subset of this many labelled rows; 0 = all.
        seed: the subset's seed.

    Returns:
        The Inputs.
    """
    labelled = load_test_split(cfg.data, cfg.data.labels, files=data or ())
    if labelled is None:
        raise ConfigError("robustness: the run has no test data; pass labelled rows (--data FILE)")
    if labelled.labels is None:
        raise ConfigError(f"robustness: {labelled.source} has no labels; the perturbation suite needs "
                          "labelled rows (unlabelled rows go to `unlabelled`)")
    rows = list(range(len(labelled)))
    if 0 < max_rows < len(labelled):
        _, rows = stratified_indices(labelled.labels, size=max_rows, seed=seed)
    other = read_files(unlabelled, names=cfg.data.labels, columns=Columns.of(cfg.data)) if unlabelled else None
    train, val, _ = load_splits(cfg.data, seed=cfg.train.seed, num_labels=cfg.model.num_labels)
    return Inputs(labelled=labelled.subset(rows), rows=rows, rows_in_file=len(labelled), train=train, val=val,
                  unlabelled=other)


def score(clf, inputs: Inputs, specs: Sequence[Spec], seed: int, batch_size: int,
          progress: bool = False) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Logits for the clean rows, each perturbed copy, the validation rows and the unlabelled rows,
    from one `predict_logits` call (its length-sorted batches then span every variant).

    Returns:
        ({"clean", "val", "unlabelled", "variants": [n_specs, n, classes]}, the perturbed texts).
    """
    clean = inputs.labelled.texts
    variants = [perturb_texts(clean, spec, seed=seed, rows=inputs.rows) for spec in specs]
    other = inputs.unlabelled.texts if inputs.unlabelled is not None else []
    logits = clf.predict_logits([*clean, *(t for v in variants for t in v), *inputs.val.texts, *other],
                                batch_size=batch_size, progress=progress)
    n, k, v = len(clean), len(specs), len(inputs.val)
    return {"clean": logits[:n], "variants": logits[n : n * (k + 1)].reshape(k, n, -1),
            "val": logits[n * (k + 1) : n * (k + 1) + v], "unlabelled": logits[n * (k + 1) + v :]}, variants


def _headline(labels: Sequence[int], logits: np.ndarray, names: Sequence[str]) -> dict:
    m = compute_metrics(labels, logits.argmax(-1).tolist(), names)
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "n": m["n"]}


def shift_section(labels: Sequence[int], logits: dict, clean_texts: Sequence[str],
                  variants: Sequence[Sequence[str]], specs: Sequence[Spec], names: Sequence[str]) -> dict:
    """Clean metrics and, per perturbation, its metrics and drop (clean - perturbed)."""
    clean = _headline(labels, logits["clean"], names)
    rows = []
    for spec, texts, variant_logits in zip(specs, variants, logits["variants"]):
        m = _headline(labels, variant_logits, names)
        param = PERTURBATIONS[spec.name].param
        rows.append({"name": spec.name, "label": spec.label, "value": spec.value,
                     "setting": "" if param == "unused" else f"{param} {spec.value:g}",
                     "accuracy": m["accuracy"], "f1_macro": m["f1_macro"],
                     "drop": clean["accuracy"] - m["accuracy"], "f1_drop": clean["f1_macro"] - m["f1_macro"],
                     "changed_share": float(np.mean([a != b for a, b in zip(clean_texts, texts)]))})
    mean = float(np.mean([r["accuracy"] for r in rows]))
    return {"clean": clean, "perturbations": rows, "suite_mean_accuracy": mean,
            "suite_mean_drop": clean["accuracy"] - mean}


def _no_nan(values: Sequence[float]) -> list[float | None]:
    # Empty bins are NaN; JSON has no NaN, so they become null.
    return [None if v is None or np.isnan(v) else float(v) for v in values]


def _calibration_at(logits: np.ndarray, labels: Sequence[int], temperature: float) -> dict:
    probs = softmax(logits, temperature)
    r = reliability(probs, labels, bins=ECE_BINS)
    return {"ece": expected_calibration_error(probs, labels, bins=ECE_BINS), "nll": nll(logits, labels, temperature),
            "accuracy": float((probs.argmax(-1) == np.asarray(labels)).mean()),
            "reliability": {"edges": r["edges"], "count": r["count"], "confidence": _no_nan(r["confidence"]),
                            "accuracy": _no_nan(r["accuracy"])}}


def calibration_section(val_logits: np.ndarray, val_labels: Sequence[int], logits: np.ndarray,
                        labels: Sequence[int]) -> dict:
    """Temperature fitted on the validation rows; ECE, NLL, accuracy and reliability bins on the
    labelled rows before (T = 1) and after it. No validation rows: T = 1."""
    temperature = fit_temperature(val_logits, val_labels)
    return {"temperature": temperature, "fitted_on": "validation", "fit_rows": len(val_labels),
            "bins": ECE_BINS, "n": len(labels), "before": _calibration_at(logits, labels, 1.0),
            "after": _calibration_at(logits, labels, temperature)}


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, in nats (0 = certain, ln(classes) = uniform)."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(p)).sum(-1)


def _confidence_stats(probs: np.ndarray, threshold: float) -> dict:
    conf = probs.max(-1)
    return {"mean_confidence": float(conf.mean()), "low_confidence_share": float((conf < threshold).mean()),
            "mean_entropy": float(entropy(probs).mean())}


def _lengths(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))


def _length_stats(lengths: np.ndarray) -> dict:
    return {"median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
            "mean": float(lengths.mean())}


def _counts(values: np.ndarray, edges: np.ndarray) -> list[int]:
    # Clipped into the range, so the last length bin holds the longest 1% instead of losing it.
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0].tolist()


def _histograms(after: np.ndarray, before: np.ndarray, reference: np.ndarray, lengths: np.ndarray,
                train_lengths: np.ndarray) -> dict:
    """Edges and counts behind the confidence, entropy and length plots."""
    k = after.shape[-1]
    conf_edges, ent_edges = np.linspace(1 / k, 1, HIST_BINS + 1), np.linspace(0, np.log(k), HIST_BINS + 1)
    top = max(np.percentile(lengths, 99), np.percentile(train_lengths, 99))
    len_edges = np.linspace(0, max(top, 2), 31)
    return {"confidence": {"edges": conf_edges.tolist(), "before": _counts(before.max(-1), conf_edges),
                           "after": _counts(after.max(-1), conf_edges),
                           "reference": _counts(reference.max(-1), conf_edges)},
            "entropy": {"edges": ent_edges.tolist(), "after": _counts(entropy(after), ent_edges),
                        "reference": _counts(entropy(reference), ent_edges)},
            "length_words": {"edges": len_edges.tolist(), "unlabelled": _counts(lengths, len_edges),
                             "train": _counts(train_lengths, len_edges)}}


def unlabelled_section(split: Split, logits: np.ndarray, reference_logits: np.ndarray, train: Split,
                       temperature: float, threshold: float) -> dict:
    """Signs of shift without labels: predicted classes against the training prior (raw and after
    EM prior correction), confidence and entropy (temperature-scaled; `before_temperature` and the
    labelled rows as `reference` beside them) and text length against the training rows."""
    k = logits.shape[-1]
    probs, reference = softmax(logits, temperature), softmax(reference_logits, temperature)
    train_prior = np.bincount(train.labels, minlength=k) / max(len(train), 1)
    out = {"source": split.source, "n": len(split), "labels_ignored": split.labels is not None,
           "probabilities": f"temperature-scaled (T={temperature:.4f})", "threshold": threshold,
           "predicted_share": (np.bincount(probs.argmax(-1), minlength=k) / len(split)).tolist(),
           "train_prior": train_prior.tolist(), "predicted_share_em": None, "estimated_prior_em": None,
           **_confidence_stats(probs, threshold),
           "before_temperature": _confidence_stats(softmax(logits), threshold),
           "reference": _confidence_stats(reference, threshold)}
    if (train_prior > 0).all():  # Bayes' rule divides by the training prior
        adjusted, prior = em_prior(probs, train_prior)
        out["predicted_share_em"] = (np.bincount(adjusted.argmax(-1), minlength=k) / len(split)).tolist()
        out["estimated_prior_em"] = prior.tolist()
    lengths, train_lengths = _lengths(split.texts), _lengths(train.texts)
    out["length_words"], out["train_length_words"] = _length_stats(lengths), _length_stats(train_lengths)
    out["histograms"] = _histograms(probs, softmax(logits), reference, lengths, train_lengths)
    return out


# ---------------------------------------------------------------- plots


def plot_perturbations(result: dict, path: Path) -> None:
    """Accuracy under each perturbation (bars) against the clean accuracy (line)."""
    rows = result["perturbations"]
    fig, ax = _figure(7, 0.9 + 0.35 * len(rows))
    ax.barh([r["label"] for r in rows][::-1], [r["accuracy"] for r in rows][::-1], color="tab:orange")
    ax.axvline(result["clean"]["accuracy"], color="black", linestyle="--",
               label=f"clean {result['clean']['accuracy']:.4f}")
    ax.set(xlabel="accuracy", xlim=(0, 1), title=f"Accuracy under perturbation ({result['clean']['n']:,} rows)")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_reliability(calibration: dict, path: Path) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, before and after T."""
    fig, ax = _figure(5.5, 5)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
    for key, label in (("before", "before (T=1)"), ("after", f"after (T={calibration['temperature']:.3f})")):
        r, ece = calibration[key]["reliability"], calibration[key]["ece"]
        pts = [(c, a) for c, a in zip(r["confidence"], r["accuracy"]) if c is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{label}, ECE {ece:.4f}")
    ax.set(xlabel="mean confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
           title=f"Reliability ({calibration['bins']} bins, {calibration['n']:,} rows)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def plot_classes(names: Sequence[str], shift: dict, path: Path) -> None:
    """Predicted class shares of the unlabelled rows (raw, after prior correction) vs the training prior."""
    bars = [("predicted", shift["predicted_share"]), ("predicted after EM prior correction",
                                                      shift["predicted_share_em"]),
            ("training prior", shift["train_prior"])]
    bars = [(label, v) for label, v in bars if v is not None]
    x, width = np.arange(len(names)), 0.8 / len(bars)
    fig, ax = _figure(6.5, 3.8)
    for i, (label, values) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width=width, label=label)
    ax.set_xticks(x, names)
    ax.set(ylabel="share of rows", title=f"Classes: {shift['n']:,} unlabelled rows vs training")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_histograms(hist: dict, series: Sequence[tuple[str, str]], xlabel: str, title: str, path: Path,
                    threshold: float | None = None) -> None:
    """Share of rows per bin for each (key, label) in `series`, as outline histograms."""
    edges = np.asarray(hist["edges"])
    fig, ax = _figure(6.5, 3.8)
    for key, label in series:
        counts = np.asarray(hist[key], dtype=float)
        ax.stairs(counts / max(counts.sum(), 1), edges, label=label, linewidth=1.5)
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", linewidth=1, label=f"low confidence < {threshold:g}")
    ax.set(xlabel=xlabel, ylabel="share of rows", title=title)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_plots(result: dict, folder: Path) -> None:
    """Every PNG of the report, drawn from the result dict alone."""
    plot_perturbations(result, folder / PLOTS["perturbations"])
    plot_reliability(result["calibration"], folder / PLOTS["reliability"])
    shift = result["unlabelled"]
    if shift is None:
        return
    plot_classes(result["label_names"], shift, folder / PLOTS["classes"])
    h, t = shift["histograms"], result["calibration"]["temperature"]
    plot_histograms(h["confidence"], [("before", "unlabelled, T=1"), ("after", f"unlabelled, T={t:.3f}"),
                                      ("reference", f"labelled rows, T={t:.3f}")],
                    xlabel="confidence (top probability)", title="Confidence", path=folder / PLOTS["confidence"],
                    threshold=shift["threshold"])
    plot_histograms(h["entropy"], [("after", "unlabelled"), ("reference", "labelled rows")],
                    xlabel=f"entropy (nats, T={t:.3f})", title="Prediction entropy", path=folder / PLOTS["entropy"])
    plot_histograms(h["length_words"], [("unlabelled", "unlabelled"), ("train", "training rows")],
                    xlabel="words per text", title="Text length", path=folder / PLOTS["length"])


# ---------------------------------------------------------------- markdown


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def perturbation_table(result: dict) -> str:
    """Clean first, then one row per perturbation; drops in points (positive: worse than clean)."""
    c = result["clean"]
    rows = [["clean", "", "-", _f4(c["accuracy"]), "", _f4(c["f1_macro"]), ""]]
    rows += [[f"`{r['label']}`", r["setting"], f"{r['changed_share']:.1%}", _f4(r["accuracy"]), _points(r["drop"]),
              _f4(r["f1_macro"]), _points(r["f1_drop"])] for r in result["perturbations"]]
    return md_table(["Perturbation", "Setting", "Rows changed", "Accuracy", "Drop (points)", "F1 (macro)",
                     "F1 drop (points)"], rows, align="llrrrrr")


def _calibration_md(cal: dict) -> list[str]:
    fit = (f"fitted on the run's {cal['fit_rows']:,} validation rows" if cal["fit_rows"]
           else "the run has no validation rows, so T = 1")
    rows = [["before (T = 1)", _f4(cal["before"]["ece"]), _f4(cal["before"]["nll"]), _f4(cal["before"]["accuracy"])],
            [f"after (T = {cal['temperature']:.4f})", _f4(cal["after"]["ece"]), _f4(cal["after"]["nll"]),
             _f4(cal["after"]["accuracy"])]]
    return ["## Calibration", "", f"On the {cal['n']:,} clean labelled rows; temperature {fit} (NLL minimised). "
            f"ECE: {cal['bins']} equal-width confidence bins.", "",
            md_table(["", f"ECE ({cal['bins']} bins)", "NLL", "Accuracy"], rows), "",
            f"![reliability diagram]({PLOTS['reliability']})", ""]


def _shares(values: list[float] | None, i: int) -> str:
    return "-" if values is None else f"{values[i]:.1%}"


def _unlabelled_md(names: Sequence[str], u: dict) -> list[str]:
    classes = [[n, _shares(u["predicted_share"], i), _shares(u["predicted_share_em"], i),
                _shares(u["estimated_prior_em"], i), _shares(u["train_prior"], i)] for i, n in enumerate(names)]
    b, r = u["before_temperature"], u["reference"]
    signs = [["mean confidence", _f4(u["mean_confidence"]), _f4(b["mean_confidence"]), _f4(r["mean_confidence"])],
             [f"low confidence (top probability < {u['threshold']:g})", f"{u['low_confidence_share']:.1%}",
              f"{b['low_confidence_share']:.1%}", f"{r['low_confidence_share']:.1%}"],
             ["mean entropy (nats)", _f4(u["mean_entropy"]), _f4(b["mean_entropy"]), _f4(r["mean_entropy"])]]
    lw, tw = u["length_words"], u["train_length_words"]
    lengths = [[k, f"{lw[k]:.1f}", f"{tw[k]:.1f}"] for k in ("median", "p95", "mean")]
    ignored = " Its labels were ignored." if u["labels_ignored"] else ""
    if u["estimated_prior_em"] is None:
        missing = ", ".join(n for n, share in zip(names, u["train_prior"]) if share == 0)
        ignored += f" No EM prior correction: no training rows of {missing}."
    return ["## Unlabelled rows: signs of shift", "",
            f"`{u['source']}`: {u['n']:,} rows.{ignored} Probabilities are {u['probabilities']} unless marked T = 1; "
            "the labelled rows above are the in-domain reference. EM: Saerens et al. (2002), on the "
            "temperature-scaled probabilities.", "",
            md_table(["Class", "Predicted", "Predicted after EM prior correction", "Estimated prior (EM)",
                      "Training prior"], classes), "", f"![classes]({PLOTS['classes']})", "",
            md_table(["", "unlabelled", "unlabelled, T = 1", "labelled rows"], signs), "",
            f"![confidence]({PLOTS['confidence']}) ![entropy]({PLOTS['entropy']})", "",
            md_table(["words per text", "unlabelled", "training rows"], lengths), "",
            f"![length]({PLOTS['length']})", ""]


def render_markdown(result: dict) -> str:
    """robustness.md from the result dict."""
    d = result["data"]
    subset = (f"a stratified subset (seed {d['seed']}) of {d['rows']:,} of its {d['rows_in_file']:,} rows"
              if d["rows"] < d["rows_in_file"] else f"all {d['rows']:,} rows")
    parts = [f"# Robustness and shift: {Path(result['run']).name}", "",
             f"Run `{result['run']}` ({result['checkpoint']} checkpoint, {result['precision']}); labelled rows: "
             f"`{d['source']}`, {subset}. Perturbations are seeded per row (seed {d['seed']}).", "",
             "## Perturbations", "", perturbation_table(result), "",
             f"Suite mean accuracy {result['suite_mean_accuracy']:.4f} "
             f"({_points(result['suite_mean_drop'])} points against clean).", "",
             f"![accuracy under perturbation]({PLOTS['perturbations']})", ""]
    parts += _calibration_md(result["calibration"])
    if result["unlabelled"] is None:
        parts += ["## Unlabelled rows", "", "None given (`unlabelled` / `--unlabelled FILE`).", ""]
    else:
        parts += _unlabelled_md(result["label_names"], result["unlabelled"])
    return "\n".join(parts)


# ---------------------------------------------------------------- the report


def robustness_report(run_dir: str | Path, data: Sequence[str] | None = None, unlabelled: Sequence[str] | None = None,
                      output: str | Path | None = None, max_rows: int = 0, seed: int = 0, batch_size: int = 64,
                      precision: str = "auto", perturbations: Sequence[str] | None = None,
                      low_confidence: float = 0.5, progress: bool = False) -> Path:
    """Write robustness.md, robustness.json and the PNGs for a run.

    Args:
        run_dir: a run folder written by `train` (its best checkpoint is scored).
        data: labelled file(s) for the perturbation suite and calibration; default the run's test data.
        unlabelled: file(s) to look for shift in (labels in them are ignored); None: no such section.
        output: folder to write into; default `run_dir`.
        max_rows: score a stratified, seeded subset of this many labelled rows; 0 = all.
        seed: seed of the subset and of the perturbations.
        batch_size: texts per model call.
        precision: "auto", "bf16" or "fp32" (see `Classifier.load`).
        perturbations: specs such as ["typos:0.1", "lowercase"]; default `perturb.SUITE`.
        low_confidence: a prediction whose top probability is below this counts as low-confidence.
        progress: show a progress bar while predicting.

    Returns:
        The path of robustness.md. Written into the run folder, the run's model cards (best/ and
        its exports) are rebuilt to report the figures.
    """
    specs = resolve_suite(perturbations)
    _check_args(max_rows, batch_size, low_confidence, seed)
    folder = claim_outputs(run_dir, output=output, inputs=[*(data or []), *(unlabelled or [])])
    inputs = load_inputs(load_run_config(run_dir), data=data, unlabelled=unlabelled, max_rows=max_rows, seed=seed)
    clf = Classifier.load(run_dir, precision=precision)
    logits, variants = score(clf, inputs, specs, seed=seed, batch_size=batch_size, progress=progress)
    result = build_result(run_dir, clf=clf, inputs=inputs, logits=logits, variants=variants, specs=specs,
                          max_rows=max_rows, seed=seed, low_confidence=low_confidence)
    folder.mkdir(parents=True, exist_ok=True)
    write_plots(result, folder)
    atomic_write_json(folder / runs.ROBUSTNESS_JSON, result)
    atomic_write_text(folder / runs.ROBUSTNESS, render_markdown(result))
    if folder.resolve() == Path(run_dir).resolve() and (folder / runs.SUMMARY).is_file():
        rebuild(run_dir)  # the model cards' limitations now report these figures
    return folder / runs.ROBUSTNESS


def claim_outputs(run_dir: str | Path, output: str | Path | None, inputs: Sequence[str | Path]) -> Path:
    """Check, before any scoring, every file `robustness_report` writes (outputs.claim_file):
    robustness.md, robustness.json and the PNGs, in the run folder or in `output`.

    Returns:
        The folder to write into.

    Raises:
        OutputRefused: `output` is a file, another run's folder, a checkpoint, an input, or a
            folder holding files of those names that the tool did not write.
    """
    folder = Path(output).expanduser() if output else Path(run_dir)
    owned = (runs.ROBUSTNESS, runs.ROBUSTNESS_JSON, *PLOTS.values())
    for name, kind in ((runs.ROBUSTNESS, "markdown"), (runs.ROBUSTNESS_JSON, "json"),
                       *((png, "png") for png in PLOTS.values())):
        claim_file(folder / name, kind=kind, label="--output" if output else "robustness", inputs=inputs,
                   owner=run_dir, owned=owned)
    return folder


def build_result(run_dir: str | Path, clf, inputs: Inputs, logits: dict, variants: list[list[str]],
                 specs: Sequence[Spec], max_rows: int, seed: int, low_confidence: float) -> dict:
    """The JSON document: every number of the report."""
    labels, names = inputs.labelled.labels, clf.label_names
    result = {"run": str(run_dir), "checkpoint": "best", "precision": clf.precision, "label_names": list(names),
              "data": {"source": inputs.labelled.source, "rows": len(inputs.labelled),
                       "rows_in_file": inputs.rows_in_file, "max_rows": max_rows, "seed": seed},
              **shift_section(labels, logits, inputs.labelled.texts, variants, specs, names),
              "calibration": calibration_section(logits["val"], inputs.val.labels, logits["clean"], labels),
              "unlabelled": None, "plots": {}}
    if inputs.unlabelled is not None:
        result["unlabelled"] = unlabelled_section(inputs.unlabelled, logits["unlabelled"], logits["clean"],
                                                  inputs.train, temperature=result["calibration"]["temperature"],
                                                  threshold=low_confidence)
    keys = ["perturbations", "reliability"] + (["classes", "confidence", "entropy", "length"]
                                               if inputs.unlabelled is not None else [])
    result["plots"] = {k: PLOTS[k] for k in keys}
    return result
