"""`agnews-lora SUBCOMMAND`: parse arguments, call one function, print; nothing else."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings

from agnews_lora.errors import ConfigError, UserError, finite
from agnews_lora.registry import NAMES as PEFT_METHODS
from agnews_lora.calibration import CALIBRATIONS


def at_least(low: float, kind: type = int):
    """An argparse type: a number of `kind` that is >= low (every numeric option has a range)."""

    def parse(text: str):
        try:
            value = kind(text) if kind is int else finite(text, "value")
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a finite number'}") \
                from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def finite_number(text: str) -> float:
    """An argparse type: a finite float (every float option passes errors.finite)."""
    return at_least(-float("inf"), float)(text)


def port_number(text: str) -> int:
    value = at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0..65535)")
    return value


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML file overriding the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. lora.r=12 train.lr=3e-4")


def _use_threads(threads: int | None) -> None:
    # torch's thread count is process-wide: the command sets it, not the library.
    if threads:
        import torch

        torch.set_num_threads(threads)


def _main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def cmd_train(args) -> None:
    from agnews_lora.config import load_config
    from agnews_lora.report import console_summary
    from agnews_lora.train import train
    from agnews_lora.writeup import finish_run

    run_dir = train(load_config(args.config, args.overrides))
    if _main_process():  # under accelerate launch, once
        finish_run(run_dir)
        print(console_summary(run_dir))


def cmd_distill(args) -> None:
    from agnews_lora.config import load_config
    from agnews_lora.distill import distill
    from agnews_lora.report import console_summary
    from agnews_lora.writeup import finish_run

    cfg = load_config(args.config, args.overrides)
    if args.teacher:
        cfg.distill.teacher = args.teacher  # set directly: a path is not parsed as YAML
    _kernel_cache(cfg.train.kernel_cache)  # the teacher's logits run before train() would set it
    run_dir = distill(cfg)
    if _main_process():  # under accelerate launch, once
        finish_run(run_dir)
        print(console_summary(run_dir))


def _method_names(spec: str) -> list[str]:
    """--methods: "all" or comma-separated names of PEFT_METHODS."""
    names = list(PEFT_METHODS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in PEFT_METHODS]
    if unknown or not names:
        raise ConfigError(f"--methods {spec!r}: use 'all' or some of {', '.join(PEFT_METHODS)}")
    return names


def cmd_budget(args) -> None:
    from agnews_lora.config import load_config
    from agnews_lora.data import resolve_labels
    from agnews_lora.model import budget_breakdown, format_breakdown

    if args.methods is not None and not args.plan:
        raise ConfigError("budget --methods: goes with --plan (the per-method table of largest sizes)")
    names = None if args.methods is None else _method_names(args.methods)
    cfg = resolve_labels(load_config(args.config, args.overrides))  # the head's size: the classes
    if names is not None:
        from agnews_lora.plan import format_method_plan, plan_methods, plan_to_dicts

        rows = plan_methods(cfg, names)
        print(json.dumps(plan_to_dicts(rows), indent=2) if args.json else format_method_plan(rows, cfg))
        return
    if args.plan:
        from agnews_lora.plan import format_plan, plan_budget, plan_to_dicts

        rows = plan_budget(cfg)
        print(json.dumps(plan_to_dicts(rows), indent=2) if args.json else format_plan(rows, cfg))
        return
    b = budget_breakdown(cfg)
    if args.json:
        print(json.dumps({**b.to_dict(), "max_trainable": cfg.budget.max_trainable,
                          "fits": b.total <= cfg.budget.max_trainable}, indent=2))
    else:
        if cfg.peft.method == "lora":
            print(f"{cfg.model.name}: LoRA r={cfg.lora.r} on {','.join(cfg.lora.target_modules)} "
                  f"(layers {'all' if cfg.lora.layers is None else cfg.lora.layers}), head={cfg.model.head}")
        else:
            from agnews_lora.methods import describe

            print(f"{cfg.model.name}: {describe(cfg)}, head={cfg.model.head}")
        print(format_breakdown(b, cfg.budget.max_trainable))
    if b.total > cfg.budget.max_trainable:
        sys.exit(1)


def cmd_evaluate(args) -> None:
    from agnews_lora.evaluate import format_metrics
    from agnews_lora.scoring import claim_evaluation_outputs, evaluate_folder, format_teacher_vs_student

    claim_evaluation_outputs(args.run_dir, data=args.data, output=args.output, predictions=args.predictions)
    _use_threads(args.threads)
    result = evaluate_folder(args.run_dir, data=args.data, output=args.output, batch_size=args.batch_size,
                             precision=args.precision, teacher=not args.no_teacher, progress=True,
                             threads=args.threads, predictions=args.predictions)
    clf, m = result.classifier, result.metrics
    print(format_metrics(m, clf.label_names))
    print(f"{clf.last_throughput:.1f} texts/s ({clf.info.get('format')}, {clf.precision})")
    if "teacher" in m:
        print(format_teacher_vs_student(m["teacher"], m, args.run_dir))
    print(f"saved {result.output}" + (f" and {args.predictions}" if args.predictions else ""))


def cmd_predict(args) -> None:
    from agnews_lora.data import Columns, read_files
    from agnews_lora.evaluate import compute_metrics
    from agnews_lora.predict import (RUN_PRIOR, Classifier, check_output, predict_file, probabilities_path, resolve_prior,
                                     resolve_shift_calibration)

    # before the model loads, not after every prediction
    check_output(args.output, inputs=[*args.input, *(args.reference or [])], probs=args.probs)
    _use_threads(args.threads)
    clf = Classifier.load(args.run_dir, precision=args.precision, threads=args.threads)
    try:  # the library decides (the run's predict.prior when --prior is not given), as from Python
        prior, threshold = resolve_prior(clf, args.prior or RUN_PRIOR, args.shift_threshold)
    except ConfigError as err:
        raise ConfigError(str(err).replace("shift_threshold goes with prior 'match-shifted'", "--reference and "
                          "--shift-threshold go with --prior match-shifted").replace("shift_threshold",
                                                                                    "--shift-threshold")) from None
    if args.reference and prior != "match-shifted":
        raise ConfigError("--reference and --shift-threshold go with --prior match-shifted")
    try:
        calibration = resolve_shift_calibration(clf, prior, args.shift_calibration)
    except ConfigError as err:
        raise ConfigError(str(err).replace("shift_calibration", "--shift-calibration").replace(
            "prior 'match-shifted'", "--prior match-shifted")) from None
    if args.prior is None and prior is not None:
        print(f"prior: {clf.cfg.predict.prior} (the run's predict.prior; --prior none for the training prior)")
    reference = read_files(args.reference, columns=Columns.of(clf.cfg.data), labels=False).texts \
        if args.reference else None
    split, preds = predict_file(clf, args.input, args.output, batch_size=args.batch_size, prior=prior,
                                probs=args.probs, reference=reference, shift_threshold=threshold, names=args.names,
                                reference_files=args.reference or (), shift_calibration=calibration)
    skipped = (clf.last_prior or {}).get("skipped")
    if skipped and prior in ("em", "match"):
        print(f"prior {prior}: {skipped}; nothing changed")
    if clf.last_shift is not None:
        info = clf.last_shift
        print(f"match-shifted: {info['shifted_rows']:,} of {info['rows']:,} rows scored above {info['threshold']} "
              + (f"({info['skipped']}); nothing changed" if info.get("skipped") else
                 "(shifted from the training texts); their class prior was matched, class weights "
                 + ", ".join(f"{w:.3f}" for w in info["weights"])
                 + (f"; keep-confidence: temperature {info['temperature']:.3f} on those rows, mean top probability "
                    f"{info['confidence']['matched']:.3f} as matched -> {info['confidence']['after']:.3f} "
                    f"({info['confidence']['before']:.3f} before matching)" if "temperature" in info else "")))
    print(f"wrote {len(preds):,} predictions to {args.output} ({clf.last_throughput:.1f} texts/s)")
    if args.probs:
        print(f"wrote probabilities (temperature {clf.temperature:.3f}) to {probabilities_path(args.output)}")
    if split.labels is not None:
        print(f"accuracy {compute_metrics(split.labels, preds, clf.label_names)['accuracy']:.4f}")


def cmd_export(args) -> None:
    from agnews_lora.export import export, format_parity

    out = export(args.run_dir, args.format, output=args.output, quantize=args.quantize,
                 checkpoint=args.checkpoint, parity_rows=args.parity_rows)
    print(format_parity(out))
    print(f"exported to {out}")


def cmd_serve(args) -> None:
    from agnews_lora.serve import Limits, serve

    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, max_body_bytes=args.max_body_bytes)
    serve(args.model_dir, host=args.host, port=args.port, limits=limits, precision=args.precision,
          threads=args.threads, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, prior=args.prior,
          docs=not args.no_docs)


def cmd_report(args) -> None:
    from agnews_lora.report import write_report

    for run_dir in args.run_dirs:
        print(f"wrote {write_report(run_dir)}")


def cmd_card(args) -> None:
    from agnews_lora.card import rebuild

    for folder in args.folders:
        for path in rebuild(folder):
            print(f"wrote {path}")


def cmd_compare(args) -> None:
    from agnews_lora.report import compare_runs

    table, plot = compare_runs(args.run_dirs, args.output, json_output=args.json)
    print(table)
    print(f"wrote {args.output} and {plot}" + (f" and {args.json}" if args.json else ""))


def cmd_robustness(args) -> None:
    from agnews_lora.robustness import perturbation_table, robustness_report

    if args.max_rows < 0:
        raise ConfigError(f"--max-rows must be >= 0 (0 = all rows), got {args.max_rows}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    specs = [s for s in args.perturbations.split(",") if s.strip()] if args.perturbations is not None else None
    md = robustness_report(args.run_dir, data=args.data, unlabelled=args.unlabelled, output=args.output,
                           max_rows=args.max_rows, seed=args.seed, batch_size=args.batch_size,
                           precision=args.precision, perturbations=specs, progress=True)
    result = json.loads(md.with_suffix(".json").read_text())
    print(perturbation_table(result))
    cal = result["calibration"]
    print(f"calibration: T={cal['temperature']:.4f}; ECE {cal['before']['ece']:.4f} -> {cal['after']['ece']:.4f}, "
          f"NLL {cal['before']['nll']:.4f} -> {cal['after']['nll']:.4f}")
    if result["unlabelled"] is not None:
        u = result["unlabelled"]
        print(f"unlabelled: {u['n']:,} rows, mean confidence {u['mean_confidence']:.4f}, "
              f"{u['low_confidence_share']:.1%} below {u['threshold']:g}")
    print(f"wrote {md} and {md.with_suffix('.json').name} (+ PNGs beside it)")


def cmd_sweep(args) -> None:
    from agnews_lora.config import load_config
    from agnews_lora.sweep import run_sweep

    summary = run_sweep(load_config(args.config, args.overrides), trials=args.trials, storage=args.storage,
                        study_name=args.study_name, heartbeat=args.heartbeat)
    print(summary.read_text())
    print(f"wrote {summary}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agnews-lora", description="LoRA text classification (AG News by "
                                     "default, any labelled texts with data.*) under a hard trainable-parameter "
                                     "budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA classifier (refuses over-budget configs)")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train a student from a teacher's soft labels (cached teacher logits)")
    _config_args(p)
    p.add_argument("--teacher", help="run folder of agnews-lora, or a Hugging Face sequence-classification "
                   "model folder/id (default: distill.teacher)")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("budget", help="trainable parameters per part and the budget verdict")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plan", action="store_true", help="largest rank within the budget for each common "
                   "placement (all layers, and lora.layers when set) with either head")
    p.add_argument("--methods", metavar="all|M1,M2", help="with --plan: the largest size of each PEFT method "
                   f"({', '.join(PEFT_METHODS)}) per placement and head "
                   "instead (exact counts; about a minute for all on roberta-base)")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser("report", help="report.md + PNG plots for finished run folder(s)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("card", help="rebuild the Hugging Face model card of run folder(s) (best/README.md and "
                                    "their exports) or of export folders")
    p.add_argument("folders", nargs="+", metavar="FOLDER", help="a run folder, or a folder written by export")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("compare", help="one table (and an accuracy-vs-parameters plot) for several runs; runs "
                       "that differ only in train.seed are grouped: mean and sd over seeds, paired differences")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", default="comparison.md", help="Markdown file; the PNG is written beside it")
    p.add_argument("--json", help="also write every figure (runs, recipes over seeds, paired differences) to "
                   "this JSON file")
    p.set_defaults(func=cmd_compare)

    _robustness_args(sub)

    p = sub.add_parser("sweep", help="Optuna search over sweep.space; every trial checked against the budget")
    _config_args(p)
    p.add_argument("--trials", type=at_least(1), required=True,
                   help="finished (complete or pruned) trials the study should hold, over all workers")
    p.add_argument("--storage", help="SQLAlchemy URL shared by workers, e.g. postgresql://user:pw@host/db "
                   "(default: sqlite in the sweep folder)")
    p.add_argument("--study-name", help="default: the config's name, else 'sweep'")
    p.add_argument("--heartbeat", type=at_least(1), default=60, help="seconds between heartbeats of a running trial; "
                   "a trial silent for twice as long counts as dead (FAILED, re-queued)")
    p.set_defaults(func=cmd_sweep)

    for name, func, hlp in (("evaluate", cmd_evaluate, "metrics of a run on labelled data"),
                            ("predict", cmd_predict, "write ID,Label predictions for a file")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("run_dir", help="run folder written by train, or a folder written by export")
        p.add_argument("--batch-size", type=at_least(1), default=64, help="texts per forward pass (>= 1)")
        p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
        p.add_argument("--threads", type=at_least(1), help="CPU threads (default: one per physical core)")
        if name == "evaluate":
            p.add_argument("--data", nargs="+", help="labelled file(s); default: the run's test data")
            p.add_argument("--output", help="metrics JSON (default RUN_DIR/eval.json)")
            p.add_argument("--no-teacher", action="store_true", help="distilled runs: skip scoring the teacher")
            p.add_argument("--predictions", help="also write FILE.npz: every row's gold label and logits, in file "
                           "order (train writes RUN_DIR/test_predictions.npz for its test rows; paired "
                           "comparisons of runs read it)")
        else:
            p.add_argument("--input", nargs="+", required=True, help="CSV/TSV/JSON(L) (.gz too), parquet or pickle "
                           "file(s), save_to_disk folders, or hf:NAME[:CONFIG[:SPLIT]] (default split: test); "
                           "a pickle may hold only a datasets.Dataset, DataFrame, dict of columns, list of "
                           "texts or numpy arrays (anything else is refused, never run)")
            p.add_argument("--output", required=True, help="CSV to write (ID,Label); never an input file "
                           "or a path inside a run or model folder")
            p.add_argument("--names", action="store_true", help="write each row's class name in the Label column "
                           "instead of its class id")
            p.add_argument("--probs", action="store_true", help="also write OUTPUT_STEM.probs.csv: ID and one "
                           "probability per class (softmax at the run's temperature fitted on validation)")
            p.add_argument("--prior", help="correct predictions to another class prior: 'em' (re-estimated on the "
                           "input rows, Saerens et al. 2002), 'match' (re-weight the classes so that the input's "
                           "mean probability is the training prior), 'match-shifted' (the same on the rows a "
                           "domain classifier finds shifted away from the training texts only), 'uniform', or "
                           "shares per class, e.g. 0.2,0.3,0.2,0.3; 'none': the training prior (default: the run's "
                           "predict.prior, empty = the training prior)")
            p.add_argument("--reference", nargs="+", help="--prior match-shifted: texts of the training "
                           "distribution (default: the run's training rows)")
            p.add_argument("--shift-threshold", type=finite_number, help="--prior match-shifted: rows whose shift "
                           "score is above this are matched (default: the run's predict.shift_threshold, 0.6)")
            p.add_argument("--shift-calibration", choices=CALIBRATIONS, help="--prior "
                           "match-shifted: 'keep-confidence' puts a temperature on the matched rows that gives them "
                           "back their mean top probability from before matching (labels unchanged); 'none': as "
                           "matched (default: the run's predict.shift_calibration)")
        p.set_defaults(func=func)
    _export_and_serve_args(sub)
    return parser


def _robustness_args(sub) -> None:
    p = sub.add_parser("robustness", help="shift report: accuracy under perturbations, calibration, signs "
                       "of shift on an unlabelled file (robustness.md + .json + PNGs)")
    p.add_argument("run_dir", help="run folder written by train")
    p.add_argument("--data", nargs="+", help="labelled file(s); default: the run's test data")
    p.add_argument("--unlabelled", nargs="+", help="file(s) to look for shift in, e.g. the hidden test file "
                   "(labels in them are ignored)")
    p.add_argument("--output", help="folder for robustness.md, robustness.json and the PNGs (default RUN_DIR)")
    p.add_argument("--max-rows", type=int, default=0, help="stratified, seeded subset of the labelled rows; "
                   "the suite scores 9x this many texts (default 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and of the perturbations")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--perturbations", help="comma-separated NAME or NAME:VALUE replacing the fixed suite, "
                   "e.g. typos:0.1,lowercase")
    p.set_defaults(func=cmd_robustness)


def _export_and_serve_args(sub) -> None:
    p = sub.add_parser("export", help="merged transformers folder or ONNX (fp32/int8), parity-checked")
    p.add_argument("run_dir", help="run folder written by train")
    p.add_argument("--format", required=True, choices=["merged", "onnx"])
    p.add_argument("--quantize", choices=["int8"], help="ONNX only: dynamic int8 quantization")
    p.add_argument("--output", help="folder to write (default RUN_DIR/export/FORMAT[-int8])")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--parity-rows", type=at_least(0), default=1000, help="rows of the run's test data the export "
                   "is checked on (besides a few built-in texts)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP service: demo page at /, POST /predict, GET /health, GET /info")
    p.add_argument("model_dir", help="run folder, or a folder written by export")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (0..65535)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=at_least(1), help="CPU threads (default: one per physical core)")
    p.add_argument("--max-texts", type=at_least(1), default=64, help="texts per request")
    p.add_argument("--max-chars", type=at_least(1), default=10_000, help="characters per text")
    p.add_argument("--max-body-bytes", type=at_least(1), default=1_000_000, help="request body size")
    p.add_argument("--max-batch", type=at_least(1), default=64, help="most texts per micro-batched model call")
    p.add_argument("--max-wait-ms", type=at_least(0.0, float), default=5.0, help="micro-batching window")
    p.add_argument("--no-docs", action="store_true", help="do not serve the interactive API docs "
                   "(/docs, /redoc, /openapi.json; served by default)")
    p.add_argument("--prior", help="correct probabilities to this class prior: 'uniform' or shares per class "
                   "(e.g. 0.2,0.3,0.2,0.3); default: the training prior")
    p.set_defaults(func=cmd_serve)


def _kernel_cache(capacity: int) -> None:
    from agnews_lora.speed import set_kernel_cache

    set_kernel_cache(capacity)


@contextlib.contextmanager
def _quiet_libraries():
    """For one command: no FutureWarnings (the libraries' deprecation notes are not the user's
    to act on) and transformers' errors only, no progress bars; all restored afterwards."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            yield
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """The `agnews-lora` entry point: run one subcommand; a user error prints one line, exit 2.

    Process-wide settings are made here, for the command's process, not on import: the larger
    oneDNN kernel cache for every command that runs a model (train and sweep set it through
    `train.kernel_cache` instead, so that the flag decides), the thread count of --threads, and
    quieter libraries for the command's duration.
    """
    from agnews_lora.config import TrainConfig

    args = build_parser().parse_args(argv)
    if args.command in ("evaluate", "predict", "serve", "export"):
        _kernel_cache(TrainConfig().kernel_cache)
    with _quiet_libraries():
        try:
            args.func(args)
        except UserError as err:  # one line, exit 2: the message says what to do
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
