"""The speed benchmarks' own arithmetic: the batches train_speed rebuilds for the FLOP count,
the FLOP formula, the dense-matmul ceiling and the report's ratios; its strongest Trainer arm
(a'') at a tiny scale; kernel_cache's timing window and report; the kernel-cache setting itself
(no timing is asserted)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from agnews_lora import study
from conftest import ROOT, needs_shared, tiny_run_overrides


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark("train_speed")


@needs_shared
def test_rebuilt_batches_match_what_train_logged_in_each_epoch(bench, tiny_model_dir, ag_files, tmp_path):
    from agnews_lora.checkpoint import read_jsonl
    from agnews_lora.config import load_config
    from agnews_lora.train import train

    # 400 rows - 40 validation = 360 = 45 batches of 8: two epochs in 90 steps.
    cfg = load_config(overrides=tiny_run_overrides(tiny_model_dir, ag_files, tmp_path / "cache", tmp_path / "runs")
                      + ["train.max_steps=90", "train.eval_every=0", "train.log_every=1", "data.pad_to_multiple_of=8"])
    log = read_jsonl(train(cfg) / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 91))
    epoch1 = bench.rebuilt_batches(cfg, epoch=1, logged_tokens=log[89]["tokens"] - log[44]["tokens"])
    assert len(epoch1) == 45 and sum(b[0] for b in epoch1) == 360
    assert all(b[2] % 8 == 0 and b[2] // b[0] % 8 == 0 and b[1] <= b[2] for b in epoch1)  # padded to 8
    # gpu_speed.sh's use: a window of the first epoch
    window = bench.rebuilt_batches(cfg, start=10, stop=30, logged_tokens=log[29]["tokens"] - log[9]["tokens"])
    assert len(window) == 20
    with pytest.raises(RuntimeError, match="loop logged"):
        bench.rebuilt_batches(cfg, epoch=0, logged_tokens=log[89]["tokens"] - log[44]["tokens"] + 1)


def test_model_flops_formula(bench):
    shape = {"n_params": 1000, "hidden": 8, "layers": 2, "intermediate": 32}
    # 4 N T + 12 H layers sum(L^2): 4*1000*10 + 12*8*2*(36+16)
    assert bench.model_flops(shape, tokens=10, sum_sq_len=52) == 40_000 + 9_984


def test_ceiling_times_the_dense_products(bench, monkeypatch):
    import torch

    calls = []
    linear, matmul = torch.nn.functional.linear, torch.matmul
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: calls.append(("fwd", *x.shape, *w.shape))
                        or linear(x, w))
    monkeypatch.setattr(torch, "matmul", lambda g, w: calls.append(("grad", *g.shape, *w.shape)) or matmul(g, w))
    out = bench.run_ceiling({"hidden": 16, "intermediate": 64, "layers": 2}, [(2, 8), (2, 4)], "fp32")
    assert out["seconds"] > 0
    # per pass (a warm-up and two timed): 2 batch shapes x 2 layers x 6 dense layers x (forward, input grad)
    assert len(calls) == 3 * 2 * 2 * 6 * 2
    per_layer = {(kind, o, k) for kind, m, _, o, k in calls if m == 16}  # rows x width = 2 x 8
    assert per_layer == {("fwd", 16, 16), ("fwd", 64, 16), ("fwd", 16, 64),
                         ("grad", 16, 16), ("grad", 64, 16), ("grad", 16, 64)}
    assert {m for _, m, *_ in calls} == {16, 8}


def test_report_ratios_and_ceiling(bench):
    def run(ex_s, tok_s, gflops, precision="fp32", **extra):
        return {"examples_per_s": ex_s, "tokens_per_s": tok_s, "tokens": 90, "padded_tokens": 100,
                "peak_rss_mib": 100.0, "gflops": gflops, "seconds": 2.0, "steps": 4, "precision": precision,
                "batch_shapes": [[16, 40], [16, 60]], **extra}
    fused = {"optim": "adamw_torch_fused (AdamW, fused=True)", "notes": []}
    results = {"minilm": {"a": [run(1.0, 10.0, 5.0, **fused)], "a'": [run(10.0, 100.0, 50.0, **fused)] * 2,
                          "a''": [run(20.0, 200.0, 80.0, "bf16", **fused), run(10.0, 100.0, 40.0, "bf16", **fused)],
                          "b": [run(25.0, 250.0, 100.0, "bf16", batch_shapes=[[16, 60], [16, 40]])] * 2}}
    text = bench.render(results, peak={"bf16": 400.0, "fp32": 100.0}, ceilings={"minilm": 1.0}, batch_size=16,
                        rows=4000, wall=60.0, load=(0.0, 0.0))
    assert "| minilm | b/a | 25.0x | 25.0x | 25.0x |" in text
    assert "| minilm | b/a' | 2.5x | 2.5x | 2.5x, 2.5x |" in text
    # the strongest arm: medians 25 / 15, and the ratio within each repeat (25/20, 25/10)
    assert "| minilm | b/a'' | 1.7x | 1.7x | 1.2x, 2.5x |" in text
    assert "| 25% of bf16 |" in text  # (b): 100 of the 400 GFLOP/s bf16 peak
    assert "| 15% of bf16 |" in text  # (a'') in bf16: its median 60 GFLOP/s against the bf16 peak
    assert "Target against the strongest Trainer baseline (a''): (b) >= 2.5x its examples/s: minilm 1.7x " \
           "(not met)." in text
    assert "- minilm: (a'), (a'') and (b) timed the same batch shapes (rows x padded width): yes." in text
    assert "- minilm (a''): bf16, optimizer adamw_torch_fused (AdamW, fused=True)." in text
    # ceiling: (b)'s 100 GFLOP/s x 2 s of FLOPs in the 1 s the dense products alone took
    assert "| minilm | 100 | 200 | 50% | 50% |" in text

    results["minilm"]["a''"] = [run(20.0, 200.0, 80.0, batch_shapes=[[16, 40], [16, 64]], optim="adamw_torch",
                                    notes=["fp32: this CPU has no native bf16 (no AVX-512 BF16 or AMX)"])]
    text = bench.render(results, peak={"fp32": 100.0}, ceilings={}, batch_size=16, rows=4000, wall=60.0,
                        load=(0.0, 0.0))
    assert "timed the same batch shapes (rows x padded width): NO" in text
    assert "- minilm (a''): fp32, optimizer adamw_torch; fell back: fp32: this CPU has no native bf16" in text
    assert "| 80% of fp32 |" in text  # an fp32 (a'') is compared with the fp32 peak


@needs_shared
def test_the_strongest_trainer_arm_runs_bf16_and_fused_adamw_on_the_same_batches(bench, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """(a''), (a') and (b) at a tiny scale, each child's work run in this process: (a'') trains in
    bf16 where the CPU has it, with fused AdamW, on the very batches (a') trains on; (b) on the same
    batch shapes."""
    from agnews_lora.precision import cpu_has_bf16
    from agnews_lora.train import reset_accelerator_state

    monkeypatch.setitem(bench.MODELS, "tiny", [f"model.name={tiny_model_dir}", "lora.r=4"])
    rows = study.write_rows(bench.ROWS_SOURCE, 24, tmp_path / "rows.csv")  # 3 steps of 8 per epoch
    out = {}
    for variant in ("a'", "a''", "b"):
        reset_accelerator_state()  # each is a fresh process in the benchmark
        kwargs = {"model": "tiny", "rows_file": str(rows), "steps": 3, "batch_size": 8,
                  "out_dir": str(tmp_path / variant.replace("'", "p"))}
        out[variant] = (bench.run_ours(**kwargs) if variant == "b"
                        else bench.run_trainer(variant, full_rows_file=str(rows), **kwargs))
    strongest, careful = out["a''"], out["a'"]
    assert strongest["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert strongest["notes"] == ([] if cpu_has_bf16() else ["fp32: this CPU has no native bf16 (no AVX-512 BF16 "
                                                              "or AMX)"])
    assert strongest["optim"] == "adamw_torch_fused (AdamW, fused=True)"
    assert careful["precision"] == "fp32" and careful["notes"] == []
    assert strongest["steps"] == 3 and strongest["examples"] == 24 and strongest["seconds"] > 0
    assert strongest["batch_shapes"] == careful["batch_shapes"]  # the same batches in the same order
    assert bench.same_batches([careful, strongest, out["b"]])


def test_the_strongest_arm_falls_back_and_says_why(bench, monkeypatch):
    import torch

    import agnews_lora.precision

    adamw = torch.optim.AdamW

    def no_fused(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices")
        return adamw(params, **kwargs)

    monkeypatch.setattr(agnews_lora.precision, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    settings = bench.strongest_settings("cpu")
    assert settings["bf16"] is False and settings["optim"] == "adamw_torch"
    assert settings["notes"][0] == "fp32: this CPU has no native bf16 (no AVX-512 BF16 or AMX)"
    assert settings["notes"][1].startswith("adamw_torch: this torch has no fused AdamW on cpu (`fused=True`")
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(agnews_lora.precision, "cpu_has_bf16", lambda: True)
    assert bench.strongest_settings("cpu") == {"bf16": True, "optim": "adamw_torch_fused", "notes": []}


@pytest.fixture(scope="module")
def cache_bench():
    return _load_benchmark("kernel_cache")


def test_the_cli_raises_the_onednn_kernel_cache_unless_set(tmp_path):
    import subprocess
    import sys

    # The CLI (an entry point) sets it before a command runs a model; `train` sets it from
    # train.kernel_cache; importing the package sets nothing (tests/test_no_side_effects.py).
    show = ("import os, sys; from agnews_lora.cli import main\n"
            "try:\n    main(['predict', sys.argv[1], '--input', 'x.csv', '--output', 'y.csv'])\n"
            "except SystemExit:\n    pass\n"
            "print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda e: subprocess.run([sys.executable, "-c", show, str(tmp_path / "missing")], env=e,  # noqa: E731
                                   capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert run(env) == "16384"
    assert run(env | {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "2048"}) == "2048"  # the user's value wins


@needs_shared
def test_kernel_cache_child_times_the_second_half(cache_bench, tiny_model_dir, ag_files, tmp_path, monkeypatch):
    from agnews_lora.checkpoint import read_jsonl

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    out = cache_bench.run_child([f"model.name={tiny_model_dir}", "train.precision=fp32", "lora.r=4"],
                                str(ag_files["train"]), steps=10, batch_size=8, out_dir=str(tmp_path))
    log = read_jsonl(next(tmp_path.rglob("train_log.jsonl")))
    assert out["capacity"] == 1024 and out["steps"] == 10 and 1 <= out["widths"] <= 10
    steady = (log[9]["examples"] - log[4]["examples"]) / (log[9]["train_seconds"] - log[4]["train_seconds"])
    assert out["steady"]["examples_per_s"] == pytest.approx(steady)
    assert out["all"]["examples_per_s"] == pytest.approx(80 / log[9]["train_seconds"])


def test_kernel_cache_report(cache_bench):
    def run(cap, ex_s):
        rate = {"examples_per_s": ex_s, "tokens_per_s": 10 * ex_s, "seconds": 1.0}
        return {"capacity": cap, "steps": 600, "widths": 79, "steady": rate, "all": rate, "peak_rss_mib": 100.0}
    results = {"minilm": [run(1024, 60.0), run(16384, 75.0), run(16384, 81.0), run(1024, 64.0)]}
    text = cache_bench.render(results, ours=16384, batch_size=16, wall=60.0)
    assert "| minilm | oneDNN default (1,024) | 600 | 79 | 62.0 [60.0, 64.0] |" in text
    assert "| minilm | agnews-lora (16,384) | 600 | 79 | 78.0 [75.0, 81.0] |" in text
    assert "minilm: 1.26x steady-state examples/s" in text


@needs_shared
def test_rows_file_takes_the_first_rows_and_refuses_more_than_there_are(bench, tmp_path):
    from agnews_lora.errors import DataError

    assert len(study.write_rows(bench.ROWS_SOURCE, 5, tmp_path / "rows.csv").read_text(encoding="utf-8")
               .splitlines()) == 5
    with pytest.raises(DataError, match="20,000 asked for: use fewer steps or rows"):
        study.write_rows(bench.ROWS_SOURCE, 20_000, tmp_path / "more.csv")


def test_both_speed_benchmarks_take_models_the_same_way(bench, cache_bench):
    import argparse

    assert bench.MODELS == cache_bench.MODELS
    for argv in (["--models", "minilm", "roberta-base"], ["--models", "minilm,roberta-base"]):
        for script in (bench, cache_bench):
            args = script.parse_args(argv)
            assert study.model_list(args.models) == ["minilm", "roberta-base"]
    parser = argparse.ArgumentParser()
    study.add_models_option(parser, bench.MODELS, default=["minilm"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--models", "minilm,gpt2"])


def test_the_benchmarks_import_nothing_but_the_library():
    """No shared module beside the scripts and no edits of the import path: each script loads by
    its path alone, its shared helpers come from agnews_lora.study."""
    import ast

    for name in ("train_speed", "kernel_cache", "inference"):
        tree = ast.parse((ROOT / "benchmarks" / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                   {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "common" not in imported, name
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                    and isinstance(n.value, ast.Name) and n.value.id == "sys"], name


def test_ab_commits_pairs_steps_across_the_arms(tmp_path):
    """The A/B of two commits compares step i of repeat r in both arms (the same batch), so a
    machine that drifts between runs does not move the figure; and it reads train_log.jsonl."""
    ab = _load_benchmark("ab_commits")
    base = [{"steps": [100.0, 110.0, 120.0]}, {"steps": [200.0, 220.0, 240.0]}]  # the machine halved its speed
    head = [{"steps": [101.0, 111.1, 121.2]}, {"steps": [202.0, 222.2, 242.4]}]  # 1% slower, step by step
    assert ab.paired_step_ratio(base, head) == pytest.approx(1.01)
    from agnews_lora import runs

    log = [{"step": i, "examples": 16 * i, "train_seconds": 0.5 * i} for i in range(1, 9)]
    runs.append_record(tmp_path / runs.TRAIN_LOG, log[0])
    for record in log[1:]:
        runs.append_record(tmp_path / runs.TRAIN_LOG, record)
    rate, steps = ab._train_rates(tmp_path)
    assert rate == pytest.approx(32.0) and steps == pytest.approx([500.0] * 4)
