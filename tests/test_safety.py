"""Issue 24: one guard for every output (outputs.py), finite numbers only, divergence stops the run.

Each test names the item of the attack matrix it covers; each fails on the code before the
guard. Outputs are checked before any work, so the refusals here cost no model load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from agnews_lora import outputs, runs
from agnews_lora.cli import main
from agnews_lora.config import MAX_YAML_NODES, load_config
from agnews_lora.errors import ConfigError, Diverged, OutputRefused, UserError


def cli(args, capsys) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run) -> Path:
    """A private copy of the shared tiny run: these tests try to damage it."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("safety") / "run"))


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder of the user's that the tool did not write, with names the tool uses."""
    folder = tmp_path / "mine"
    (folder / "best").mkdir(parents=True)
    (folder / "best" / "important.txt").write_text("thesis")
    (folder / ".best.tmp_userdata").mkdir()
    (folder / ".best.tmp_userdata" / "x").write_text("x")
    (folder / ".config.yaml.bak").write_text("mine")
    (folder / "report.md").write_text("# my report")
    return folder


# ---------------------------------------------------------------- 1. export


def test_01_export_never_replaces_what_it_did_not_write(run, user_folder, tmp_path, capsys):
    before_run, before_user = snapshot(run), snapshot(user_folder)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for target, why in ((user_folder, "did not create and it is not empty"), (run, "is the folder this command reads"),
                        (run / "best", "lies inside the run folder"), (run / "last", "lies inside the run folder"),
                        (a_file, "is a file, not a folder")):
        code, err = cli(["export", run, "--format", "merged", "--output", target, "--parity-rows", 0], capsys)
        assert code == 2 and why in err, (target, err)
    assert snapshot(run) == before_run and snapshot(user_folder) == before_user
    assert a_file.read_text() == "keep me" and not list(tmp_path.glob(".notes.txt*"))


def test_01_export_into_a_new_folder_marks_it_and_replaces_only_its_own(run, tmp_path, capsys):
    dest = tmp_path / "exported"
    for _ in range(2):  # the second export replaces the first: the tool's own folder
        code, err = cli(["export", run, "--format", "merged", "--output", dest, "--parity-rows", 0], capsys)
        assert code == 0, err
    assert runs.read_marker(dest) == "export" and outputs.holder_of(dest).kind == "export"
    (dest / runs.MARKER).unlink()
    (dest / runs.EXPORT_META).unlink()  # no longer recognisably the tool's
    code, err = cli(["export", run, "--format", "merged", "--output", dest, "--parity-rows", 0], capsys)
    assert code == 2 and "is a model folder, not an export folder" in err and (dest / "config.json").is_file()


# ---------------------------------------------------------------- 2. train into a folder that is not a run


def test_02_train_refuses_a_folder_it_did_not_create(tiny_overrides, user_folder, capsys):
    before = snapshot(user_folder)
    overrides = [o for o in tiny_overrides if not o.startswith("out_dir=")]
    for resume in ("false", "true"):
        code, err = cli(["train", *overrides, f"out_dir={user_folder}", f"train.resume={resume}"], capsys)
        assert code == 2 and "did not create and it is not empty" in err and "best/" in err
    assert snapshot(user_folder) == before and sorted(p.name for p in user_folder.iterdir()) == \
        [".best.tmp_userdata", ".config.yaml.bak", "best", "report.md"]


def test_02_train_inside_a_run_or_checkpoint_is_refused(run, tiny_overrides, capsys):
    before = snapshot(run)
    overrides = [o for o in tiny_overrides if not o.startswith("out_dir=")]
    for inside in (run / "best", run / "nested"):
        code, err = cli(["train", *overrides, f"out_dir={inside}"], capsys)
        assert code == 2 and "lies inside" in err
    assert snapshot(run) == before and not (run / "nested").exists()


def test_02_a_run_from_before_the_marker_still_resumes(make_cfg, tmp_path):
    from agnews_lora.train import train

    first = train(make_cfg(tmp_path / "old", "train.max_steps=3"))
    (first / runs.MARKER).unlink()  # as an older version wrote it
    assert runs.is_run_folder(first) and outputs.holder_of(first).kind == "run"
    train(make_cfg(tmp_path / "old", "train.resume=true"))
    assert runs.read_marker(first) == "run"
    assert json.loads((first / runs.SUMMARY).read_text())["steps"] == 6


# ---------------------------------------------------------------- 3. predict's outputs


