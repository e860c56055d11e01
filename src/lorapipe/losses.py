"""The diffusion training loss and the seeded generators all randomness comes from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def seeded_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    """A generator seeded from (seed, purpose, index), independent of anything run before."""
    salt = {"epoch": 1, "micro": 2, "fixed": 3, "bucket": 4, "caption": 5}[purpose]
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) * 1_000_003 + index)


def diffusion_loss(unet, scheduler, latents, unet_inputs: dict, gen, noise_offset=0.0,
                   min_snr_gamma=0.0, timesteps=None, shard: tuple[int, int] = (0, 1)):
    """DDPM training loss (Ho et al., 2020) for epsilon or v-prediction bases.

    shard=(rank, world): these latents are part `rank` of a global batch split over `world`
    processes. Noise and timesteps are drawn for the whole global batch and sliced, so each
    image gets exactly what it would get in a single process: data parallelism changes where
    the work runs, not what is computed. unet_inputs: the family's conditioning for these
    latents (encoder_hidden_states, and SDXL's added_cond_kwargs).
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
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b * world,),
                                  generator=gen)[mine]
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, **unet_inputs).sample
    if not min_snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    # Min-SNR-gamma weighting (Hang et al., 2023), as in diffusers' training examples
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=min_snr_gamma)
    weights = weights / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
