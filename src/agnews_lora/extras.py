"""Optional features and the pip extras that install them (pyproject's optional-dependencies).

The core (train, distill, evaluate, predict, report, budget) needs none of them. A feature whose
extra is missing fails at once with an error naming the extra to install.
"""

from __future__ import annotations

import importlib.util

from agnews_lora.errors import MissingExtra

# feature -> (the pip extra that installs it, the modules it needs: import names)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "serve": ("serve", ("fastapi", "uvicorn")),
    "onnx": ("onnx", ("onnx", "onnxscript", "onnxruntime")),
    "sweep": ("sweep", ("optuna",)),
    "postgres": ("sweep", ("psycopg",)),  # sweeps sharing a PostgreSQL study
    "tensorboard": ("track", ("tensorboard",)),  # train.log_with=tensorboard
    "wandb": ("wandb", ("wandb",)),
    "mlflow": ("mlflow", ("mlflow",)),
}




def require(name: str, feature: str) -> None:
    """Raise MissingExtra unless every module `name` needs can be imported.

    Args:
        name: a key of EXTRAS ("serve", "onnx", "sweep", "postgres").
        feature: what needs it, for the message (e.g. "the HTTP service").

    Raises:
        MissingExtra: naming the missing modules and the pip command that installs them.
    """
    extra, modules = EXTRAS[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"{feature} needs the optional '{extra}' dependencies ({', '.join(missing)} not "
                           f"installed): pip install 'agnews-lora[{extra}]'")