def test_03_predict_outputs_never_overwrite_inputs_or_user_files(run, ag_files, tmp_path, capsys):
    data = tmp_path / "texts.csv"
    shutil.copy(ag_files["test"], data)
    probs_input = tmp_path / "out.probs.csv"
    shutil.copy(ag_files["test"], probs_input)
    before = probs_input.read_bytes()
    code, err = cli(["predict", run, "--input", probs_input, "--output", tmp_path / "out.csv", "--probs"], capsys)
    assert code == 2 and "--probs" in err and "input" in err and probs_input.read_bytes() == before
    assert not (tmp_path / "out.csv").exists()  # refused before anything was written
    code, err = cli(["predict", run, "--input", data, "--output", data.with_name("ref.csv"), "--prior",
                     "match-shifted", "--reference", data.with_name("ref.csv")], capsys)
    assert code == 2 and "input" in err
    (tmp_path / "folder.probs.csv").mkdir()
    code, err = cli(["predict", run, "--input", data, "--output", tmp_path / "folder.csv", "--probs"], capsys)
    assert code == 2 and "is a folder" in err and not (tmp_path / "folder.csv").exists()
    essay = tmp_path / "essay.txt"
    essay.write_text("my essay")
    code, err = cli(["predict", run, "--input", data, "--output", essay], capsys)
    assert code == 2 and "did not write" in err and essay.read_text() == "my essay"
    # the tool's own predictions file is replaced as before
    for _ in range(2):
        code, err = cli(["predict", run, "--input", data, "--output", tmp_path / "p.csv", "--probs"], capsys)
        assert code == 0, err
    assert (tmp_path / "p.csv").read_text().startswith("ID,Label")


# ---------------------------------------------------------------- 4. evaluate and compare


def test_04_evaluate_and_compare_never_write_over_run_files(run, tmp_path, capsys):
    before = snapshot(run)
    code, err = cli(["evaluate", run, "--output", tmp_path / "e.json", "--predictions", run / runs.CONFIG], capsys)
    assert code == 2 and "lies inside the run folder" in err
    code, err = cli(["compare", run, "--output", run / runs.SUMMARY], capsys)
    assert code == 2 and "lies inside an input folder" in err
    code, err = cli(["compare", run, "--output", tmp_path / "elsewhere" / runs.SUMMARY], capsys)
    assert code == 0, err
    other = Path(shutil.copytree(run, tmp_path / "other"))
    code, err = cli(["compare", run, "--output", other / runs.SUMMARY], capsys)
    assert code == 2 and "lies inside the run folder" in err
    code, err = cli(["evaluate", run, "--output", run / "best" / "x.json"], capsys)
    assert code == 2 and "checkpoint folder" in err
    assert snapshot(run) == before
    code, err = cli(["compare", run, "--output", tmp_path / "cmp.md"], capsys)
    assert code == 0 and (tmp_path / "cmp.png").is_file()
    code, err = cli(["compare", run, "--output", tmp_path / "cmp.md"], capsys)  # its own files: replaced
    assert code == 0, err


# ---------------------------------------------------------------- 5. robustness


def test_05_robustness_output_is_checked_before_any_scoring(run, tmp_path, monkeypatch, capsys):
    from agnews_lora import robustness

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the output was checked")

    monkeypatch.setattr(robustness, "score", no_scoring)
    other = Path(shutil.copytree(run, tmp_path / "other"))
    before = snapshot(other)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    for target, why in ((other, "lies inside the run folder"), (run / "best", "checkpoint folder"),
                        (run / "last", "checkpoint folder"), (a_file, "is a file")):
        code, err = cli(["robustness", run, "--output", target, "--max-rows", 8], capsys)
        assert code == 2 and why in err, (target, err)
    assert snapshot(other) == before


# ---------------------------------------------------------------- 6. leftovers of a killed export


def test_06_a_killed_exports_leftovers_are_removed_by_the_next(run, capsys):
    dead = run / runs.EXPORTS / ".merged.tmp999999999-abc"  # no such pid
    dead.mkdir(parents=True)
    (dead / runs.EXPORT_META).write_text(json.dumps({"format": "merged"}))
    live = run / runs.EXPORTS / f".merged.tmp{os.getpid()}-abc"  # a writer still running: kept
    live.mkdir()
    code, err = cli(["export", run, "--format", "merged", "--parity-rows", 0], capsys)
    assert code == 0, err
    assert not dead.exists() and live.is_dir()
    shutil.rmtree(live)


# ---------------------------------------------------------------- 7. symbolic links in a run folder


