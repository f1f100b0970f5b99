"""Importing the package changes nothing global: environment variables, torch's thread count,
warning filters, transformers' attention registry. Each check runs in a fresh interpreter, with
the libraries imported first, so only agnews_lora's own imports are measured."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

MODULES = ["agnews_lora", "agnews_lora.config", "agnews_lora.data", "agnews_lora.model", "agnews_lora.speed",
           "agnews_lora.precision", "agnews_lora.train", "agnews_lora.predict", "agnews_lora.distill",
           "agnews_lora.teacher", "agnews_lora.evaluate", "agnews_lora.scoring", "agnews_lora.export",
           "agnews_lora.report", "agnews_lora.sweep", "agnews_lora.serve", "agnews_lora.cli", "agnews_lora.hub",
           "agnews_lora.plan"]

PROBE = """
import importlib, json, os, sys, warnings
import torch, transformers, peft, accelerate
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

def state():
    return {"env": dict(os.environ), "threads": torch.get_num_threads(),
            "filters": [repr(f) for f in warnings.filters], "attention": sorted(ALL_ATTENTION_FUNCTIONS.keys()),
            "verbosity": logging.get_verbosity()}

before = state()
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"before": before, "after": state()}))
"""


def test_importing_agnews_lora_changes_nothing_global():
    out = subprocess.run([sys.executable, "-c", PROBE, *MODULES], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = got["before"], got["after"]
    assert after["env"] == before["env"]
    assert after["threads"] == before["threads"]
    assert after["filters"] == before["filters"]
    assert after["attention"] == before["attention"]
    assert after["verbosity"] == before["verbosity"]


def test_a_cli_command_restores_warning_filters_and_logging(tiny_model_dir, capsys):
    from transformers.utils import logging

    from agnews_lora.cli import main

    filters, verbosity = list(warnings.filters), logging.get_verbosity()
    main(["budget", f"model.name={tiny_model_dir}", "lora.r=4", "--json"])
    assert json.loads(capsys.readouterr().out)["fits"]
    assert warnings.filters == filters and logging.get_verbosity() == verbosity


def test_classifier_load_leaves_the_thread_count_alone(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from agnews_lora.predict import Classifier

    folder = tmp_path / "merged"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    before = torch.get_num_threads()
    Classifier.load(folder, precision="fp32", threads=max(1, before - 1) if before > 1 else 2)
    assert torch.get_num_threads() == before
