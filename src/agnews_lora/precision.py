"""The one place that decides the numeric precision a model computes in (training and inference).

Names: "bf16" and "fp16" mean autocast to that dtype with fp32 master weights; "fp32" means no
autocast. accelerate calls fp32 "no" (no mixed precision); `accelerate_name` and `display_name`
translate.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHOICES = ("auto", "bf16", "fp16", "fp32")


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: str | torch.device = "cpu", run_precision: str | None = None) -> str:
    """Decide what a model computes in.

    Args:
        requested: "auto", "bf16", "fp16" or "fp32" ("no", accelerate's name for fp32, is accepted).
        device: where the model runs ("cpu", "cuda", "cuda:1", a torch.device).
        run_precision: inference only: the `train.precision` the run was trained with. With
            "auto", a run trained in fp32 or bf16 keeps it, so `evaluate` reproduces the run's
            test_metrics.json instead of differing by rounding near ties.

    Returns:
        "bf16", "fp16" or "fp32". "auto" is bf16 where the device computes it natively, fp16 on
        a CUDA card without bf16, else fp32; an explicit choice is returned as given.
    """
    if requested == "no":
        return "fp32"
    if requested not in CHOICES:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(CHOICES)}")
    if requested != "auto":
        return requested
    if run_precision in ("fp32", "bf16"):
        return run_precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision, None for fp32."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def accelerate_name(precision: str) -> str:
    """accelerate's `mixed_precision` value for a resolved precision ("fp32" -> "no")."""
    return "no" if precision in ("fp32", "no") else precision


def display_name(precision: str | None) -> str:
    """How reports show a recorded precision (accelerate's "no" -> "fp32")."""
    return "fp32" if precision == "no" else str(precision)
