"""Training objectives of the image task: what the denoiser is trained to predict from
which noised input, one class per objective, shared by the families that use it.

DDPM (Ho et al., 2020) with epsilon or v-prediction (Salimans & Ho, 2022), as SD 1.x/2.x
and SDXL were trained; rectified flow matching (Lipman et al., 2023; Esser et al., 2024), as
Flux.1 and SD3 were. A family names its objective (families.Family.objective); the loss
below and the fixed-noise evaluation only call the objective's methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    compute_snr,
)

# (noisy latents, timesteps) -> the denoiser's prediction (the family binds the model and
# its conditioning: families.Family.predictor)
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective:
    """How training noise is drawn and applied, and what the denoiser should predict."""

    name: str

    def sample_timesteps(self, n: int, gen: torch.Generator, shape: tuple[int, ...]
                         ) -> torch.Tensor:
        """n training timesteps for latents of this shape ([B, C, H, W])."""
        raise NotImplementedError

    def fixed_timesteps(self, t: int, n: int) -> torch.Tensor:
        """n copies of the evaluation timestep t (train.validation.timesteps: 0..999)."""
        raise NotImplementedError

    def noisy(self, latents, noise, timesteps) -> torch.Tensor:
        raise NotImplementedError

    def target(self, latents, noise, timesteps) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, timesteps, min_snr_gamma: float) -> torch.Tensor | None:
        """Per-sample loss weights, or None for a plain mean."""
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

    def sample_timesteps(self, n, gen, shape):
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=gen)

    def fixed_timesteps(self, t, n):
        return torch.full((n,), t, dtype=torch.long)

    def noisy(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def weights(self, timesteps, min_snr_gamma):
        if not min_snr_gamma:
            return None
        # Min-SNR-gamma weighting (Hang et al., 2023), as in diffusers' training examples
        snr = compute_snr(self.scheduler, timesteps)
        weights = torch.clamp(snr, max=min_snr_gamma)
        return weights / (snr + 1 if self.prediction_type == "v_prediction" else snr)


@dataclass(frozen=True)
class FlowSettings:
    """train.flow: how the flow-matching noise levels are drawn and weighted."""

    timestep_sampling: str  # uniform, logit_normal or sigmoid
    logit_mean: float
    logit_std: float
    sigmoid_scale: float
    shift: float  # 1.0 = none
    # the base's own shift, replacing `shift`: Flux's from the image's token count, SD3's
    # fixed one (its scheduler's)
    resolution_shift: bool
    weighting: str  # none, sigma_sqrt or cosmap
    guidance: float  # fed to a guidance-distilled denoiser (Flux.1-dev) while training


class FlowMatching(Objective):
    """Rectified flow: noisy = (1 - sigma) x0 + sigma eps, target eps - x0, sigma in (0, 1)
    (Flux.1, SD3). Timesteps here are sigmas; the family's predictor passes them to its
    denoiser (which scales them by 1000 itself, as the pipeline's sampling does)."""

    name = "flow_matching"

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, settings: FlowSettings):
        self.scheduler, self.settings = scheduler, settings

    @classmethod
    def from_pipeline(cls, pipe, settings: FlowSettings) -> FlowMatching:
        return cls(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), settings)

    @property
    def prediction_type(self) -> str:
        return "flow"

    def sample_timesteps(self, n, gen, shape):
        s = self.settings
        # diffusers' density of the SD3/Flux training scripts: uniform or logit-normal;
        # kohya's `sigmoid` sampling is the logit-normal with mean 0 and std sigmoid_scale
        if s.timestep_sampling == "uniform":
            u = compute_density_for_timestep_sampling("uniform", n, generator=gen)
        else:
            mean, std = ((s.logit_mean, s.logit_std) if s.timestep_sampling == "logit_normal"
                         else (0.0, s.sigmoid_scale))
            u = compute_density_for_timestep_sampling("logit_normal", n, mean, std,
                                                      generator=gen)
        if s.resolution_shift:
            c = self.scheduler.config
            if not c.use_dynamic_shifting:
                # the base's own fixed shift, as its scheduler samples (SD3: 3.0)
                return c.shift * u / (1 + (c.shift - 1) * u)
            # Flux's resolution-dependent shift (kohya's flux_shift): mu from the 2x2
            # token count, as FluxPipeline computes it for sampling at this size
            tokens = (shape[-2] // 2) * (shape[-1] // 2)
            mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len,
                                 c.base_shift, c.max_shift)
            return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        if s.shift != 1.0:
            # the static shift of FlowMatchEulerDiscreteScheduler (kohya's discrete_flow_shift)
            return s.shift * u / (1 + (s.shift - 1) * u)
        return u

    def fixed_timesteps(self, t, n):
        return torch.full((n,), t / self.scheduler.config.num_train_timesteps)

    def _sigma(self, timesteps, latents):
        return timesteps.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))

    def noisy(self, latents, noise, timesteps):
        sigma = self._sigma(timesteps, latents)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def weights(self, timesteps, min_snr_gamma):
        if self.settings.weighting == "none":
            return None
        return compute_loss_weighting_for_sd3(self.settings.weighting, timesteps)


def diffusion_loss(predict: Predict, objective: Objective, latents, gen, noise_offset=0.0,
                   min_snr_gamma=0.0, timesteps=None, shard: tuple[int, int] = (0, 1),
                   per_sample: bool = False):
    """The training loss of one batch of latents under `objective` (per_sample: each
    image's own, weighted, loss instead of the batch mean).

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
        timesteps = objective.sample_timesteps(b * world, gen, tuple(latents.shape))[mine]
    timesteps = timesteps.to(latents.device)
    noisy = objective.noisy(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps)
    pred = predict(noisy, timesteps)
    weights = objective.weights(timesteps, min_snr_gamma)
    if weights is None and not per_sample:
        return F.mse_loss(pred.float(), target.float())
    losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        losses = losses * weights.to(losses.device)
    return losses if per_sample else losses.mean()
