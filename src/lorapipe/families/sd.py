"""Stable Diffusion 1.x and 2.x: one CLIP (SD 1.x) or OpenCLIP (SD 2.x) text encoder whose
last hidden state conditions the UNet through cross-attention; no other UNet inputs."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from lorapipe.families import Family

# the Stability AI model spec's architecture ids
ARCH_SD_V1 = "stable-diffusion-v1"
ARCH_SD_V2_512 = "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = "stable-diffusion-v2-768-v"


class SD(Family):
    name = "sd"
    builtin = "builtin:tiny-sd"
    pipeline_class = StableDiffusionPipeline
    diffusers_classes = ("StableDiffusionPipeline",)
    cond_keys = ("text_states",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    title = "Stable Diffusion 1.x/2.x"
    example = "SD 1.5"
    text_encoders = {"text_encoder": "tokenizer"}
    kohya_text_prefixes = {"text_encoder": "lora_te_"}

    def build_builtin(self):
        from lorapipe.models import build_tiny_sd

        return build_tiny_sd()

    def owns_single_file(self, keys: set[str]) -> bool:
        return ("model.diffusion_model.input_blocks.0.0.weight" in keys
                and not any(k.startswith("conditioner.") for k in keys))

    def encode_tokens(self, encoders, ids):
        # the last hidden state, as StableDiffusionPipeline.encode_prompt (no clip skip)
        return {"text_states": encoders["text_encoder"](ids["text_encoder"])[0]}

    def unet_inputs(self, cond):
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


FAMILY = SD()
