#!/usr/bin/env python3
"""Which levers move accuracy on the hidden (shifted) test file? The plain cpu-minilm recipe
against each lever alone and against a combination, same rows, steps and seed for every arm.

    python experiments/shift_levers.py --stage screen    # each lever alone, 10,000 rows (625 steps)
    python experiments/shift_levers.py --stage final     # plain vs the combination, the full recipe
    python experiments/shift_levers.py --stage screen --score-only   # rebuild the table

Every arm starts from configs/cpu-minilm.yaml (MiniLM stand-in, LoRA r=16 on q,k,v,dense, 1 epoch,
batch 16, lr 5e-4, seed 42) with validation every `eval_every` steps for all arms (so that
train.select has checkpoints to choose from). Arms differ only in the lever's keys. Each finished
run is then scored on:
  - AG News test (all 7,600 rows; the run's own test_metrics.json) and ECE before/after the
    temperature fitted on validation;
  - the robustness suite (perturb.SUITE) on a fixed stratified 2,000 of the test rows
    (`agnews-lora robustness --max-rows 2000`);
  - the hidden file (8,000 texts): its 300 labelled generated rows (generated_dev_labels.csv), its
    AG News half scored by matching the texts against test.csv (measuring only: the tool itself
    never sees those labels), the predicted class shares and mean confidence on each half.
  Prediction-time levers (temperature, EM prior correction over the whole hidden file) are
  scored on the plain arm's model without retraining.

How the 300 labelled rows are used: to choose the combination from the screen (development), and
reported beside AG News test and the perturbation suite, which nothing was tuned on. Self-training
arms read the hidden file's texts (never labels); 4,000 of them are AG News test texts, so their
AG News test figure is transductive (stated in the table).

Every arm is planned before any trains (exact trainable count, its run folder; agnews_lora.study)
and trained by `agnews-lora train` in a child process. Resumable: an arm whose folder holds
summary.json is not retrained; one with a checkpoint resumes (train.resume=true); one interrupted
before its first checkpoint restarts; a finished arm trained with other settings is an error. Scores
are cached per run in shift_scores.json. Writes docs/results/generated/shift_levers_<stage>.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from agnews_lora import study
from agnews_lora.perturb import SUITE

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HIDDEN = SHARED / "data" / "hidden" / "test_unlabelled.csv.gz"
HIDDEN_DEV = SHARED / "data" / "hidden" / "generated_dev_labels.csv"
TEST = SHARED / "data" / "ag_news" / "test.csv.gz"
AUGMENT = "[typos:0.05,delete_words:0.15,shuffle_words:3,replace_entities:0.5,lowercase]"
SELF_TRAIN = [f"data.unlabelled={HIDDEN}", "self_train.threshold=0.9"]
ARMS = {  # name -> overrides on configs/cpu-minilm.yaml
    "plain": [],
    "augment": [f"data.augment={AUGMENT}", "data.augment_prob=0.5"],
    "label_smoothing": ["train.label_smoothing=0.1"],
    "ema": ["train.ema=0.995"],
    "select_perturbed": ["train.select=perturbed_val_accuracy"],
    "self_train": SELF_TRAIN,
    # one round on the pseudo-labels of the matched (match-shifted, keep-confidence) probabilities
    "self_train_matched": SELF_TRAIN + ["self_train.prior=match-shifted", "predict.shift_calibration=keep-confidence"],
}
STAGES = {"screen": {"rows": 10000, "eval_every": 125, "suite_rows": 1000, "arms": list(ARMS)},
          "final": {"rows": 40000, "eval_every": 500, "suite_rows": 2000, "arms": ["plain", "combined"]}}


def combined_overrides() -> list[str]:
    """The combination: augmentation, weight averaging and self-training on the hidden texts
    (the screen ran beside it, see docs/results/generated/shift_levers_screen.md and docs/results/shift.md)."""
    return ARMS["augment"] + ARMS["ema"] + SELF_TRAIN


def arm_row(arm: str, overrides: list[str], out: Path, stage: dict) -> study.Row:
    """One arm as a study row: configs/cpu-minilm.yaml with the stage's rows and validation steps,
    then the lever's keys."""
    return study.Row(arm, (f"name={arm}", f"out_dir={out / arm}", f"data.max_train_rows={stage['rows']}",
                           f"train.eval_every={stage['eval_every']}", "train.progress=false", *overrides),
                     config=str(ROOT / "configs" / "cpu-minilm.yaml"))


def read_hidden() -> tuple[list[str], dict[int, int], dict[int, int]]:
    """Hidden texts; the 300 labelled generated rows; the AG News rows' test labels by matching
    text (for measuring only)."""
    from agnews_lora.data import read_file

    texts = read_file(HIDDEN).texts
    with open(HIDDEN_DEV) as fh:
        dev = {int(r["id"]): int(r["label"]) for r in csv.DictReader(fh)}
    test = read_file(TEST)
    by_text = {t: y for t, y in zip(test.texts, test.labels)}
    ag = {i: by_text[t] for i, t in enumerate(texts) if t in by_text}
    return texts, dev, ag


