"""The image task's fixed-noise losses: on a fixed subset of the training images and on the
held-out images, with the same noise and timesteps at every evaluation, so they carry no
sampling noise and move only when the model does (see lorapipe.core.health).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorapipe.core.evaluation import cuda_devices, evaluating
from lorapipe.core.metrics import TRAIN_FIXED, VALIDATION, VALIDATION_DIVERGENCE
from lorapipe.core.seeds import seeded_generator
from lorapipe.diffusion.objectives import Objective, Predict, diffusion_loss


@torch.no_grad()
def fixed_loss(predict: Predict, objective: Objective, latents, seed: int,
               timesteps: list[int]) -> float:
    """Loss on these images at these timesteps with noise fixed by the seed: no sampling
    noise left, so it moves only when the model does. Run in eval mode (Evaluator).
    timesteps: train.validation.timesteps, on the 1000-step scale (flow matching: sigma =
    t / 1000)."""
    total = 0.0
    for t in timesteps:
        gen = seeded_generator(seed, "fixed", t)
        ts = objective.fixed_timesteps(t, latents.shape[0])
        total += diffusion_loss(predict, objective, latents, gen, timesteps=ts).item()
    return total / len(timesteps)


@dataclass
class Evaluator:
    """The fixed-noise losses: on a fixed subset of the training images and on the held-out
    images, same noise and timesteps every time, so they move only when the model does."""

    denoiser: torch.nn.Module
    objective: Objective
    latents: object  # cache.Latents: one tensor per image size
    # image indices -> the denoiser's prediction function for those images (the family's
    # predictor with their conditioning)
    predictor: Callable[[list[int]], Predict]
    train_subset: list[int]
    validation: list[int]
    seed: int
    timesteps: list[int]

    def _loss(self, idx: list[int]) -> float:
        """The fixed-noise loss over these images: per image size (bucket), weighted by
        the images of each size."""
        losses = []
        for group in self.latents.groups(idx):
            losses.append((fixed_loss(self.predictor(group), self.objective,
                                      self.latents[group], self.seed, self.timesteps),
                           len(group)))
        if len(losses) == 1:
            return losses[0][0]
        return sum(loss * n for loss, n in losses) / len(idx)

    def __call__(self) -> dict[str, float]:
        # evaluating never changes what training draws next (LoRA dropout uses this RNG)
        with torch.random.fork_rng(devices=cuda_devices()), evaluating(self.denoiser):
            train = self._loss(self.train_subset)
            out = {TRAIN_FIXED: train}
            if self.validation:
                val = self._loss(self.validation)
                out[VALIDATION] = val
                out[VALIDATION_DIVERGENCE] = val - train  # kohya's name
        return out
