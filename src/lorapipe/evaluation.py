"""Evaluation during training: the held-out split, the fixed-noise losses, early stopping.

The fixed-noise losses use the same noise and timesteps at every evaluation, so they carry
no sampling noise and move only when the model does (see lorapipe.health).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorapipe import lora
from lorapipe.errors import LorapipeError
from lorapipe.losses import diffusion_loss, seeded_generator


@torch.no_grad()
def fixed_loss(unet, scheduler, latents, unet_inputs: dict, seed: int,
               timesteps: list[int]) -> float:
    """Loss on these images at these timesteps with noise fixed by the seed: no sampling
    noise left, so it moves only when the model does. Dropout off."""
    was_training = unet.training
    unet.eval()
    total = 0.0
    for t in timesteps:
        gen = seeded_generator(seed, "fixed", t)
        ts = torch.full((latents.shape[0],), t, dtype=torch.long)
        total += diffusion_loss(unet, scheduler, latents, unet_inputs, gen, timesteps=ts).item()
    unet.train(was_training)
    return total / len(timesteps)


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
class Evaluator:
    """The fixed-noise losses: on a fixed subset of the training images and on the held-out
    images, same noise and timesteps every time, so they move only when the model does."""

    unet: torch.nn.Module
    scheduler: object
    latents: object  # cache.Latents: one tensor per image size
    # image indices -> the UNet's keyword inputs (the family's conditioning of those images)
    unet_inputs: Callable[[list[int]], dict]
    train_subset: list[int]
    validation: list[int]
    seed: int
    timesteps: list[int]

    def _loss(self, idx: list[int]) -> float:
        """The fixed-noise loss over these images: per image size (bucket), weighted by
        the images of each size."""
        losses = []
        for group in self.latents.groups(idx):
            losses.append((fixed_loss(self.unet, self.scheduler, self.latents[group],
                                      self.unet_inputs(group), self.seed, self.timesteps),
                           len(group)))
        if len(losses) == 1:
            return losses[0][0]
        return sum(loss * n for loss, n in losses) / len(idx)

    def __call__(self) -> dict[str, float]:
        # evaluating never changes what training draws next (LoRA dropout uses this RNG)
        with torch.random.fork_rng(devices=_cuda_devices()):
            train = self._loss(self.train_subset)
            out = {"loss/train/fixed": train}
            if self.validation:
                val = self._loss(self.validation)
                out["loss/validation/step_average"] = val
                out["loss/validation/step_divergence"] = val - train  # kohya's name
        return out


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


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
            self.best_state = lora.adapter_state(models)
        else:
            self.since_best += 1
        return bool(self.patience) and self.since_best >= self.patience

    def to_state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}