def test_07_a_linked_checkpoint_is_refused_not_written_through(make_cfg, tmp_path):
    from agnews_lora.train import train

    cfg = make_cfg(tmp_path / "linked", "train.max_steps=3")
    run_dir = train(cfg)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_dir / "last", elsewhere)
    (run_dir / "last").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    with pytest.raises(OutputRefused, match="symbolic links .*last"):
        train(make_cfg(tmp_path / "linked", "train.resume=true"))
    assert snapshot(elsewhere) == before
    with pytest.raises(OutputRefused, match="symbolic link"):
        outputs.claim_file(run_dir / "last" / "README.md", kind="markdown", owner=run_dir, owned=("last/*",))


# ---------------------------------------------------------------- 8. finite numbers


@pytest.mark.parametrize("override", ["train.lr=1e309", "train.lr=.inf", "train.lr=nan", "train.lr=-.inf",
                                      "peft.vera.d_initial=nan", "peft.loha.alpha=inf", "lora.dropout=NaN"])
def test_08_every_float_of_a_config_is_finite(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: .* is not a finite number"):
        load_config(overrides=[override])


def test_08_float_options_are_finite(run, tmp_path, capsys):
    for value in ("inf", "nan", "1e309"):
        code, err = cli(["serve", run, "--max-wait-ms", value], capsys)
        assert code == 2 and "not a finite number" in err
        code, err = cli(["predict", run, "--input", "x.csv", "--output", tmp_path / "o.csv",
                         "--shift-threshold", value], capsys)
        assert code == 2 and "not a finite number" in err


# ---------------------------------------------------------------- 9. divergence


def test_09_divergence_stops_the_run_and_saves_nothing_from_it(make_cfg, tmp_path, monkeypatch):
    import torch

    from agnews_lora import loop
    from agnews_lora import train as train_mod

    calls = {"n": 0}
    real_loss = loop._loss

    def diverging(ctx, batch):  # step 5's loss is nan, as from a learning rate far too high
        calls["n"] += 1
        loss = real_loss(ctx, batch)
        return loss * torch.tensor(float("nan")) if calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "_loss", diverging)
    cfg = make_cfg(tmp_path / "div")
    with pytest.raises(Diverged, match=r"between step 4 and step 5 .*train.lr=0.001.*lower train.lr"):
        train_mod.train(cfg)
    run_dir = tmp_path / "div"
    assert json.loads((run_dir / "last" / runs.STATE).read_text())["step"] == 3  # the last good checkpoint
    assert json.loads((run_dir / "best" / "checkpoint.json").read_text())["step"] == 3  # step 3's evaluation
    for name in (runs.SUMMARY, runs.TEST_METRICS, runs.TEST_PREDICTIONS, runs.REPORT):
        assert not (run_dir / name).exists()
    card = run_dir / "best" / "README.md"  # peft's placeholder, never the tool's card of a diverged model
    assert not card.exists() or "agnews-lora" not in card.read_text()
    assert all(r["step"] <= 4 for r in runs.read_records(run_dir / runs.TRAIN_LOG))


def test_09_cli_says_diverged_in_one_line(make_cfg, tmp_path, monkeypatch, capsys):
    from agnews_lora import loop
    from agnews_lora.losses import cross_entropy

    def nan_loss(ctx, batch):
        import torch

        return cross_entropy(torch.full((len(batch["labels"]), 4), float("nan"), requires_grad=True),
                             batch["labels"], 0.0)

    monkeypatch.setattr(loop, "_loss", nan_loss)
    monkeypatch.setattr("agnews_lora.cli._main_process", lambda: True)
    cfg = make_cfg(tmp_path / "div2")
    from agnews_lora.runs import write_config

    write_config(cfg, tmp_path)
    code, err = cli(["train", "--config", tmp_path / runs.CONFIG], capsys)
    assert code == 2 and err.startswith("error: training diverged") and "Traceback" not in err


# ---------------------------------------------------------------- 15, 17. config files