def score_run(run: Path, hidden: tuple, prior_arms: bool, unlabelled_report: bool, max_rows: int) -> dict:
    """Every figure of the table for one run (cached in RUN/shift_scores.json); with
    `unlabelled_report`, robustness.md also shows the hidden file's signs of shift."""
    cache = run / "shift_scores.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from agnews_lora.calibration import em_prior, softmax
    from agnews_lora.predict import Classifier
    from agnews_lora.runs import RunFolder

    robust = _robustness(run, unlabelled_report, max_rows)
    folder = RunFolder(run)
    summary, test = folder.summary(), folder.test_metrics()
    texts, dev, ag = hidden
    clf = Classifier.load(run)
    logits = clf.predict_logits(texts, batch_size=64)
    t = summary["calibration"]["temperature"]
    variants = {"": softmax(logits)}
    if prior_arms:
        variants["+EM prior"] = em_prior(softmax(logits, t), summary["class_prior"])[0]
    out = {}
    for suffix, probs in variants.items():
        out[suffix] = _hidden_figures(probs, dev, ag)
    common = {"test_accuracy": test["accuracy"], "test_ece": test["ece"], "test_ece_calibrated": test["ece_calibrated"],
              "suite_mean_accuracy": robust["suite_mean_accuracy"], "suite_clean_accuracy": robust["clean"]["accuracy"],
              "val_accuracy": summary["best_val_accuracy"], "train_seconds": summary["train_seconds"],
              "steps": summary["steps"], "temperature": t}
    scores = {"variants": {k: {**common, **v} for k, v in out.items()}}
    cache.write_text(json.dumps(scores, indent=2))
    return scores


MATCH_LEVERS = {"+match prior": "match", "+match shifted": "match-shifted"}


def score_matching(run: Path, hidden: tuple, max_rows: int) -> dict:
    """The prediction-time prior matching levers on one trained model (cached in
    RUN/shift_scores_match.json): every batch is matched on its own, as `predict --prior` does on a
    file: AG News test (7,600 rows), each perturbed copy of the suite's rows, the hidden file."""
    cache = run / "shift_scores_match.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from agnews_lora.calibration import expected_calibration_error
    from agnews_lora.data import read_file
    from agnews_lora.perturb import SUITE
    from agnews_lora.predict import Classifier, load_run_config
    from agnews_lora.robustness import load_inputs, score
    from agnews_lora.runs import ROBUSTNESS_JSON, RunFolder

    clf = Classifier.load(run)
    reference = clf.training_texts()
    texts, dev, ag = hidden
    test = read_file(TEST)
    test_logits = clf.predict_logits(test.texts, batch_size=64)
    hidden_logits = clf.predict_logits(texts, batch_size=64)
    seed = json.loads((run / ROBUSTNESS_JSON).read_text())["data"]["seed"]
    inputs = load_inputs(load_run_config(run), data=None, unlabelled=None, max_rows=max_rows, seed=seed)
    suite_logits, variants = score(clf, inputs, list(SUITE), seed=seed, batch_size=64)
    summary = RunFolder(run).summary()
    out = {"": {"dev_ece": _hidden_figures(clf.probabilities(hidden_logits), dev, ag)["dev_ece"]}}
    for suffix, prior in MATCH_LEVERS.items():
        def corrected(logits, batch, temperature=None):
            return clf.probabilities(logits, temperature=temperature, prior=prior, texts=batch, reference=reference)

        p_test = corrected(test_logits, test.texts)
        shifted_test = (clf.last_shift or {}).get("shifted_rows")
        p_hidden = corrected(hidden_logits, texts)
        shifted_hidden = (clf.last_shift or {}).get("shifted_rows")
        labels = np.asarray(inputs.labelled.labels)
        suite = [float((corrected(suite_logits["variants"][k], variants[k]).argmax(-1) == labels).mean())
                 for k in range(len(SUITE))]
        y = np.asarray(test.labels)
        out[suffix] = {"test_accuracy": float((p_test.argmax(-1) == y).mean()),
                       "test_ece": expected_calibration_error(corrected(test_logits, test.texts, 1.0), y),
                       "test_ece_calibrated": expected_calibration_error(p_test, y),
                       "suite_mean_accuracy": float(np.mean(suite)),
                       "val_accuracy": summary["best_val_accuracy"], "train_seconds": summary["train_seconds"],
                       "steps": summary["steps"], "temperature": clf.temperature,
                       "shifted_rows": {"test": shifted_test, "hidden": shifted_hidden},
                       **_hidden_figures(p_hidden, dev, ag)}
    cache.write_text(json.dumps(out, indent=2))
    return out


def _robustness(run: Path, unlabelled_report: bool, max_rows: int) -> dict:
    """robustness.json of the run, made by `agnews-lora robustness` unless one with these settings exists."""
    from agnews_lora.runs import ROBUSTNESS_JSON

    path = run / ROBUSTNESS_JSON
    if path.is_file():
        old = json.loads(path.read_text())
        if old["data"]["max_rows"] == max_rows and (old["unlabelled"] is not None) == unlabelled_report:
            return old
    extra = ["--unlabelled", str(HIDDEN)] if unlabelled_report else []
    subprocess.run([sys.executable, "-m", "agnews_lora.cli", "robustness", str(run), "--max-rows", str(max_rows),
                    *extra], check=True, cwd=ROOT)
    return json.loads(path.read_text())


