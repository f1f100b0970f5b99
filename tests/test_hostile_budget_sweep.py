"""Hostile sizes and sweep specs (issue 24, items 14 and 17): counting a configuration never
allocates memory in proportion to its size options, absurd sizes and seeds are refused by name,
and a sweep checks every search-space spec and its storage URL before it creates anything."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agnews_lora.config import load_config
from agnews_lora.errors import ConfigError
from agnews_lora.methods import MAX_SIZE
from agnews_lora.model import budget_breakdown
from agnews_lora.sweep import mask_url, run_sweep

ROOT = Path(__file__).resolve().parents[1]
ROBERTA_BASE = ROOT.parent / "shared" / "models" / "roberta-base"
needs_roberta = pytest.mark.skipif(not ROBERTA_BASE.is_dir(), reason="../shared/models/roberta-base is absent")
HEAD = 593_668  # roberta-base's RoBERTa head

# ---------------------------------------------------------------- item 14: counting sizes

# Each size is ~1e6: peft's tensors of that size are 3 GB (LoRA's A: 1e6 x 768 floats) to 74 GB
# (prefix tuning's embedding), so counting them for real cannot fit the child's memory limit.
_HUGE = {"vera": ["peft.vera.r=1000000"], "lora": ["lora.r=1000000"], "loha": ["peft.loha.r=1000000"],
         "lokr": ["peft.lokr.r=1000000"], "adalora": ["peft.adalora.init_r=1000000"],
         "prompt": ["peft.prompt.num_virtual_tokens=1000000"], "prefix": ["peft.prefix.num_virtual_tokens=1000000"]}

# The child caps its address space at what it has mapped after the imports plus 1 GiB, then counts.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    from agnews_lora.config import load_config
    from agnews_lora.model import budget_breakdown

    cases = json.loads(sys.argv[1])
    load_config(overrides=["model.name=" + sys.argv[2]])  # settle lazy imports before measuring
    vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    before, out = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, {}
    for method, overrides in cases.items():
        cfg = load_config(overrides=["model.name=" + sys.argv[2], "peft.method=" + method] + overrides)
        try:
            out[method] = budget_breakdown(cfg).total
        except Exception as err:
            out[method] = f"{type(err).__name__}: {str(err)[:200]}"
    out["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(out))
""")


@needs_roberta
def test_counting_huge_sizes_stays_on_the_meta_device():
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(_HUGE), str(ROBERTA_BASE)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(isinstance(got[m], int) for m in _HUGE), got
    # the counts are still exact: q+v of 12 layers; VeRA trains lambda_d (r) + lambda_b (768) per module
    assert got["vera"] == 24 * (1_000_000 + 768) + HEAD
    assert got["lora"] == 36_864 * 1_000_000 + HEAD  # (768 + 768) per rank per module
    assert got["grew_mb"] < 200, got  # building the meta model itself, nothing per size


@needs_roberta
@pytest.mark.parametrize("overrides, key", [
    (["peft.method=vera", "peft.vera.r=100000000"], "peft.vera.r"),
    (["lora.r=100000000"], "lora.r"),
    (["peft.method=adalora", "peft.adalora.init_r=100000000"], "peft.adalora.init_r"),
    (["peft.method=loha", "peft.loha.r=100000000"], "peft.loha.r"),
    (["peft.method=lokr", "peft.lokr.r=100000000000000000"], "peft.lokr.r"),
    (["peft.method=prompt", "peft.prompt.num_virtual_tokens=100000000"], "peft.prompt.num_virtual_tokens"),
    (["peft.method=prefix", "peft.prefix.num_virtual_tokens=100000000"], "peft.prefix.num_virtual_tokens"),
])
def test_sizes_beyond_the_ceiling_are_refused_by_name(overrides, key):
    cfg = load_config(overrides=[f"model.name={ROBERTA_BASE}", *overrides])
    with pytest.raises(ConfigError, match=rf"^{key}=[\d,]+ is beyond any useful size; use at most {MAX_SIZE:,}"):
        budget_breakdown(cfg)


@needs_roberta
def test_the_ceiling_itself_is_counted():
    cfg = load_config(overrides=[f"model.name={ROBERTA_BASE}", "peft.method=vera", f"peft.vera.r={MAX_SIZE}"])
    assert budget_breakdown(cfg).total == 24 * (MAX_SIZE + 768) + HEAD


@needs_roberta
@pytest.mark.parametrize("seed", [10**23, 2**64, -(2**63) - 1])
def test_vera_seed_outside_64_bits_is_refused_by_name(seed):
    cfg = load_config(overrides=[f"model.name={ROBERTA_BASE}", "peft.method=vera",
                                 f"peft.vera.projection_prng_key={seed}"])
    with pytest.raises(ConfigError, match=rf"^peft.vera.projection_prng_key={seed} is not a 64-bit seed"):
        budget_breakdown(cfg)