def test_15_yaml_alias_bombs_are_refused_fast(tmp_path):
    lines = ['sweep:', '  space:', '    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefghi", "bcdefghij"):
        lines.append(f"    {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 600
    with pytest.raises(ConfigError, match=f"expand to more than {MAX_YAML_NODES:,}"):
        load_config(bomb)
    with pytest.raises(ConfigError, match="expand to more than"):
        load_config(overrides=["sweep.space={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                               "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                               "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}"])


def test_17_a_config_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(bad)


def test_every_user_error_is_one_kind():
    from agnews_lora import errors

    kinds = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert all(issubclass(k, UserError) for k in kinds)
    assert {"ConfigError", "DataError", "RunDamaged", "RunLocked", "OutputRefused", "Diverged", "MissingExtra",
            "BudgetError", "HubUnreachable", "ParityError"} <= {k.__name__ for k in kinds}


def test_06_card_writes_only_into_the_tools_own_exports(run, tmp_path, capsys):
    code, err = cli(["export", run, "--format", "merged", "--parity-rows", 0], capsys)
    assert code == 0, err
    killed = run / runs.EXPORTS / ".merged.tmp999999998-x"  # a killed export, after its metadata
    killed.mkdir()
    (killed / runs.EXPORT_META).write_text(json.dumps({"format": "merged", "source_run": str(run)}))
    code, err = cli(["card", run], capsys)
    assert code == 0, err
    assert not killed.exists()  # removed as stale, never given a card
    assert (run / runs.EXPORTS / "merged" / "README.md").is_file()
    foreign = tmp_path / "their-model"  # a transformers folder the tool did not write
    shutil.copytree(run / runs.EXPORTS / "merged", foreign)
    (foreign / runs.MARKER).unlink()
    (foreign / runs.EXPORT_META).unlink()
    before = snapshot(foreign)
    code, err = cli(["card", foreign], capsys)
    assert code == 2 and "only into its own folders" in err and snapshot(foreign) == before


def test_18_the_report_title_is_inert(tmp_path):
    from agnews_lora.report import inert

    assert inert("<img src=x onerror=alert(1)>\n## Injected: test accuracy 0.99") == \
        "&lt;img src=x onerror=alert(1)&gt; ## Injected: test accuracy 0.99"


def test_the_python_api_applies_the_runs_prior_default_as_the_cli_does(run, ag_files, tmp_path, capsys):
    """Issue 25.5: predict_file without a prior uses the run's predict.prior, like `predict`."""
    from agnews_lora.data import read_files
    from agnews_lora.predict import Classifier, predict_file, resolve_prior

    cfg = runs.read_config(run)
    cfg.predict.prior = "uniform"
    runs.write_config(cfg, run)
    try:
        clf = Classifier.load(run, precision="fp32")
        assert resolve_prior(clf, "run") == ("uniform", None) and resolve_prior(clf, "none") == (None, None)
        _, api = predict_file(clf, [str(ag_files["test"])], tmp_path / "api.csv", progress=False)
        code, err = cli(["predict", run, "--input", ag_files["test"], "--output", tmp_path / "cli.csv"], capsys)
        assert code == 0, err
        assert (tmp_path / "api.csv").read_text() == (tmp_path / "cli.csv").read_text()
        texts = read_files([ag_files["test"]]).texts
        uniform = clf.probabilities(clf.predict_logits(texts), prior="uniform")
        assert api == uniform.argmax(-1).tolist()
        _, plain = predict_file(clf, [str(ag_files["test"])], tmp_path / "plain.csv", prior=None, progress=False)
        assert plain == clf.predict_logits(texts).argmax(-1).tolist()  # None: the training prior
        with pytest.raises(ConfigError, match="shift_threshold goes with prior 'match-shifted'"):
            resolve_prior(clf, "uniform", 0.5)
    finally:
        cfg.predict.prior = ""
        runs.write_config(cfg, run)


def test_a_sweep_folder_is_the_tools_and_holds_its_trials(tmp_path, user_folder):
    from agnews_lora.config import load_config
    from agnews_lora.sweep import run_sweep

    cfg = load_config(overrides=[f"out_dir={user_folder}", "sweep.space={lora.r: {type: int, low: 4, high: 8}}"])
    before = snapshot(user_folder)
    with pytest.raises(OutputRefused, match="did not create and it is not empty"):
        run_sweep(cfg, trials=1)
    assert snapshot(user_folder) == before and not (user_folder / runs.STUDY_DB).exists()
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    runs.write_marker(sweep, "sweep")
    assert outputs.claim_folder(sweep / "trial-000", kind="run") == sweep / "trial-000"  # trials inside it
    with pytest.raises(OutputRefused, match="inside the sweep folder"):
        outputs.claim_folder(sweep / "a" / "b", kind="run")


def test_predict_mid_swap_never_touches_the_trainers_folder(run, ag_files, tmp_path, capsys):
    """Re-tested with the guard: a CLI predict while the trainer is between its two renames reads
    .best.old where it lies, writes only its own output, and leaves the swap to the writer."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "best").rename(copy / ".best.old")
    before = snapshot(copy)
    code, err = cli(["predict", copy, "--input", ag_files["test"], "--output", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    assert snapshot(copy) == before and not (copy / "best").exists()
    runs.recover(copy)  # what the writer does on its next start
    assert (copy / "best").is_dir() and not (copy / ".best.old").exists()
