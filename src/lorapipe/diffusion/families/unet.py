"""What the UNet families (SD 1.x/2.x, SDXL) share: a UNet2DConditionModel trained with DDPM
(epsilon or v-prediction), the LoRA scaled through cross_attention_kwargs when sampling,
kohya's `lora_unet_` names, and the lora.targets presets over diffusers' UNet modules."""

from __future__ import annotations

import inspect
import re

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils import convert_unet_state_dict_to_peft

from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion.family import Family
from lorapipe.diffusion.objectives import DDPM, Objective

# a single file's marker tensors (empty), as ComfyUI's model detection reads them: the UNet
# predicts v; its schedule has zero terminal SNR (NoobAI-XL v-pred and other anime bases)
V_PRED_MARK, ZTSNR_MARK = "v_pred", "ztsnr"
# rescaled classifier-free guidance for a zero-terminal-SNR base (Lin et al., 2024, section
# 3.4: phi = 0.7), which keeps guided images from over-exposing
ZTSNR_GUIDANCE_RESCALE = 0.7

# the peft target names of the lora.targets presets (UNetFamily.targets)
UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_TRANSFORMER = ["proj_in", "proj_out", *UNET_ATTN, "ff.net.0.proj", "ff.net.2"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_MLP = ["fc1", "fc2"]


class UNetFamily(Family):
    denoiser = "unet"
    kohya_prefix = "lora_unet_"
    target_example = "UNet module names such as to_q, to_k, to_v, to_out.0"

    def objective(self, pipe, flow=None) -> Objective:
        return DDPM.from_pipeline(pipe)

    def set_schedule(self, pipe, prediction_type, noise_schedule, marks):
        """The base's scheduler with model.prediction_type and model.noise_schedule: the
        objective (objectives.DDPM), the samplers (built from this config) and the WebUI
        metadata all read them from there. A zero-terminal-SNR schedule (diffusers'
        rescale_betas_zero_snr, Lin et al.) samples from the last timestep ("trailing")."""
        config = pipe.scheduler.config
        prediction = (prediction_type if prediction_type != "auto"
                      else "v_prediction" if V_PRED_MARK in marks else config.prediction_type)
        zero_snr = (noise_schedule == "zero_terminal_snr" if noise_schedule != "auto"
                    else ZTSNR_MARK in marks or bool(config.get("rescale_betas_zero_snr")))
        if zero_snr and prediction != "v_prediction":
            raise LorapipeError(
                f"the base's noise schedule has zero terminal SNR but it predicts {prediction}; "
                "zero SNR needs v-prediction: set model.prediction_type to v_prediction (or "
                "model.noise_schedule to default)")
        if (prediction, zero_snr) == (config.prediction_type,
                                      bool(config.get("rescale_betas_zero_snr"))):
            return
        changes = {"prediction_type": prediction, "rescale_betas_zero_snr": zero_snr}
        if zero_snr:
            changes["timestep_spacing"] = "trailing"
        cls = type(pipe.scheduler)
        if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            # PNDM (SD 1.x/2.x folders) has no zero-SNR switch and would drop it from its
            # config; Euler, which sampling builds from this config anyway, keeps it
            cls = EulerDiscreteScheduler
        pipe.scheduler = cls.from_config(config, **changes)

    def sampling_kwargs(self, settings, scheduler_config):
        kwargs = super().sampling_kwargs(settings, scheduler_config)
        if scheduler_config.get("rescale_betas_zero_snr"):
            kwargs["guidance_rescale"] = ZTSNR_GUIDANCE_RESCALE
        return kwargs

    def predictor(self, denoiser, cond, objective=None):
        inputs = self.denoiser_inputs(cond)
        return lambda noisy, timesteps: denoiser(noisy, timesteps, **inputs).sample

    def lora_scale_kwargs(self, scale):
        return {"cross_attention_kwargs": {"scale": scale}}

    def lora_reading_kwargs(self, denoiser):
        # diffusers maps kohya's SGM block names (SDXL) back to its own with the UNet config
        return {"unet_config": denoiser.config}

    def denoiser_lora_to_peft(self, state):
        return convert_unet_state_dict_to_peft(state)

    def conv_targets(self, denoiser) -> tuple[list[str], list[str]]:
        """LoCon's extra modules, as kohya's networks.lora with conv_dim: every Linear and
        Conv2d inside the ResNet blocks and the down/upsamplers. Returns (those at lora.rank:
        the 1x1 shortcuts and the time-embedding projections; the 3x3 convolutions, at
        lora.conv_rank), as full module names."""
        main, conv = [], []
        for name, module in denoiser.named_modules():
            if not re.search(r"\.(resnets|downsamplers|upsamplers)\.\d+\.[^.]+$", name):
                continue
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
                conv.append(name)
            elif isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                main.append(name)
        return main, conv

    def targets(self, preset):
        """Presets: `attn`, the attention projections; `kohya`, what kohya's networks.lora
        wraps: every Linear and 1x1 conv inside the UNet's Transformer2DModel blocks
        (proj_in/out, attention, feed-forward) and the text encoders' CLIPAttention and
        CLIPMLP layers. A list names UNet modules; the text encoders then get `attn`."""
        text = TEXT_ATTN + (TEXT_MLP if preset == "kohya" else [])
        unet = (UNET_ATTN if preset == "attn" else UNET_TRANSFORMER if preset == "kohya"
                else list(preset))
        return {"unet": unet, **{name: text for name in self.text_encoders}}
