"""Flux.1 (dev and schnell): a 12B rectified-flow transformer (FluxTransformer2DModel: 19
double-stream blocks, image and text tokens with their own weights and a joint attention,
then 38 single-stream blocks over the concatenated tokens; 3-axis RoPE). It is conditioned
on T5-XXL's token states (the sequence) and CLIP-L's pooled embedding (a vector beside the
timestep); dev, guidance-distilled, also takes the guidance scale as an input. Latents have
16 channels, are shifted and scaled by the VAE's shift_factor and scaling_factor, and enter
the transformer packed 2x2 into 64-channel tokens with (0, row, column) position ids.

Trained by flow matching (lorapipe.diffusion.objectives.FlowMatching); the LoRA is scaled
through joint_attention_kwargs when sampling; the WebUI file uses kohya's networks.lora_flux
names, which are Black Forest Labs' module names (BFL fuses q, k and v into one projection,
and in the single blocks also the MLP input; to_webui fuses the LoRAs exactly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
)

from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion.families.tiny import (
    TINY_SEED,
    TINY_VAE16_SCALING,
    TINY_VAE16_SHIFT,
    tiny_t5_tokenizer,
    tiny_tokenizer,
    tiny_vae16,
)
from lorapipe.diffusion.family import Family, fused_webui
from lorapipe.diffusion.family_list import BY_NAME
from lorapipe.diffusion.objectives import FlowMatching, FlowSettings
from lorapipe.diffusion.rules import FLOW_MATCHING_REFUSED

# the Stability AI model spec's ids for Flux LoRAs, as kohya writes them
ARCH_DEV, ARCH_SCHNELL = "flux-1-dev", "flux-1-schnell"
KOHYA_FLUX = "flux1"  # kohya's ss_base_model_version
BFL_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
# T5 tokens per caption, as the pipelines' model cards and kohya (t5xxl_max_token_length)
# use them; a tokenizer that declares fewer (the builtin's) caps it
T5_TOKENS = {"dev": 512, "schnell": 256}
# a tensor of dev's BFL transformer only (schnell has no guidance_in), with or without
# ComfyUI's prefix (the family's own marker: lorapipe.diffusion.family_list)
BFL_GUIDANCE = "guidance_in.in_layer.weight"

# lora.targets presets as peft regexes (full match on the module name), so that a
# single block's proj_out matches and the final layer's top-level proj_out does not
_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
DOUBLE_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
SINGLE_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v"]
# what kohya's networks.lora_flux wraps by default: every Linear of DoubleStreamBlock
# (img/txt attention qkv and proj, MLP, modulation) and of SingleStreamBlock (linear1 =
# q, k, v and the MLP input; linear2; modulation), in diffusers' names
DOUBLE_KOHYA = [*DOUBLE_ATTN, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "norm1.linear", "norm1_context.linear"]
SINGLE_KOHYA = [*SINGLE_ATTN, "proj_mlp", "proj_out", "norm.linear"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_MLP = ["fc1", "fc2"]


def _preset(double: list[str], single: list[str]) -> str:
    names = "|".join(re.escape(n) for n in double)
    single_names = "|".join(re.escape(n) for n in single)
    return f"(?:(?:{_DOUBLE}(?:{names}))|(?:{_SINGLE}(?:{single_names})))"


# diffusers module (in a block) -> (BFL module, part index, parts): the parts of a fused BFL
# projection, in its output order (diffusers' own single-file converter splits them so)
_DOUBLE_BFL = {
    "attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3), "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3), "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.net.0.proj": ("img_mlp.0", 0, 1), "ff.net.2": ("img_mlp.2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp.0", 0, 1), "ff_context.net.2": ("txt_mlp.2", 0, 1),
    "norm1.linear": ("img_mod.lin", 0, 1), "norm1_context.linear": ("txt_mod.lin", 0, 1),
}
_SINGLE_BFL = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4), "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation.lin", 0, 1),
}
_TOP_BFL = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    # BFL's final modulation is (shift, scale), diffusers' AdaLayerNormContinuous (scale,
    # shift): the rows swap (bfl_module says so)
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED = "final_layer.adaLN_modulation.1"


def bfl_module(module: str) -> tuple[str, int, int]:
    """A transformer module's diffusers name -> (its BFL module, its part of it, the parts):
    'transformer_blocks.0.attn.to_k' -> ('double_blocks.0.img_attn.qkv', 1, 3)."""
    for prefix, bfl, table in (("single_transformer_blocks.", "single_blocks.", _SINGLE_BFL),
                               ("transformer_blocks.", "double_blocks.", _DOUBLE_BFL)):
        if module.startswith(prefix):
            index, _, rest = module.removeprefix(prefix).partition(".")
            if rest in table:
                name, part, parts = table[rest]
                return f"{bfl}{index}.{name}", part, parts
    if module in _TOP_BFL:
        return _TOP_BFL[module], 0, 1
    raise LorapipeError(f"the transformer module {module!r} has no counterpart in Black "
                        "Forest Labs' Flux model, so kohya's file cannot name it")


def part_sizes(bfl: str, config) -> list[int]:
    """The output sizes of a fused BFL projection's parts (q, k, v[, MLP input])."""
    inner = config.num_attention_heads * config.attention_head_dim
    if bfl.endswith("linear1"):
        return [inner, inner, inner, 4 * inner]  # FluxSingleTransformerBlock's mlp_ratio 4
    return [inner] * 3


