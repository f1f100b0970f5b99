from agnews_lora.config import load_config
from agnews_lora.train import train


def test_tiny_training_run_writes_run_folder(tiny_overrides):
    run = train(load_config(overrides=tiny_overrides))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "best/adapter_model.safetensors"):
        assert (run / name).is_file(), name