@needs_roberta
@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_vera_seed_at_the_64_bit_edges_is_counted(seed):
    cfg = load_config(overrides=[f"model.name={ROBERTA_BASE}", "peft.method=vera",
                                 f"peft.vera.projection_prng_key={seed}"])
    assert budget_breakdown(cfg).total == 24 * (256 + 768) + HEAD


# ---------------------------------------------------------------- item 17: sweep specs and storage


def _sweep_config(tmp_path: Path, space: dict):
    cfg = load_config(overrides=[f"model.name={ROBERTA_BASE}", f"out_dir={tmp_path / 'sweep'}", "sweep.seed=1"])
    cfg.sweep.space = space
    return cfg


_GOOD = {"lora.r": {"type": "int", "low": 2, "high": 8, "step": 2}}


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"type": "float", "low": 1e-4, "high": float("inf")}},
     r"^sweep.space.train.lr.high: inf is not a finite number"),
    ({"train.lr": {"type": "float", "low": float("-inf"), "high": 1e-3}}, r"^sweep.space.train.lr.low: -inf is not"),
    ({"train.lr": {"type": "float", "low": float("nan"), "high": 1e-3}}, r"^sweep.space.train.lr.low: nan is not"),
    ({"train.lr": {"type": "float", "low": "abc", "high": 1e-3}}, r"^sweep.space.train.lr.low: expected a number"),
    ({"lora.r": {"type": "int", "low": True, "high": 8}}, r"^sweep.space.lora.r.low: expected a number"),
    ({"lora.r": {"type": "int", "low": 2, "high": 8, "step": -2}}, r"^sweep.space.lora.r.step: must be > 0, got -2"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "step": 0.0}},
     r"^sweep.space.train.lr.step: must be > 0"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "step": float("inf")}},
     r"^sweep.space.train.lr.step: inf is not a finite number"),
    ({"train.lr": {"type": "float", "low": 0, "high": 1e-3, "log": True}},
     r"^sweep.space.train.lr.log: a log scale needs low > 0, got low=0"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": "yes"}},
     r"^sweep.space.train.lr.log: expected true or false"),
    ({"lora.r": {"type": "int", "low": 2.5, "high": 8}}, r"^sweep.space.lora.r.low: an int dimension needs an integer"),
    ({"lora.r": {"type": "int", "low": 2, "high": 8, "step": 1.5}}, r"^sweep.space.lora.r.step: an int dimension"),
    ({"lora.r": {"type": "int", "low": 8, "high": 2}}, r"^sweep.space.lora.r: int needs low <= high, got low=8"),
    ({"lora.r": {"type": "int", "high": 8}}, r"^sweep.space.lora.r: int needs low <= high"),
    ({"lora.r": {"type": "int", "low": 2, "high": 100_000_000}},
     r"^sweep.space.lora.r: value 100000000 does not fit the config: lora.r=100,000,000 is beyond any useful size"),
    ({"model.head": {"type": "categorical", "choices": []}}, r"^sweep.space.model.head: categorical needs a non-empty"),
    ({"train.lr": {"type": "categorical", "choices": [1e-4, float("inf")]}},
     r"^sweep.space.train.lr.choices: inf is not a finite number"),
    ({"lora.r": 8}, r"^sweep.space.lora.r: expected a spec such as"),
    ({**_GOOD, "train.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "step": -1e-4}},
     r"^sweep.space.train.lr.step: must be > 0"),  # a bad spec after a good one
])
def test_bad_spec_is_refused_before_any_storage_exists(tmp_path, space, message):
    cfg = _sweep_config(tmp_path, space)
    with pytest.raises(ConfigError, match=message):
        run_sweep(cfg, trials=1)
    assert not (tmp_path / "sweep").exists()  # no folder, no study.db


@pytest.mark.parametrize("url, message", [
    ("postgresql://u:s3cret@h:abc/db", r"^storage URL postgresql://u:\*\*\*@h:abc/db: the port must be a number"),
    ("postgresql://u@h:abc/db", r"^storage URL postgresql://u@h:abc/db: the port must be a number"),
    ("postgresql://u:s3cret@h:99999/db", r"^storage URL postgresql://u:\*\*\*@h:99999/db: port 99999 is not in"),
    ("not a url", r"^storage URL not a url is not a database URL"),
])
def test_bad_storage_url_is_refused_without_its_password(tmp_path, url, message):
    cfg = _sweep_config(tmp_path, _GOOD)
    with pytest.raises(ConfigError, match=message) as caught:
        run_sweep(cfg, trials=1, storage=url)
    assert "s3cret" not in str(caught.value)
    assert not (tmp_path / "sweep").exists()


def test_mask_url_hides_the_password_of_an_unparsable_url():
    assert mask_url("postgresql://u:s3cret@h:abc/db") == "postgresql://u:***@h:abc/db"
    assert mask_url("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("postgresql://u@h:abc/db") == "postgresql://u@h:abc/db"
