"""Stable Diffusion XL (and its descendants: Pony, Illustrious, NoobAI are SDXL checkpoints).

Two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with a projection): their penultimate
hidden states, concatenated, condition cross-attention; bigG's pooled, projected embedding and
the micro-conditioning (original size, crop top-left, target size; Podell et al., 2023,
section 2.2) enter through the UNet's added `text_time` embedding.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import ldm
from lorapipe.diffusion.families.tiny import TINY_SEED, tiny_tokenizer, tiny_vae
from lorapipe.diffusion.families.unet import UNetFamily
from lorapipe.diffusion.family_list import BY_NAME

ARCH_SDXL = "stable-diffusion-xl-v1-base"  # the Stability AI model spec's id
KOHYA_SDXL = "sdxl_base_v1-0"  # kohya's ss_base_model_version
TIME_ID_COLUMNS = ("original_height", "original_width", "crop_top", "crop_left", "height",
                   "width")


class SDXL(UNetFamily):
    facts = BY_NAME["sdxl"]  # its entry in the family list
    pipeline_class = StableDiffusionXLPipeline
    cond_keys = ("text_states", "pooled", "time_ids")
    load_kwargs = {"add_watermarker": False}
    example = "SDXL 1.0"
    text_encoders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    kohya_text_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    unused_text_layers = {"text_encoder": 1}  # its penultimate layer conditions the UNet

    def build_builtin(self):
        return build_tiny_sdxl()

    def encode_tokens(self, encoders, ids):
        # StableDiffusionXLPipeline.encode_prompt's computation (no clip skip): both
        # encoders' penultimate states side by side; the pooled, projected embedding of the
        # second (the tests hold it equal to encode_prompt)
        states = []
        for name in self.text_encoders:
            out = encoders[name](ids[name], output_hidden_states=True)
            pooled = out[0]
            states.append(out.hidden_states[-2])
        return {"text_states": torch.cat(states, dim=-1), "pooled": pooled}

    def image_conditioning(self, rows):
        missing = [c for c in TIME_ID_COLUMNS if c not in rows[0]]
        if missing:
            raise LorapipeError(
                f"data/processed/metadata.csv has no {', '.join(missing)} column(s), which "
                "SDXL's micro-conditioning needs; rerun the preprocess stage")
        # (original_size, crops_coords_top_left, target_size) as (h, w) pairs, in the order
        # StableDiffusionXLPipeline._get_add_time_ids builds them for sampling
        return {"time_ids": torch.tensor([[float(r[c]) for c in TIME_ID_COLUMNS] for r in rows])}

    def denoiser_inputs(self, cond):
        return {"encoder_hidden_states": cond["text_states"],
                "added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}

    def base_version(self, pipe):
        v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
        return {"v2": False, "v_pred": v_pred, "version": KOHYA_SDXL, "architecture": ARCH_SDXL}

    def webui_module(self, module: str, denoiser_config) -> str:
        # kohya's SDXL LoRAs use the original SGM names, which every WebUI loader maps
        return ldm.unet_module(module, denoiser_config).replace(".", "_")


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline small enough to train in minutes on 2 CPU cores.

    SDXL's structure with tiny widths: a CLIP-L-like encoder (quick-GELU) and an
    OpenCLIP-bigG-like one (GELU, text projection) whose penultimate states are concatenated;
    a UNet with three levels (no attention at the first), two resnets per level, 1/1/2
    transformer layers (SDXL: 0/2/10), linear projections and the `text_time` added
    embedding; the tiny SD's VAE (unit-variance latents on the example data); SDXL's
    scaled-linear schedule with leading timestep spacing. Seeded: identical every time.
    """
    tokenizer = tiny_tokenizer()
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(TINY_SEED + 10)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **common, hidden_size=32, intermediate_size=64, hidden_act="quick_gelu"))
    # wider than the first, as bigG (1280) is than CLIP-L (768): loaders tell the two apart
    # by width
    torch.manual_seed(TINY_SEED + 11)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        **common, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48))
    vae = tiny_vae()
    torch.manual_seed(TINY_SEED + 12)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64), layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
        use_linear_projection=True, norm_num_groups=8, cross_attention_dim=32 + 48,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 48,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


FAMILY = SDXL()


# SDXL 1.0 base's UNet config (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json;
# the keys that differ from UNet2DConditionModel's defaults): the tests check the WebUI
# export against it and bench/sdxl_step.py builds it, both without weights.
SDXL_1_0_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True, "norm_num_groups": 32,
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
