"""Stable Diffusion 1.x and 2.x: one CLIP (SD 1.x) or OpenCLIP (SD 2.x) text encoder whose
last hidden state conditions the UNet through cross-attention; no other UNet inputs."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lorapipe.diffusion.families.tiny import TINY_SEED, tiny_tokenizer, tiny_vae
from lorapipe.diffusion.families.unet import UNetFamily
from lorapipe.diffusion.family_list import BY_NAME

# the Stability AI model spec's architecture ids
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"


class SD(UNetFamily):
    facts = BY_NAME["sd"]  # its entry in the family list
    pipeline_class = StableDiffusionPipeline
    cond_keys = ("text_states",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    example = "SD 1.5"
    text_encoders = {"text_encoder": "tokenizer"}
    kohya_text_prefixes = {"text_encoder": "lora_te_"}

    def build_builtin(self):
        return build_tiny_sd()

    def encode_tokens(self, encoders, ids):
        # the last hidden state, as StableDiffusionPipeline.encode_prompt (no clip skip)
        return {"text_states": encoders["text_encoder"](ids["text_encoder"])[0]}

    def denoiser_inputs(self, cond):
        return {"encoder_hidden_states": cond["text_states"]}

    def base_version(self, pipe):
        return base_version(pipe.unet.config.cross_attention_dim,
                            pipe.scheduler.config.prediction_type)


def base_version(cross_attention_dim: int, prediction_type: str) -> dict:
    """What the base model is, from its UNet and scheduler (SD 2.x conditions on 1024-wide
    OpenCLIP states, SD 1.x on 768-wide CLIP ones; the builtin tiny model is SD 1.x-shaped)."""
    v2 = cross_attention_dim == 1024
    v_pred = prediction_type == "v_prediction"
    arch = (ARCH_SD_V2_768_V if v_pred else ARCH_SD_V2_512) if v2 else ARCH_SD_V1
    return {"v2": v2, "v_pred": v_pred, "version": "sd_v2" if v2 else "sd_v1",
            "architecture": arch}


def build_tiny_sd() -> StableDiffusionPipeline:
    """An SD1.x-shaped pipeline small enough to train in minutes on 2 CPU cores.

    Same architecture family as SD 1.5 (cross-attention UNet, KL VAE with 8x downsampling,
    CLIP text encoder, scaled-linear DDPM schedule), with tiny widths. Seeded: identical
    weights every time, on every machine with the same torch.
    """
    tokenizer = tiny_tokenizer()
    torch.manual_seed(TINY_SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = tiny_vae()
    torch.manual_seed(TINY_SEED + 2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=8,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


FAMILY = SD()


# SD 1.5's UNet config (runwayml/stable-diffusion-v1-5, unet/config.json; the keys that differ
# from UNet2DConditionModel's defaults): the tests check exports against it and the benches
# build it, both without its weights.
SD_1_5_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
               "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
