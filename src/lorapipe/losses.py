"""The diffusion training loss and the seeded generators all randomness comes from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def seeded_generator(seed: int, purpose: str, index: int) -> torch.Generator:
    """A generator seeded from (seed, purpose, index), independent of anything run before."""
    salt = {"epoch": 1, "micro": 2, "fixed": 3}[purpose]
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) * 1_000_003 + index)


def diffusion_loss(unet, scheduler, latents, text, gen, noise_offset=0.0, min_snr_gamma=0.0,
                   timesteps=None):
    """DDPM training loss (Ho et al., 2020) for epsilon or v-prediction bases."""
    noise = torch.randn(latents.shape, generator=gen).to(latents.device)
    if noise_offset:
        # offset noise (Guttenberg, 2023): lets the model shift whole-image brightness
        noise = noise + noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=gen).to(latents.device)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps,
                                  (latents.shape[0],), generator=gen)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = unet(noisy, timesteps, text).sample
    if not min_snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    # Min-SNR-gamma weighting (Hang et al., 2023), as in diffusers' training examples
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=min_snr_gamma)
    weights = weights / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
