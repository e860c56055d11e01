"""The seeded generators all of a run's randomness comes from (both tasks)."""

from __future__ import annotations

import torch

PURPOSES = {"epoch": 1, "micro": 2, "fixed": 3, "bucket": 4, "caption": 5}


def seeded_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    """A generator seeded from (seed, purpose, index), independent of anything run before."""
    return torch.Generator().manual_seed((seed * 1_000_003 + PURPOSES[purpose]) * 1_000_003
                                         + index)
