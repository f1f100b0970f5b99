"""The main job's command works anywhere (issue 26 item 4): beside ../shared it reads the offline
copy; without it, AG News from the Hub; with neither, one error that names both ways.

Nothing here reaches the network: the Hub's answer is replaced (hub.hub_reachable) or the Hub is
switched off (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, needs_shared

from agnews_lora import hub
from agnews_lora.config import load_config
from agnews_lora.errors import HubUnreachable

PRESETS = ["cpu-minilm.yaml", "cpu-minilm-robust.yaml", "cpu-distill.yaml", "sweep-cpu-minilm.yaml"]


@needs_shared
@pytest.mark.parametrize("preset", PRESETS)
def test_beside_shared_the_presets_read_the_offline_copy(preset, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: pytest.fail("the Hub was asked"))
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.data.if_missing == "hub"
    assert [f.split("/")[-1] for f in cfg.data.test] == ["test.csv.gz"]
    assert len(cfg.data.train) == 3


@pytest.mark.parametrize("preset", PRESETS)
def test_without_shared_the_presets_read_the_hub(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../shared/... does not resolve from here
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(hub, "_in_local_cache", lambda repo_id, kind: False)
    cfg = load_config(ROOT / "configs" / preset)
    assert (cfg.data.train, cfg.data.test, cfg.data.hub_dataset) == ([], [], "fancyzhx/ag_news")


def test_with_neither_one_error_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_in_local_cache", lambda repo_id, kind: False)
    with pytest.raises(HubUnreachable) as err:
        load_config(ROOT / "configs" / "cpu-minilm.yaml")
    text = str(err.value)
    assert "fancyzhx/ag_news" in text and "connect to the internet" in text
    assert "../shared/data/ag_news/train_partial.csv.gz" in text and "beside ../shared" in text


def test_with_neither_the_cli_prints_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "agnews_lora.cli", "train", "-c", str(ROOT / "configs" / "cpu-minilm.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "connect to the internet" in lines[0] and "../shared" in lines[0]
    assert not (tmp_path / "runs").exists()  # refused before any folder was made


def test_some_files_absent_is_an_error_not_a_silent_switch(tmp_path, monkeypatch):
    present = tmp_path / "train.csv"
    present.write_text("label,text\n0,a\n")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: pytest.fail("the Hub was asked"))
    cfg = load_config(overrides=[f"data.train=[{present},{tmp_path / 'typo.csv'}]", "data.if_missing=hub"])
    assert cfg.data.train == [str(present), str(tmp_path / "typo.csv")]  # read_files names the missing one


def test_by_default_absent_files_stay_named(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: pytest.fail("the Hub was asked"))
    cfg = load_config(overrides=[f"data.train=[{tmp_path / 'absent.csv'}]"])
    assert cfg.data.if_missing == "error" and cfg.data.train == [str(tmp_path / "absent.csv")]
