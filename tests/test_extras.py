"""Optional features behind pip extras: a missing extra is one clear error that names it; errors
that no retry can fix (the Hub unreachable) stop a sweep instead of failing trial after trial."""

from __future__ import annotations

import pytest

from conftest import ROOT
from agnews_lora import extras
from agnews_lora.cli import main


def test_a_missing_extra_names_itself(monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "serve", ("serve", ("fastapi", "no_such_module_for_agnews")))
    with pytest.raises(extras.MissingExtra, match=r"no_such_module_for_agnews not installed\): "
                                                  r"pip install 'agnews-lora\[serve\]'"):
        extras.require("serve", "the HTTP service")
    extras.require("sweep", "sweeps")  # installed here: no error


def test_the_cli_reports_a_missing_extra_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(extras.EXTRAS, "sweep", ("sweep", ("no_such_module_for_agnews",)))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "-c", str(ROOT / "configs" / "sweep-cpu-minilm.yaml"), "--trials", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install 'agnews-lora[sweep]'" in err and "Traceback" not in err


def test_every_extra_is_declared_in_pyproject():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {extra for extra, _ in extras.EXTRAS.values()} <= set(declared)
    assert declared["all"] == ["agnews-lora[serve,onnx,sweep,track,minilm]"]  # minilm: the CPU presets' model


def test_hub_unreachable_stops_a_sweep(tiny_model_dir, ag_files, tmp_path, monkeypatch):
    from agnews_lora import train as train_mod
    from agnews_lora.config import load_config
    from agnews_lora.hub import HubUnreachable
    from agnews_lora.sweep import run_sweep

    assert not issubclass(HubUnreachable, RuntimeError)  # the sweep retries RuntimeErrors trial after trial
    calls = []

    def offline(cfg, **kwargs):
        calls.append(cfg.out_dir)
        raise HubUnreachable("cannot download model 'x': the Hugging Face Hub is not reachable")

    monkeypatch.setattr(train_mod, "train", offline)
    cfg = load_config(overrides=[f"model.name={tiny_model_dir}", f"data.train={ag_files['train']}",
                                 "data.val_size=40", f"out_dir={tmp_path / 'sweep'}", "name=offline",
                                 f"data.cache_dir={tmp_path / 'cache'}"])
    cfg.sweep.space = {"lora.r": {"type": "int", "low": 2, "high": 4, "step": 2}}
    with pytest.raises(HubUnreachable):
        run_sweep(cfg, trials=3)
    assert len(calls) == 1  # stopped at the first trial
