"""Run-folder files: atomic writes, adapter + head save/load, metrics log, training state."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from agnews_lora import lora_init
from agnews_lora.errors import RunDamaged
from agnews_lora.methods import at_initial_ranks


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run folders are shared artefacts
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a failed write leaves no debris beside the target
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log; a torn last line (power loss mid-write) is dropped with a warning.

    Raises:
        RunDamaged: a line before the last one is not valid JSON (the file is damaged).
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RunDamaged(f"{path}: line {i + 1} is not valid JSON; the run is damaged") from None
            print(f"warning: {path}: dropped an unfinished last line (an interrupted write)", file=sys.stderr)
    return records


def recover_swap(dest: Path) -> Path:
    """Finish a swap that a crash cut between its two renames (`dest` moved aside to `.dest.old`,
    the new folder not yet in place): put the previous checkpoint back. Returns the folder to read:
    `dest`, or `.dest.old` itself where the run folder is read-only."""
    dest = Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    if not dest.exists() and old.is_dir():
        try:
            os.replace(old, dest)
        except OSError:
            return old
    return dest


def replace_dir(build, dest: Path) -> None:
    """Call build(tmp_dir) to fill a fresh folder, then swap it in for `dest`.

    The swap is two renames (dest -> .dest.old, tmp -> dest); a crash between them leaves the
    previous checkpoint as .dest.old, which `recover_swap` (called by the writer only, holding
    the run's lock: see runs.py) restores; readers read .dest.old where it lies.
    """
    dest = recover_swap(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets the next writer tell a killed writer's leftovers (outputs.remove_stale)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp{os.getpid()}-"))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ADAPTER_FILE = "adapter_model.safetensors"
STATE_FILE = "state.json"  # a training-state checkpoint's step, epoch and counters
BITFIT_FILE = "bitfit.json"  # beside a BitFit checkpoint's adapter_model.safetensors


def save_trainable(model, folder: Path, initial: dict | None = None) -> None:
    """The trained weights into `folder`: a peft adapter + head (`save_pretrained`, safetensors,
    loadable by `PeftModel.from_pretrained` on the original backbone), or for BitFit (a plain
    transformers model) its trainable biases and head under their transformers names in
    adapter_model.safetensors (`model.load_state_dict(load_file(...), strict=False)` restores them).

    An AdaLoRA adapter is saved at its initial ranks, pruned singular values as zeros
    (`methods.at_initial_ranks`), as `load_adapter_weights` reads it back. A LoRA adapter whose init
    took it out of the frozen weights (PiSSA, OLoRA, CorDA, LoRA-GA) is saved converted to a plain LoRA
    adapter of rank 2r (`lora_init.convert`, from `initial`: `lora_init.initial_adapter` of the model
    as built). The saved adapter config always names peft's default init: the tensors replace it."""
    if hasattr(model, "peft_config"):
        if initial is None:
            with at_initial_ranks(model), lora_init.plain_config(model, None):
                model.save_pretrained(folder, safe_serialization=True)
            return
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = lora_init.convert(get_peft_model_state_dict(model), initial)
        with lora_init.plain_config(model, initial):
            save_file(state, str(Path(folder) / ADAPTER_FILE), metadata={"format": "pt"})
            model.peft_config["default"].save_pretrained(str(folder))
        return
    from safetensors.torch import save_file

    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(Path(folder) / ADAPTER_FILE))
    atomic_write_json(Path(folder) / BITFIT_FILE, {"method": "bitfit", "tensors": len(tensors),
                                                   "parameters": sum(t.numel() for t in tensors.values())})


def save_adapter(model, dest: Path, extra: dict | None = None, initial: dict | None = None) -> None:
    """Save the adapter + head (`save_trainable`, converted with `initial`) as the checkpoint folder
    `dest`, swapped in whole."""

    def build(tmp: Path) -> None:
        save_trainable(model, tmp, initial=initial)
        if extra is not None:
            atomic_write_json(tmp / "checkpoint.json", extra)

    replace_dir(build, dest)


def save_training_state(model, optimizer, scheduler, state: dict, dest: Path,
                        tensors: dict[str, dict] | None = None, initial: dict | None = None) -> None:
    """The `last/` checkpoint for resuming: adapter (converted with `initial`, as `save_trainable`) +
    optimizer + scheduler + counters + RNG, and `NAME.safetensors` for each entry of `tensors` (e.g.
    the weight average)."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        save_trainable(model, tmp, initial=initial)
        for name, tensor_dict in (tensors or {}).items():
            save_file(tensor_dict, str(tmp / f"{name}.safetensors"))
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng},
                   tmp / "optim.pt")
        atomic_write_json(tmp / STATE_FILE, state)

    replace_dir(build, dest)


def load_training_state(src: Path) -> dict:
    """What `save_training_state` wrote: optimizer, scheduler, rng (and cuda_rng), state.

    Loaded with `weights_only=True`: a crafted optim.pt cannot run code, it fails to load.
    """
    path = Path(src) / "optim.pt"
    try:
        extra = torch.load(path, weights_only=True)
        extra["state"] = json.loads((Path(src) / STATE_FILE).read_text())
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise RunDamaged(f"{src}: the checkpoint is damaged or unsafe ({str(err).splitlines()[0][:200]}); "
                          "remove it to start over, or restore it") from None
    return extra


def load_adapter_weights(model, src: Path) -> None:
    """Load saved adapter + head weights (`save_trainable`) into an existing model of the same config."""
    from safetensors.torch import load_file

    path = Path(src) / ADAPTER_FILE
    try:
        weights = load_file(str(path))
    except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
        raise RunDamaged(f"{path}: the run is damaged ({err}); restore it or train again") from None
    if not hasattr(model, "peft_config"):
        load_plain_weights(model, weights, src)
        return
    from peft import set_peft_model_state_dict

    weights = lora_init.unconvert(model, weights)  # a converted PiSSA/OLoRA/CorDA/LoRA-GA adapter: A and B

    with at_initial_ranks(model):
        result = set_peft_model_state_dict(model, weights)
    # prompt/prefix tuning: peft loads their embeddings itself, after reporting the key as unexpected
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
    if unexpected:
        raise RuntimeError(f"{src}: checkpoint has keys the model does not: {unexpected[:5]}")


def load_plain_weights(model, weights: dict, src: Path) -> None:
    """BitFit: put the saved tensors into the model by name; every trainable one must be there
    (the model is built as for training: `build_model` froze all but the biases and the head)."""
    names = {n for n, _ in model.named_parameters()}
    unexpected = sorted(set(weights) - names)
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in weights)
    if unexpected or missing:
        raise RuntimeError(f"{src}: checkpoint does not fit the model (unexpected {unexpected[:3]}, "
                           f"missing {missing[:3]})")
    model.load_state_dict(weights, strict=False)
