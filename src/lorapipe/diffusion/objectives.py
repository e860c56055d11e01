"""Training objectives of the image task: what the denoiser is trained to predict from
which noised input, one class per objective, shared by the families that use it.

Today: DDPM (Ho et al., 2020) with epsilon or v-prediction (Salimans & Ho, 2022), as SD
1.x/2.x and SDXL were trained. Flow matching (Lipman et al., 2023; Flux, SD3) is the next
class here. A family names its objective (families.Family.objective); the loss below and
the fixed-noise evaluation only call the objective's methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

# (noisy latents, timesteps) -> the denoiser's prediction (the family binds the model and
# its conditioning: families.Family.predictor)
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective:
    """How training noise is drawn and applied, and what the denoiser should predict."""

    name: str

    def sample_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, latents, noise, timesteps) -> torch.Tensor:
        raise NotImplementedError

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, timesteps, min_snr_gamma: float) -> torch.Tensor:
        """Per-sample loss weights (min_snr_gamma > 0 only)."""
        raise NotImplementedError


class DDPM(Objective):
    """The DDPM noise schedule the base was trained with, epsilon or v-prediction (the base's
    scheduler config says which)."""

    name = "ddpm"

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @classmethod
    def from_pipeline(cls, pipe) -> DDPM:
        return cls(DDPMScheduler.from_config(pipe.scheduler.config))

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def sample_timesteps(self, n, gen):
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=gen)

    def noisy(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def weights(self, timesteps, min_snr_gamma):
        # Min-SNR-gamma weighting (Hang et al., 2023), as in diffusers' training examples
        snr = compute_snr(self.scheduler, timesteps)
        weights = torch.clamp(snr, max=min_snr_gamma)
        return weights / (snr + 1 if self.prediction_type == "v_prediction" else snr)


def diffusion_loss(predict: Predict, objective: Objective, latents, gen, noise_offset=0.0,
                   min_snr_gamma=0.0, timesteps=None, shard: tuple[int, int] = (0, 1)):
    """The training loss of one batch of latents under `objective`.

    shard=(rank, world): these latents are part `rank` of a global batch split over `world`
    processes. Noise and timesteps are drawn for the whole global batch and sliced, so each
    image gets exactly what it would get in a single process: data parallelism changes where
    the work runs, not what is computed.
    """
    rank, world = shard
    b = latents.shape[0]
    mine = slice(rank * b, (rank + 1) * b)
    noise = torch.randn((b * world, *latents.shape[1:]), generator=gen)[mine]
    noise = noise.to(latents.device)
    if noise_offset:
        # offset noise (Guttenberg, 2023): lets the model shift whole-image brightness
        noise = noise + noise_offset * torch.randn(
            (b * world, latents.shape[1], 1, 1), generator=gen)[mine].to(latents.device)
    if timesteps is None:
        timesteps = objective.sample_timesteps(b * world, gen)[mine]
    timesteps = timesteps.to(latents.device)
    noisy = objective.noisy(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps)
    pred = predict(noisy, timesteps)
    if not min_snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * objective.weights(timesteps, min_snr_gamma)).mean()