@dataclass(frozen=True)
class Flux(Family):
    variant: str = "dev"  # dev (guidance-distilled) or schnell (timestep-distilled)
    t5_tokens: int = T5_TOKENS["dev"]  # T5 tokens per caption, training and sampling alike

    facts = BY_NAME["flux"]  # its entry in the family list
    pipeline_class = FluxPipeline
    denoiser = "transformer"
    kohya_prefix = "lora_unet_"
    target_example = ("transformer module names such as attn.to_q, attn.to_k, attn.to_v, "
                      "attn.to_out.0")
    cond_keys = ("text_states", "pooled")
    load_kwargs = {}
    example = "FLUX.1-dev"
    text_encoders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    # lora.text_encoder trains CLIP-L only: a T5-XXL LoRA costs T5 per step for little gain,
    # and kohya, SimpleTuner and ai-toolkit leave it off by default too
    lora_text_encoders = ("text_encoder",)
    kohya_text_prefixes = {"text_encoder": "lora_te1_"}  # kohya's lora_flux (T5 would be te3)
    # diffusers' kohya Flux reader multiplies alpha / rank into the weights it returns
    reader_bakes_alpha = True
    refused = FLOW_MATCHING_REFUSED  # noise offset and Min-SNR: DDPM notions

    def build_builtin(self):
        return build_tiny_flux()

    def specialize(self, pipe) -> Flux:
        variant = "dev" if pipe.transformer.config.guidance_embeds else "schnell"
        return Flux(variant, min(T5_TOKENS[variant], pipe.tokenizer_2.model_max_length))

    def objective(self, pipe, flow: FlowSettings | None = None):
        if flow is None:
            raise LorapipeError("Flux trains by flow matching: train.flow is needed")
        return FlowMatching.from_pipeline(pipe, flow)

    def predictor(self, denoiser, cond, objective=None):
        # packed 2x2 as FluxPipeline._pack_latents does, with its position ids; text tokens
        # at position 0 (txt_ids zeros), as the pipeline passes them
        inputs = self.denoiser_inputs(cond)
        guidance = objective.settings.guidance if objective is not None else 1.0

        def predict(noisy, sigmas):
            b, c, h, w = noisy.shape
            packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device,
                                                             noisy.dtype)
            extra = {}
            if self.variant == "dev":  # the denoiser may be wrapped (DDP): no .config
                extra["guidance"] = torch.full((b,), float(guidance), device=noisy.device)
            out = denoiser(hidden_states=packed, timestep=sigmas, img_ids=img_ids,
                           **inputs, **extra).sample
            return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)

        return predict

    def denoiser_inputs(self, cond):
        states = cond["text_states"]
        return {"encoder_hidden_states": states, "pooled_projections": cond["pooled"],
                "txt_ids": torch.zeros(states.shape[1], 3, device=states.device,
                                       dtype=states.dtype)}

    def lora_scale_kwargs(self, scale):
        return {"joint_attention_kwargs": {"scale": scale}}

    def lora_reading_kwargs(self, denoiser):
        # FluxLoraLoaderMixin.lora_state_dict returns the alphas only when asked
        return {"return_alphas": True}

    def denoiser_lora_to_peft(self, state):
        return convert_unet_state_dict_to_peft(state)

    def token_limit(self, name: str, tokenizer) -> int:
        return self.t5_tokens if name == "text_encoder_2" else tokenizer.model_max_length

    def encode_tokens(self, encoders, ids):
        # FluxPipeline.encode_prompt: CLIP-L's pooled output, T5's last hidden state
        pooled = encoders["text_encoder"](ids["text_encoder"],
                                          output_hidden_states=False).pooler_output
        states = encoders["text_encoder_2"](ids["text_encoder_2"],
                                            output_hidden_states=False)[0]
        return {"text_states": states, "pooled": pooled}

    def single_file_variant(self, keys: set[str]) -> str:
        return "dev" if any(k == BFL_GUIDANCE or k.endswith("." + BFL_GUIDANCE)
                            for k in keys) else "schnell"

    def load_single_file(self, path: Path, config: Path | None, keys: set[str]):
        """The BFL transformer file (flux1-dev.safetensors: the transformer only) into the
        pipeline of model.config's folder (text encoders, VAE, scheduler)."""
        if config is None:
            raise LorapipeError(
                f"model.base: {path.name} is a Flux.1 transformer file (Black Forest Labs' "
                "layout): it holds no text encoders or VAE; set model.config to a diffusers "
                "FLUX.1 folder (FluxPipeline.save_pretrained) with them")
        variant = self.single_file_variant(keys)
        transformer = FluxTransformer2DModel.from_single_file(
            str(path), config=str(config), subfolder="transformer", local_files_only=True,
            guidance_embeds=variant == "dev")
        return FluxPipeline.from_pretrained(str(config), transformer=transformer,
                                            local_files_only=True)

    uses_sample_scheduler = False
    size_multiple = 16  # 8x VAE, then 2x2 packing

    def sampler(self, name: str, scheduler):
        # Flux samples with the flow-matching Euler scheduler of its config only: the DDPM
        # samplers of sample.scheduler do not apply (the sample stage says so)
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)

    def sampling_kwargs(self, settings, scheduler_config) -> dict:
        # dev's guidance_scale is the distilled guidance input (schnell ignores it); the
        # negative prompt needs true CFG (two passes per step), left off as the anchors do
        return {"guidance_scale": settings.guidance_scale,
                "max_sequence_length": self.t5_tokens}

    def targets(self, preset):
        """Presets: `attn`, the attention projections of both block types (double: image and
        text q, k, v, out; single: q, k, v); `kohya`, what kohya's networks.lora_flux wraps:
        also the MLPs and the modulation projections (double: ff, ff_context, norm1.linear,
        norm1_context.linear; single: proj_mlp, proj_out, norm.linear), and the CLIP-L text
        encoder's attention and MLP. A list names transformer modules (suffixes, as peft
        matches them); the text encoder then gets `attn`."""
        text = TEXT_ATTN + (TEXT_MLP if preset == "kohya" else [])
        if preset == "attn":
            transformer = _preset(DOUBLE_ATTN, SINGLE_ATTN)
        elif preset == "kohya":
            transformer = _preset(DOUBLE_KOHYA, SINGLE_KOHYA)
        else:
            transformer = list(preset)
        return {"transformer": transformer, "text_encoder": text}

    def to_webui(self, state: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                 config) -> dict[str, torch.Tensor]:
        """The transformer's LoRA in kohya's Flux layout (family.fused_webui); diffusers'
        kohya reader recognises the block-diagonal up matrix and splits it back."""
        def locate(module):
            bfl, part, parts = bfl_module(module)
            return bfl, part, parts, bfl == SWAPPED

        return fused_webui(state, alpha, self.kohya_prefix, locate,
                           lambda bfl: part_sizes(bfl, config))

    def network_args(self, lp) -> dict[str, str]:
        # lora_flux's own args cannot say "attention only" (linear1 fuses the MLP input):
        # the preset is recorded under lorapipe's key
        return {} if lp.targets == "kohya" else {
            "lorapipe_targets": lp.targets if isinstance(lp.targets, str)
            else ",".join(lp.targets)}

    def base_version(self, pipe):
        return {"v2": False, "v_pred": False, "version": KOHYA_FLUX,
                "architecture": ARCH_DEV if self.variant == "dev" else ARCH_SCHNELL,
                "implementation": BFL_IMPLEMENTATION, "prediction_type": None,
                "network_module": "networks.lora_flux"}


