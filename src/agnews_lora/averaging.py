"""Weight averaging: an exponential moving average of the trainable weights.

The average lives in fp32 beside the model; `swapped_in` puts it into the model for an
evaluation or a checkpoint and puts the training weights back afterwards, so the optimizer
never sees it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class WeightAverage:
    """EMA of every parameter with requires_grad: avg <- avg + (1 - d) * (w - avg) after each
    optimizer step, with d = min(decay, (1 + t) / (10 + t)) at update t so the first steps'
    random-ish weights fade fast (the warm-up of TensorFlow's ExponentialMovingAverage)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1 - d)
        self.updates += 1

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model inside the block, the training weights after it."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-ready): the average per parameter name, and the update count."""
        out = {f"average.{n}": a.contiguous() for n, a in zip(self.names, self.average)}
        out["updates"] = torch.tensor(self.updates)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"average.{n}" not in state]
        if missing:
            raise ValueError(f"weight average state lacks {missing[:3]}: saved with other trainable weights")
        for i, n in enumerate(self.names):
            self.average[i].copy_(state[f"average.{n}"])
        self.updates = int(state["updates"])
