"""The image task's fixed-noise losses: on a fixed subset of the training images and on the
held-out images, with the same noise and timesteps at every evaluation, so they carry no
sampling noise and move only when the model does (see lorapipe.core.health).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorapipe.core.evaluation import Evaluation, cuda_devices, evaluating
from lorapipe.core.metrics import TRAIN_FIXED, VALIDATION, VALIDATION_DIVERGENCE, band
from lorapipe.core.seeds import seeded_generator
from lorapipe.diffusion.objectives import Objective, Predict, diffusion_loss


@torch.no_grad()
def fixed_losses(predict: Predict, objective: Objective, latents, seed: int,
                 timesteps: list[int]) -> torch.Tensor:
    """Each image's loss at each of these timesteps, [images, timesteps], with noise fixed by
    the seed: no sampling noise left, so it moves only when the model does. Run in eval mode
    (Evaluator). timesteps: train.validation.timesteps, on the 1000-step scale (flow
    matching: sigma = t / 1000)."""
    columns = []
    for t in timesteps:
        gen = seeded_generator(seed, "fixed", t)
        ts = objective.fixed_timesteps(t, latents.shape[0])
        columns.append(diffusion_loss(predict, objective, latents, gen, timesteps=ts,
                                      per_sample=True).double().cpu())
    return torch.stack(columns, dim=1)


@dataclass
class Evaluator:
    """The fixed-noise losses: on a fixed subset of the training images and on the held-out
    images, same noise and timesteps every time, so they move only when the model does.
    With `breakdown`, also per evaluation timestep and per image (from the same passes)."""

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
    breakdown: bool = True

    def _losses(self, idx: list[int]) -> torch.Tensor:
        """[len(idx), timesteps]: per image size (bucket) in one batch each, in idx order."""
        rows = torch.empty((len(idx), len(self.timesteps)), dtype=torch.float64)
        where = {i: k for k, i in enumerate(idx)}
        for group in self.latents.groups(idx):
            rows[[where[i] for i in group]] = fixed_losses(
                self.predictor(group), self.objective, self.latents[group], self.seed,
                self.timesteps)
        return rows

    def _measure(self, name: str, part: str, idx: list[int], ev: Evaluation) -> float:
        losses = self._losses(idx)
        ev.metrics[name] = loss = losses.mean().item()
        if self.breakdown:
            for j, t in enumerate(self.timesteps):
                ev.metrics[band(name, t)] = losses[:, j].mean().item()
            ev.examples[part] = losses.mean(dim=1).tolist()
        return loss

    def __call__(self) -> Evaluation:
        ev = Evaluation({}, {})
        # evaluating never changes what training draws next (LoRA dropout uses this RNG)
        with torch.random.fork_rng(devices=cuda_devices()), evaluating(self.denoiser):
            train = self._measure(TRAIN_FIXED, "train", self.train_subset, ev)
            if self.validation:
                val = self._measure(VALIDATION, "validation", self.validation, ev)
                ev.metrics[VALIDATION_DIVERGENCE] = val - train  # kohya's name
        return ev
