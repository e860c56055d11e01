"""Chroma (Chroma1-Base, Chroma1-HD and their fine-tunes): Lodestone Rock's open model
derived from Flux.1-schnell (ChromaTransformer2DModel: Flux's double- and single-stream
blocks and BFL's module names, with the per-block modulation projections pruned and
replaced by one small network, the "distilled guidance layer", that computes every block's
modulation from the timestep). It reads T5-XXL only (no CLIP, so no pooled vector) with
T5's attention mask applied, and the transformer masks the text padding but the first pad
token (ChromaPipeline._get_t5_prompt_embeds); it has no guidance input, and samples with
real classifier-free guidance and a negative prompt.

So Chroma is Flux in everything but its conditioning and the modules it lacks: this family
is the Flux family's subclass. Trained by flow matching as kohya's networks.lora_flux
documents for `--model_type chroma` (sigmoid noise levels, no guidance, the T5 mask); the
WebUI file has kohya's Flux layout (BFL names, fused qkv and linear1), which ComfyUI's and
kohya's Chroma loaders read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import (
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
)
from transformers import T5Config, T5EncoderModel

from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion.families.flux import (
    DOUBLE_ATTN,
    DOUBLE_KOHYA,
    SINGLE_ATTN,
    SINGLE_KOHYA,
    Flux,
    _preset,
)
from lorapipe.diffusion.families.tiny import TINY_SEED, tiny_t5_tokenizer, tiny_vae16
from lorapipe.diffusion.family_list import BY_NAME

T5_TOKENS = 512  # ChromaPipeline's max_sequence_length (kohya: t5xxl_max_token_length)
KOHYA_CHROMA = "chroma"  # kohya's ss_base_model_version for --model_type chroma
ARCH_CHROMA = "chroma"  # the model spec's architecture id kohya writes for it
CHROMA_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma1-HD"
# Chroma prunes the modulation projections kohya's Flux preset also trains
_PRUNED = {"norm1.linear", "norm1_context.linear", "norm.linear"}


@dataclass(frozen=True)
class Chroma(Flux):
    variant: str = "chroma"  # no guidance input: Flux's predictor passes none
    t5_tokens: int = T5_TOKENS

    facts = BY_NAME["chroma"]  # its entry in the family list
    pipeline_class = ChromaPipeline
    cond_keys = ("text_states", "text_mask")
    example = "Chroma1-HD"
    text_encoders = {"text_encoder": "tokenizer"}  # T5-XXL only
    lora_text_encoders = ()  # T5 gets no LoRA: lora.text_encoder is refused (recipe)
    no_text_lora = "Chroma's only text encoder is T5-XXL, which lorapipe gives no LoRA (as kohya)"
    kohya_text_prefixes = {}

    def build_builtin(self):
        return build_tiny_chroma()

    def specialize(self, pipe) -> Chroma:
        return Chroma("chroma", min(T5_TOKENS, pipe.tokenizer.model_max_length))

    def enable_gradient_checkpointing(self, denoiser) -> None:
        # diffusers 0.42's ChromaTransformer2DModel drops the attention mask when it
        # checkpoints its single-stream blocks (its forward passes the mask only on the path
        # without checkpointing), so its switch would train another model: every block is
        # checkpointed here instead, with all of its arguments
        for block in [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]:
            block.forward = functools.partial(_checkpointed, block.forward)

    def token_limit(self, name: str, tokenizer) -> int:
        return self.t5_tokens

    def encode_tokens(self, encoders, ids):
        # ChromaPipeline._get_t5_prompt_embeds: T5 under its padding mask (the tokenizer's:
        # every token but the pads, which are T5's id 0 only), and the transformer's text mask,
        # which keeps the first pad token as well
        t5 = encoders["text_encoder"]
        tokens = ids["text_encoder"]
        mask = (tokens != t5.config.pad_token_id).long()
        states = t5(tokens, attention_mask=mask, output_hidden_states=False)[0]
        lengths = mask.sum(dim=1, keepdim=True)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        return {"text_states": states, "text_mask": (positions <= lengths).to(states.dtype)}

    def predictor(self, denoiser, cond, objective=None):
        # Flux's packing and position ids; the text mask extended over the image tokens, as
        # ChromaPipeline._prepare_attention_mask does
        states, text_mask = cond["text_states"], cond["text_mask"]

        def predict(noisy, sigmas):
            b, c, h, w = noisy.shape
            packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device,
                                                             noisy.dtype)
            mask = torch.cat([text_mask, torch.ones(b, packed.shape[1], dtype=text_mask.dtype,
                                                    device=text_mask.device)], dim=1)
            out = denoiser(hidden_states=packed, timestep=sigmas, img_ids=img_ids,
                           encoder_hidden_states=states, attention_mask=mask,
                           txt_ids=torch.zeros(states.shape[1], 3, device=states.device,
                                               dtype=states.dtype)).sample
            return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

        return predict

    def denoiser_inputs(self, cond):
        return {"encoder_hidden_states": cond["text_states"],
                "attention_mask": cond["text_mask"]}

    def single_file_variant(self, keys: set[str]) -> str:
        return "chroma"

    def load_single_file(self, path: Path, config: Path | None, keys: set[str]):
        """Chroma's BFL-layout file (Chroma1-HD.safetensors: the transformer only) into the
        pipeline of model.config's folder (T5, VAE, scheduler)."""
        if config is None:
            raise LorapipeError(
                f"model.base: {path.name} is a Chroma transformer file (Black Forest Labs' "
                "layout): it holds no text encoder or VAE; set model.config to a diffusers "
                "Chroma folder (ChromaPipeline.save_pretrained) with them")
        transformer = ChromaTransformer2DModel.from_single_file(
            str(path), config=str(config), subfolder="transformer", local_files_only=True)
        return ChromaPipeline.from_pretrained(str(config), transformer=transformer,
                                              local_files_only=True)

    def sampling_kwargs(self, settings, scheduler_config) -> dict:
        # real classifier-free guidance with the negative prompt (kohya's sample --l 4.0)
        return {"negative_prompt": settings.negative_prompt or None,
                "guidance_scale": settings.guidance_scale,
                "max_sequence_length": self.t5_tokens}

    def targets(self, preset):
        """Flux's presets over Chroma's modules: `attn` as for Flux; `kohya` as kohya's
        lora_flux wraps Chroma: Flux's less the modulation projections Chroma has pruned. A
        list names transformer modules. No text encoder LoRA (T5 only)."""
        if preset == "attn":
            transformer = _preset(DOUBLE_ATTN, SINGLE_ATTN)
        elif preset == "kohya":
            transformer = _preset([n for n in DOUBLE_KOHYA if n not in _PRUNED],
                                  [n for n in SINGLE_KOHYA if n not in _PRUNED])
        else:
            transformer = list(preset)
        return {"transformer": transformer}

    def base_version(self, pipe):
        return {"v2": False, "v_pred": False, "version": KOHYA_CHROMA,
                "architecture": ARCH_CHROMA, "implementation": CHROMA_IMPLEMENTATION,
                "prediction_type": None, "network_module": "networks.lora_flux"}


def _checkpointed(forward, *args, **kwargs):
    """forward(*args, **kwargs) with its activations recomputed in the backward pass."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def build_tiny_chroma() -> ChromaPipeline:
    """A Chroma-shaped pipeline small enough to train in minutes on 2 CPU cores.

    ChromaTransformer2DModel with 2 double- and 4 single-stream blocks (4 heads of 8, RoPE
    axes 2+2+4) and a 2-layer distilled guidance network; the T5-like encoder and tokenizer of
    the tiny Flux (its sole text encoder here), the 16-channel tiny VAE, and a flow-matching
    Euler scheduler without a shift (kohya trains Chroma with unshifted sigmoid noise
    levels). Seeded: identical every time."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(TINY_SEED + 40)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    vae = tiny_vae16()
    torch.manual_seed(TINY_SEED + 41)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    for model in (text_encoder, vae, transformer):
        model.eval()
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


FAMILY = Chroma()

# lodestones/Chroma1-HD's transformer/config.json: Flux.1's widths with the distilled
# guidance network (the tests check the WebUI export against it without weights)
CHROMA_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "axes_dims_rope": [16, 56, 56], "approximator_num_channels": 64,
    "approximator_hidden_dim": 5120, "approximator_layers": 5,
}
