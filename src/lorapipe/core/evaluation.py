"""Evaluation during training: the held-out split, the fixed-noise losses, early stopping.

The fixed-noise losses use the same noise and timesteps at every evaluation, so they carry
no sampling noise and move only when the model does (see lorapipe.core.health).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lorapipe.core import adapters
from lorapipe.core.errors import LorapipeError
from lorapipe.core.metrics import (
    IMPROVEMENT_TRAIN,
    IMPROVEMENT_VALIDATION,
    TRAIN_FIXED,
    VALIDATION,
    band,
    band_of,
)


@contextmanager
def evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """These modules in eval mode (no dropout) for a measurement, then each back in the mode
    it was in, whatever happens inside."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


@dataclass
class Evaluation:
    """One evaluation, as a task measures it: the logged scalars (the fixed losses, their
    perplexities, the image task's per-timestep losses) and each evaluated example's own
    loss by set ("train": the fixed training subset, "validation": the held-out examples),
    in the order of the sets (lorapipe.core.examples names them)."""

    metrics: dict[str, float]
    examples: dict[str, list[float]] = field(default_factory=dict)

    def to_state(self) -> dict:
        return {"metrics": self.metrics, "examples": self.examples}

    @classmethod
    def from_state(cls, state: dict) -> Evaluation:
        return cls(dict(state["metrics"]), {k: list(v) for k, v in state["examples"].items()})


# the fixed losses whose improvement over the base is logged, and under which name
GAINS = {TRAIN_FIXED: IMPROVEMENT_TRAIN, VALIDATION: IMPROVEMENT_VALIDATION}


def improvement(loss: float, base: float) -> float:
    """1 - loss / base: 0.18 = 18% below the base's loss; negative = above it."""
    return 1.0 - loss / base if base > 0 else 0.0


def gains(metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """improvement/train, improvement/validation and, per timestep, the same of each band:
    these losses against the base's (the same examples, noise and timesteps)."""
    out = {}
    for name, value in metrics.items():
        if name in base and name in GAINS:
            out[GAINS[name]] = improvement(value, base[name])
        banded = band_of(name)
        if banded and banded[0] in GAINS and name in base:
            out[band(GAINS[banded[0]], banded[1])] = improvement(value, base[name])
    return out


def cuda_devices() -> list[int]:
    """The devices torch.random.fork_rng must save and restore."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def holdout(files: list[str], split: float) -> tuple[list[int], list[int]]:
    """(training, validation) indices. Held-out images are picked by the hash of their file
    name: the same images whatever the row order, and adding images keeps earlier picks."""
    if not split:
        return list(range(len(files))), []
    n_val = max(1, round(split * len(files)))
    if n_val >= len(files):
        raise LorapipeError(f"train.validation.split {split} would hold out all {len(files)} "
                            "images; lower it or add images")
    order = sorted(range(len(files)), key=lambda i: hashlib.sha256(files[i].encode()).digest())
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class EarlyStop:
    """Tracks the best validation loss and the LoRA at that point."""

    patience: int
    best: float = math.inf
    best_step: int = 0
    since_best: int = 0
    best_state: dict | None = None

    def update(self, step: int, value: float, models: dict) -> bool:
        """Record one evaluation of the LoRA in `models` (by component); True when training
        should stop."""
        if value < self.best:
            self.best, self.best_step, self.since_best = value, step, 0
            self.best_state = adapters.adapter_state(models)
        else:
            self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience

    def to_state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}