# the tiny 16-channel VAE's latent shift and scale (lorapipe.diffusion.families.tiny)
TINY_FLUX_SHIFT = TINY_VAE16_SHIFT
TINY_FLUX_SCALING = TINY_VAE16_SCALING


def build_tiny_flux(guidance_embeds: bool = True) -> FluxPipeline:
    """A Flux.1-dev-shaped pipeline small enough to train in minutes on 2 CPU cores.

    FluxTransformer2DModel with 2 double- and 4 single-stream blocks, 4 heads of 8 (RoPE
    axes 2+2+4 = 8), 64-channel packed input and the guidance embedding (dev); a 16-channel
    AutoencoderKL without quant convs, as Flux's; a CLIP-L-like encoder (pooled) and a
    T5-like encoder (gated GELU, relative attention) with offline tokenizers; Flux.1-dev's
    scheduler config (shift 3, dynamic shifting). Seeded: identical every time.
    guidance_embeds=False: the schnell-shaped variant (no guidance input), for the tests.
    """
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(TINY_SEED + 20)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(TINY_SEED + 21)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    vae = tiny_vae16()
    torch.manual_seed(TINY_SEED + 23)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_1_DEV_SCHEDULER)
    for model in (text_encoder, text_encoder_2, vae, transformer):
        model.eval()  # as from_pretrained leaves them: T5's dropout off
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


FAMILY = Flux()

# black-forest-labs/FLUX.1-dev's scheduler/scheduler_config.json
FLUX_1_DEV_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# black-forest-labs/FLUX.1-dev's transformer/config.json (schnell: guidance_embeds false):
# the tests check the WebUI export against it and bench/flux_step.py builds it, both
# without weights
FLUX_1_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
