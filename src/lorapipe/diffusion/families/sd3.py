"""Stable Diffusion 3 and 3.5 (large, large turbo, medium): a rectified-flow MMDiT
(SD3Transformer2DModel: joint blocks in which image and text tokens keep their own weights
and share one attention; SD3.5 medium's MMDiT-X adds a second, image-only attention to its
first 13 blocks). It is conditioned on three text encoders: CLIP-L's and OpenCLIP-bigG's
penultimate states side by side, zero-padded to T5-XXL's width and put before T5's states in
one sequence; both CLIPs' pooled, projected embeddings side by side as a vector beside the
timestep. Latents have 16 channels, shifted and scaled by the VAE's shift_factor and
scaling_factor, patched 2x2 inside the transformer.

Trained by flow matching (lorapipe.diffusion.objectives.FlowMatching) as Stability's and
diffusers' scripts train it: logit-normal noise levels under the scheduler's fixed shift 3.0
(train.flow.resolution_shift takes it from the base). The LoRA is scaled through
joint_attention_kwargs when sampling; the WebUI file uses kohya's networks.lora_sd3 names,
the reference MMDiT's modules (joint_blocks.N.x_block / context_block), which fuse q, k
and v into one projection (to_webui fuses the LoRAs exactly, as for Flux).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion.families.tiny import (
    TINY_SEED,
    tiny_t5_tokenizer,
    tiny_tokenizer,
    tiny_vae16,
)
from lorapipe.diffusion.family import Family, fused_webui
from lorapipe.diffusion.family_list import BY_NAME
from lorapipe.diffusion.objectives import FlowMatching, FlowSettings
from lorapipe.diffusion.rules import FLOW_MATCHING_REFUSED

# the Stability AI model spec's ids, as kohya's sd3 branch writes them
ARCH_SD3_MEDIUM, ARCH_SD35_LARGE, ARCH_SD35_MEDIUM = (
    "stable-diffusion-3-medium", "stable-diffusion-3.5-large", "stable-diffusion-3.5-medium")
KOHYA_SD3 = "sd3"  # kohya's ss_base_model_version
SAI_IMPLEMENTATION = "https://github.com/Stability-AI/sd3.5"
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length (kohya: t5xxl_max_token_length)

# diffusers module in a joint block -> (MMDiT module, part, parts)
_BLOCK = {
    "attn.to_q": ("x_block.attn.qkv", 0, 3), "attn.to_k": ("x_block.attn.qkv", 1, 3),
    "attn.to_v": ("x_block.attn.qkv", 2, 3), "attn.to_out.0": ("x_block.attn.proj", 0, 1),
    "attn.add_q_proj": ("context_block.attn.qkv", 0, 3),
    "attn.add_k_proj": ("context_block.attn.qkv", 1, 3),
    "attn.add_v_proj": ("context_block.attn.qkv", 2, 3),
    "attn.to_add_out": ("context_block.attn.proj", 0, 1),
    "attn2.to_q": ("x_block.attn2.qkv", 0, 3), "attn2.to_k": ("x_block.attn2.qkv", 1, 3),
    "attn2.to_v": ("x_block.attn2.qkv", 2, 3), "attn2.to_out.0": ("x_block.attn2.proj", 0, 1),
    "ff.net.0.proj": ("x_block.mlp.fc1", 0, 1), "ff.net.2": ("x_block.mlp.fc2", 0, 1),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", 0, 1),
    "ff_context.net.2": ("context_block.mlp.fc2", 0, 1),
    "norm1.linear": ("x_block.adaLN_modulation.1", 0, 1),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", 0, 1),
}
_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out"]
# what kohya's networks.lora_sd3 wraps by default: every Linear of the joint blocks (both
# streams' attention, MLP and modulation), in diffusers' names
KOHYA = [*ATTN, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
         "norm1.linear", "norm1_context.linear"]
TEXT_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_MLP = ["fc1", "fc2"]


def mmdit_module(module: str, num_layers: int) -> tuple[str, int, int, bool]:
    """A transformer module's diffusers name -> (its reference MMDiT module, its part of it,
    the parts, whether its rows swap halves): 'transformer_blocks.0.attn.to_k' ->
    ('joint_blocks.0.x_block.attn.qkv', 1, 3, False). The modulations MMDiT stores as
    (shift, scale) and diffusers as (scale, shift) swap: the final layer's and the last
    block's text-side one (diffusers' single-file converter swaps the same two)."""
    if module.startswith("transformer_blocks."):
        index, _, rest = module.removeprefix("transformer_blocks.").partition(".")
        if rest in _BLOCK:
            name, part, parts = _BLOCK[rest]
            swapped = rest == "norm1_context.linear" and int(index) == num_layers - 1
            return f"joint_blocks.{index}.{name}", part, parts, swapped
    if module in _TOP:
        return _TOP[module], 0, 1, module == "norm_out.linear"
    raise LorapipeError(f"the transformer module {module!r} has no counterpart in the "
                        "reference SD3 MMDiT, so kohya's file cannot name it")


class SD3(Family):
    facts = BY_NAME["sd3"]  # its entry in the family list
    pipeline_class = StableDiffusion3Pipeline
    denoiser = "transformer"
    kohya_prefix = "lora_unet_"
    target_example = ("transformer module names such as attn.to_q, attn.to_k, attn.to_v, "
                      "attn.to_out.0")
    cond_keys = ("text_states", "pooled")
    load_kwargs = {}
    example = "stable-diffusion-3.5-large"
    text_encoders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2",
                     "text_encoder_3": "tokenizer_3"}
    # both CLIPs condition through their penultimate layers: their last gets no LoRA
    unused_text_layers = {"text_encoder": 1, "text_encoder_2": 1}
    # lora.text_encoder trains CLIP-L and bigG, not T5-XXL (kohya's sd3 scripts likewise,
    # unless --train_t5xxl)
    lora_text_encoders = ("text_encoder", "text_encoder_2")
    kohya_text_prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    refused = FLOW_MATCHING_REFUSED
    # diffusers' SD3 reader takes its own and peft's names only: lora.init continues from the
    # diffusers file
    reads_webui_files = False
    uses_sample_scheduler = False
    size_multiple = 16  # 8x VAE, then 2x2 patches

    def build_builtin(self):
        return build_tiny_sd3()

    def objective(self, pipe, flow: FlowSettings | None = None):
        if flow is None:
            raise LorapipeError("SD3 trains by flow matching: train.flow is needed")
        return FlowMatching.from_pipeline(pipe, flow)

    def predictor(self, denoiser, cond, objective=None):
        inputs = self.denoiser_inputs(cond)

        def predict(noisy, sigmas):
            # StableDiffusion3Pipeline passes the scheduler's timesteps, sigma x 1000
            return denoiser(hidden_states=noisy, timestep=sigmas * 1000, **inputs).sample

        return predict

    def denoiser_inputs(self, cond):
        return {"encoder_hidden_states": cond["text_states"],
                "pooled_projections": cond["pooled"]}

    def lora_scale_kwargs(self, scale):
        return {"joint_attention_kwargs": {"scale": scale}}

    def denoiser_lora_to_peft(self, state):
        return convert_unet_state_dict_to_peft(state)

    def token_limit(self, name: str, tokenizer) -> int:
        return (min(T5_TOKENS, tokenizer.model_max_length) if name == "text_encoder_3"
                else tokenizer.model_max_length)

    def encode_tokens(self, encoders, ids):
        # StableDiffusion3Pipeline.encode_prompt (no clip skip): each CLIP's penultimate
        # states and pooled projection; the CLIP states side by side, zero-padded to T5's
        # width, then T5's last states after them in the sequence
        states, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            out = encoders[name](ids[name], output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        t5 = encoders["text_encoder_3"](ids["text_encoder_3"])[0]
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"text_states": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, -1)}

    def load_single_file(self, path: Path, config: Path | None, keys: set[str]):
        """The reference-layout file (sd3.5_large.safetensors: the MMDiT, with or without
        its VAE and text encoders) as the transformer of model.config's folder's pipeline
        (text encoders, VAE, scheduler), as for Flux: the file's configs cannot be fetched
        offline."""
        if config is None:
            raise LorapipeError(
                f"model.base: {path.name} is an SD3 MMDiT file (Stability's layout); set "
                "model.config to a diffusers SD3 / SD3.5 folder of the same size "
                "(StableDiffusion3Pipeline.save_pretrained) for its text encoders and VAE")
        transformer = SD3Transformer2DModel.from_single_file(
            str(path), config=str(config), subfolder="transformer", local_files_only=True)
        return StableDiffusion3Pipeline.from_pretrained(str(config), transformer=transformer,
                                                        local_files_only=True)

    def sampler(self, name: str, scheduler):
        # the flow-matching Euler scheduler of the base's config (its shift 3.0)
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)

    def sampling_kwargs(self, settings, scheduler_config) -> dict:
        # real classifier-free guidance (SD3 is not guidance-distilled), with the negative
        return {"negative_prompt": settings.negative_prompt or None,
                "guidance_scale": settings.guidance_scale, "max_sequence_length": T5_TOKENS}

    def targets(self, preset):
        """Presets: `attn`, the joint attention's projections of both streams (and MMDiT-X's
        image-only second attention); `kohya`, what kohya's networks.lora_sd3 wraps: also
        both streams' MLPs and modulations, and the CLIP text encoders' MLPs. A list names
        transformer modules (suffixes, as peft matches them); the text encoders then get
        `attn`. Suffixes match inside the joint blocks only (the final proj_out and
        norm_out.linear are named in full to be targeted)."""
        text = TEXT_ATTN + (TEXT_MLP if preset == "kohya" else [])
        transformer = (ATTN if preset == "attn" else KOHYA if preset == "kohya"
                       else list(preset))
        return {"transformer": transformer, "text_encoder": text, "text_encoder_2": text}

    def to_webui(self, state, alpha, config):
        """The transformer's LoRA in kohya's networks.lora_sd3 layout (family.fused_webui)."""
        inner = config.num_attention_heads * config.attention_head_dim
        return fused_webui(state, alpha, self.kohya_prefix,
                           lambda module: mmdit_module(module, config.num_layers),
                           lambda original: [inner] * 3)

    def network_args(self, lp) -> dict[str, str]:
        return {} if lp.targets == "kohya" else {
            "lorapipe_targets": lp.targets if isinstance(lp.targets, str)
            else ",".join(lp.targets)}

    def base_version(self, pipe):
        config = pipe.transformer.config
        arch = (ARCH_SD35_MEDIUM if config.dual_attention_layers
                else ARCH_SD35_LARGE if config.qk_norm else ARCH_SD3_MEDIUM)
        return {"v2": False, "v_pred": False, "version": KOHYA_SD3, "architecture": arch,
                "implementation": SAI_IMPLEMENTATION, "prediction_type": None,
                "network_module": "networks.lora_sd3"}


def build_tiny_sd3() -> StableDiffusion3Pipeline:
    """An SD3.5-medium-shaped pipeline small enough to train in minutes on 2 CPU cores.

    SD3Transformer2DModel with 2 joint blocks, 4 heads of 8, RMS q/k norms and MMDiT-X's
    second attention in the first block (SD3.5 medium has it in its first 13 of 24); two
    CLIP encoders with projections (a CLIP-L-like and a wider bigG-like one, penultimate
    states 32 + 48 wide, pooled 32 + 48) and a T5-like encoder 96 wide, as T5-XXL is wider
    than both CLIPs together; the 16-channel tiny VAE; SD3.5's scheduler (fixed shift 3.0).
    Seeded: identical every time."""
    tokenizer = tiny_tokenizer()
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(TINY_SEED + 30)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        **common, hidden_size=32, intermediate_size=64, hidden_act="quick_gelu",
        projection_dim=32))
    torch.manual_seed(TINY_SEED + 31)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        **common, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48))
    tokenizer_3 = tiny_t5_tokenizer()
    torch.manual_seed(TINY_SEED + 32)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=96, d_kv=8, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
        relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0))
    vae = tiny_vae16()
    torch.manual_seed(TINY_SEED + 34)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
        pooled_projection_dim=32 + 48, out_channels=16, pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm")
    scheduler = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER)
    for model in (text_encoder, text_encoder_2, text_encoder_3, vae, transformer):
        model.eval()
    return StableDiffusion3Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, transformer=transformer)


FAMILY = SD3()

# stabilityai/stable-diffusion-3.5-large's scheduler/scheduler_config.json
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
# stabilityai/stable-diffusion-3.5-large and -medium's transformer/config.json: the tests
# check the WebUI export against them and bench/ builds them, without weights
SD35_LARGE_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38,
    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 192, "qk_norm": "rms_norm", "dual_attention_layers": [],
}
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}