def _hidden_figures(probs: np.ndarray, dev: dict, ag: dict) -> dict:
    from agnews_lora.calibration import expected_calibration_error

    pred = probs.argmax(-1)
    gen_rows = np.array(sorted(set(range(len(pred))) - set(ag)))
    dev_rows, ag_rows = np.array(sorted(dev)), np.array(sorted(ag))
    return {"dev_accuracy": float((pred[dev_rows] == np.array([dev[i] for i in dev_rows])).mean()),
            "ag_half_accuracy": float((pred[ag_rows] == np.array([ag[i] for i in ag_rows])).mean()),
            "dev_ece": float(expected_calibration_error(probs[dev_rows], [dev[i] for i in dev_rows])),
            "gen_share": (np.bincount(pred[gen_rows], minlength=4) / len(gen_rows)).tolist(),
            "gen_confidence": float(probs[gen_rows].max(-1).mean()),
            "ag_confidence": float(probs[ag_rows].max(-1).mean())}


def se(p: float, n: int) -> float:
    """In points."""
    from agnews_lora.evaluate import accuracy_se

    return 100 * accuracy_se(p, n)


def table(rows: list[tuple[str, dict]], suite_rows: int) -> str:
    lines = ["| arm | AG News test (7,600) | generated dev (300) | hidden AG half (4,000) | "
             f"suite mean ({suite_rows:,} x {len(SUITE)}) "
             "| ECE test (before / after T) | ECE generated dev (after T) | val acc | generated half: World/Sports/Business/Sci-Tech share "
             "| mean confidence gen / AG | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in rows:
        share = "/".join(f"{100 * s:.0f}" for s in v["gen_share"])
        lines.append(
            f"| {name} | {100 * v['test_accuracy']:.2f}% | {100 * v['dev_accuracy']:.1f}% "
            f"(±{se(v['dev_accuracy'], 300):.1f}) | {100 * v['ag_half_accuracy']:.2f}% | "
            f"{100 * v['suite_mean_accuracy']:.2f}% | {100 * v['test_ece']:.2f} / {100 * v['test_ece_calibrated']:.2f} | "
            + (f"{100 * v['dev_ece']:.2f} | " if v.get("dev_ece") is not None else "- | ")
            + f"{100 * v['val_accuracy']:.2f}% | {share} | {v['gen_confidence']:.3f} / {v['ag_confidence']:.3f} | "
            f"{v['train_seconds']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=list(STAGES), required=True)
    p.add_argument("--out", default="runs/shift_levers")
    p.add_argument("--score-only", action="store_true", help="score finished arms, train nothing")
    p.add_argument("--train-only", action="store_true", help="train the arms, score nothing")
    p.add_argument("--arms", help="comma-separated subset of the stage's arms (default: all)")
    study.add_seeds_option(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> None:
    stage = STAGES[args.stage]
    out = ROOT / args.out / args.stage
    names = args.arms.split(",") if args.arms else stage["arms"]
    arms = {a: (combined_overrides() if a == "combined" else ARMS[a]) for a in names}
    if not args.score_only:  # every arm planned (budget, folder, settings) before any trains
        planned = study.plan(study.with_seeds([arm_row(arm, overrides, out, stage) for arm, overrides in arms.items()],
                                              args.seeds))
        for index, row in enumerate(planned, 1):
            study.run_row(row, index=index, count=len(planned))
    if args.train_only:
        return
    hidden = read_hidden()
    rows = []
    for arm, folder in ((a, f) for a in arms for f in study.seed_runs(out / a)):  # every finished seed of an arm
        scores = score_run(folder, hidden, prior_arms=arm in ("plain", "combined"), unlabelled_report=args.stage == "final",
                           max_rows=stage["suite_rows"])
        rows += [(folder.name + suffix, v) for suffix, v in scores["variants"].items()]
        if arm in ("plain", "combined"):
            levers = score_matching(folder, hidden, max_rows=stage["suite_rows"])
            rows[-len(scores["variants"])][1].update(levers.pop(""))  # the arm's own generated-dev ECE
            rows += [(folder.name + suffix, v) for suffix, v in levers.items()]
    doc = ROOT / "docs" / "results" / "generated" / f"shift_levers_{args.stage}.md"
    doc.write_text(f"# Shift levers, stage `{args.stage}` ({stage['rows']:,} training rows)\n\n"
                   f"`python experiments/shift_levers.py --stage {args.stage}`; arms: "
                   + "; ".join(f"**{a}**: `{' '.join(o) or 'configs/cpu-minilm.yaml'}`" for a, o in arms.items())
                   + "\n\n" + table(rows, stage["suite_rows"]) + "\n")
    print(doc.read_text())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (2 for a user error, printed as one line)."""
    return study.run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
