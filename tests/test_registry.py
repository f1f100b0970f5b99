"""Issue 25.3: one registry of PEFT methods (registry.py); adding a method is one entry.

The views other modules read (config's peft section, methods' sets, model's adapter names and
peft types, the CLI's list) are derived from the entries; a method without code of its own
(LoKr) is spelled nowhere else; a method added as one entry in a fresh process is configurable,
counted and described without touching another module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agnews_lora import methods, model, registry
from agnews_lora.config import PEFT_METHODS, Config, PeftMethodConfig
from conftest import ROBERTA_BASE

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "agnews_lora"


def test_every_view_is_the_registry():
    entries = registry.METHODS
    assert PEFT_METHODS == tuple(entries)
    assert {f.name for f in dataclasses.fields(PeftMethodConfig)} == \
        {"method"} | {n for n, m in entries.items() if m.options}
    assert all(type(getattr(Config().peft, n)) is m.options for n, m in entries.items() if m.options)
    assert methods.MERGEABLE == {n for n, m in entries.items() if m.mergeable}
    assert methods.PLACED == {n for n, m in entries.items() if m.placed}
    assert methods.SIZE_KEYS == {n: m.size_key for n, m in entries.items()}
    assert methods.NAMES == {n: m.title for n, m in entries.items()}
    assert set(model._PEFT_METHODS.values()) == {n for n, m in entries.items() if m.peft_type} - {"dora"}
    for n, m in entries.items():
        if m.adapter_marker:
            assert model._ADAPTER_RE.search(f"encoder.layer.3.attention.self.query.{m.adapter_marker}A.default")


def test_a_method_without_code_of_its_own_is_spelled_only_in_the_registry():
    spelled = [p.name for p in PACKAGE.glob("*.py") if '"lokr"' in p.read_text() or "'lokr'" in p.read_text()]
    assert spelled == ["registry.py"]


@pytest.mark.skipif(not ROBERTA_BASE.is_dir(), reason="../shared/models/roberta-base is absent")
def test_adding_a_method_is_one_entry(tmp_path):
    """rsLoRA (LoRA with rank-stabilised scaling) added as one registry entry, in a fresh process:
    config takes it, the budget counts it (as LoRA's count: it adds no parameter), describe names it."""
    script = tmp_path / "add_method.py"
    script.write_text(f"""
import dataclasses, json
import agnews_lora.registry as registry

def build(cfg, target, feedforward, common, meta):
    import peft
    return peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=target, use_rslora=True, **common)

registry.METHODS["rslora"] = dataclasses.replace(registry.METHODS["lora"], name="rslora", title="rsLoRA", build=build)
registry.NAMES = tuple(registry.METHODS)

from agnews_lora.config import load_config
from agnews_lora.methods import describe, peft_config
from agnews_lora.model import budget_breakdown
cfg = load_config(overrides=["model.name={ROBERTA_BASE}", "model.init=random", "peft.method=rslora"])
print(json.dumps({{"total": budget_breakdown(cfg).total, "describe": describe(cfg),
                  "rslora": peft_config(cfg, target="query", feedforward=None, modules_to_save=[], meta=True).use_rslora}}))
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"total": 888_580, "describe": "rsLoRA r=8, alpha=16, dropout=0.1, modules=query,value, "
                                                    "layers=all", "rslora": True}
