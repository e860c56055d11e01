"""Qwen-Image (and its fine-tunes): Alibaba's 20B rectified-flow MMDiT
(QwenImageTransformer2DModel: 60 dual-stream blocks, image and text tokens with their own
weights and one joint attention; 3-axis RoPE with the text after the image positions). It
is conditioned on one text encoder, the 7B vision-language model Qwen2.5-VL: its last hidden
states over the caption written into a fixed chat template (a system message asking for a
detailed description; the template's 34-token prefix is dropped), with the caption's padding
masked in the joint attention. No pooled vector and no guidance input: it samples with real
classifier-free guidance (true_cfg_scale) against a negative prompt. Its VAE
(AutoencoderKLQwenImage) is Wan 2.1's causal 3D VAE, used on one frame: 16 channels,
normalised per channel by the config's latents_mean / latents_std, patched 2x2.

Trained by flow matching (lorapipe.diffusion.objectives.FlowMatching) as musubi-tuner's
`--timestep_sampling qwen_shift` trains it: sigmoid noise levels under the dynamic shift of
its scheduler, exp(mu) with mu linear in the image's token count from 0.5 at 256 to 0.9 at
8192 (train.flow.resolution_shift reads them from the scheduler config). The LoRA is scaled
through attention_kwargs when sampling; Qwen's own module names are diffusers', so the WebUI
file is musubi-tuner's networks.lora_qwen_image layout: lora_unet_ and the module name with
underscores, one module each, which ComfyUI and diffusers both read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion.families.tiny import TINY_SEED, TINY_WORDS
from lorapipe.diffusion.family import Family
from lorapipe.diffusion.family_list import BY_NAME, QWEN_MARKER
from lorapipe.diffusion.objectives import FlowMatching, FlowSettings
from lorapipe.diffusion.rules import FLOW_MATCHING_REFUSED

# QwenImagePipeline's prompt template and the tokens of its prefix it drops
# (prompt_template_encode, prompt_template_encode_start_idx)
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, "
            "texture, quantity, text, spatial relationships of the objects and background:"
            "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_PREFIX = 34
TEMPLATE_SUFFIX = 5  # <|im_end|> \n <|im_start|> assistant \n: conditioning after the caption
# the conditioning tokens per caption (the template's end included): the pipeline's
# max_sequence_length default, which it samples with (1024 at most)
TEXT_TOKENS = 512
ARCH_QWEN_IMAGE = "Qwen-Image"  # the model spec's architecture id, as musubi-tuner writes it
KOHYA_QWEN_IMAGE = "qwen_image"  # musubi-tuner's ss_architecture
QWEN_IMPLEMENTATION = "https://github.com/QwenLM/Qwen-Image"

ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
        "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
# what musubi-tuner's networks.lora_qwen_image wraps by default: every Linear of the blocks
# but the modulations img_mod.1 and txt_mod.1 (its exclude_mod), in diffusers' names
KOHYA = [*ATTN, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


@dataclass(frozen=True)
class QwenImage(Family):
    text_tokens: int = TEXT_TOKENS  # conditioning tokens per caption, training and sampling

    facts = BY_NAME["qwen-image"]  # its entry in the family list
    pipeline_class = QwenImagePipeline
    denoiser = "transformer"
    kohya_prefix = "lora_unet_"
    target_example = ("transformer module names such as attn.to_q, attn.add_q_proj, "
                      "img_mlp.net.0.proj")
    cond_keys = ("text_states", "text_mask")
    load_kwargs = {}
    example = "Qwen-Image"
    text_encoders = {"text_encoder": "tokenizer"}
    # Qwen2.5-VL-7B gets no LoRA (musubi-tuner, SimpleTuner and ai-toolkit train the
    # transformer only): lora.text_encoder is refused (recipe)
    lora_text_encoders = ()
    no_text_lora = ("Qwen-Image's text encoder is the 7B Qwen2.5-VL, which lorapipe gives no "
                    "LoRA (as musubi-tuner, SimpleTuner and ai-toolkit)")
    kohya_text_prefixes = {}
    # diffusers' Qwen-Image reader of lora_unet_ files multiplies alpha / rank into the weights
    reader_bakes_alpha = True
    refused = FLOW_MATCHING_REFUSED
    uses_sample_scheduler = False
    size_multiple = 16  # 8x VAE, then 2x2 patches

    def build_builtin(self):
        return build_tiny_qwen_image()

    def specialize(self, pipe) -> QwenImage:
        return QwenImage(min(TEXT_TOKENS, pipe.tokenizer.model_max_length))

    def objective(self, pipe, flow: FlowSettings | None = None):
        if flow is None:
            raise LorapipeError("Qwen-Image trains by flow matching: train.flow is needed")
        return FlowMatching.from_pipeline(pipe, flow)

    def encode_latents(self, vae, pixels):
        # one frame of the 3D VAE; (mean - latents_mean) / latents_std, the inverse of what
        # QwenImagePipeline does before decoding
        z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean, std = (torch.tensor(v, dtype=z.dtype).view(1, -1, 1, 1)
                     for v in (vae.config.latents_mean, vae.config.latents_std))
        return (z - mean) / std

    def latent_meta(self, vae_config) -> dict:
        return {"latents_mean": list(vae_config.latents_mean),
                "latents_std": list(vae_config.latents_std)}

    def tokenize(self, tokenizers, captions):
        """The captions in the pipeline's template, right-padded: the prefix it drops and
        then text_tokens tokens (a longer caption is cut there; the encoder is causal, so
        the states it keeps are those of the pipeline, which cuts after encoding)."""
        tok = tokenizers["text_encoder"]
        return {"text_encoder": tok(
            [TEMPLATE.format(c) for c in captions], padding="max_length",
            max_length=TEMPLATE_PREFIX + self.text_tokens, truncation=True,
            padding_side="right", return_tensors="pt").input_ids}

    def token_limit(self, name: str, tokenizer) -> int:
        # the caption's own tokens that fit, before the template's end
        return self.text_tokens - TEMPLATE_SUFFIX

    def encode_tokens(self, encoders, ids):
        # QwenImagePipeline._get_qwen_prompt_embeds: the language model's last hidden
        # states (its LM head is not needed) under the padding mask, the template's prefix
        # dropped, the padding zeroed and masked; trimmed to the longest caption here, as
        # the pipeline pads to it (encode_dataset pads batches to one length)
        encoder = encoders["text_encoder"]
        tokens = ids["text_encoder"]
        mask = (tokens != encoder.config.text_config.pad_token_id).long()
        states = encoder.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        states, mask = states[:, TEMPLATE_PREFIX:], mask[:, TEMPLATE_PREFIX:]
        length = int(mask.sum(dim=1).max())
        mask = mask[:, :length]
        return {"text_states": states[:, :length] * mask.unsqueeze(-1).to(states.dtype),
                "text_mask": mask.to(states.dtype)}

    def predictor(self, denoiser, cond, objective=None):
        # packed 2x2 as QwenImagePipeline._pack_latents does, one frame, its img_shapes
        inputs = self.denoiser_inputs(cond)

        def predict(noisy, sigmas):
            b, c, h, w = noisy.shape
            packed = QwenImagePipeline._pack_latents(noisy, b, c, h, w)
            out = denoiser(hidden_states=packed, timestep=sigmas,
                           img_shapes=[[(1, h // 2, w // 2)]] * b, **inputs).sample
            return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]

        return predict

    def denoiser_inputs(self, cond):
        mask = cond["text_mask"]
        # the pipeline passes no mask when no caption is padded (the same, without a mask)
        return {"encoder_hidden_states": cond["text_states"],
                "encoder_hidden_states_mask": None if bool(mask.all()) else mask}

    def lora_scale_kwargs(self, scale):
        return {"attention_kwargs": {"scale": scale}}

    def denoiser_lora_to_peft(self, state):
        return convert_unet_state_dict_to_peft(state)

    def load_single_file(self, path: Path, config: Path | None, keys: set[str]):
        """The transformer file people have (ComfyUI's qwen_image_bf16.safetensors, Qwen's
        own names, or a ComfyUI checkpoint with its model.diffusion_model. prefix) into the
        pipeline of model.config's folder (Qwen2.5-VL, VAE, scheduler)."""
        if config is None:
            raise LorapipeError(
                f"model.base: {path.name} is a Qwen-Image transformer file: it holds no text "
                "encoder or VAE; set model.config to a diffusers Qwen-Image folder "
                "(QwenImagePipeline.save_pretrained) with them")
        from accelerate import init_empty_weights
        from safetensors.torch import load_file

        state = load_file(str(path))
        prefix = next((k[:-len(QWEN_MARKER)] for k in state if k.endswith(QWEN_MARKER)), "")
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        settings = QwenImageTransformer2DModel.load_config(str(config), subfolder="transformer",
                                                           local_files_only=True)
        with init_empty_weights():
            transformer = QwenImageTransformer2DModel.from_config(settings)
        try:
            # the file's own dtype, as from_single_file loads one
            transformer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise LorapipeError(f"model.base: {path.name} does not fit model.config's "
                                f"Qwen-Image transformer ({str(exc).splitlines()[0]})") from None
        return QwenImagePipeline.from_pretrained(str(config), transformer=transformer.eval(),
                                                 local_files_only=True)

    def sampler(self, name: str, scheduler):
        # the flow-matching Euler scheduler of the base's config (its dynamic shift, the
        # terminal stretch to 0.02)
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)

    def sampling_kwargs(self, settings, scheduler_config) -> dict:
        # real CFG as the model card samples (true_cfg_scale 4, negative " "): the pipeline
        # only guides when given a negative prompt
        return {"negative_prompt": settings.negative_prompt or " ",
                "true_cfg_scale": settings.guidance_scale,
                "max_sequence_length": self.text_tokens}

    def targets(self, preset):
        """Presets: `attn`, the joint attention's projections of both streams; `kohya`, what
        musubi-tuner's networks.lora_qwen_image wraps: also both streams' MLPs (not the
        modulations). A list names transformer modules (suffixes, as peft matches them).
        No text-encoder LoRA."""
        transformer = (ATTN if preset == "attn" else KOHYA if preset == "kohya"
                       else list(preset))
        return {"transformer": transformer}

    def network_args(self, lp) -> dict[str, str]:
        # networks.lora_qwen_image's own exclude_patterns (matched on its lora_unet_ names)
        # say `attn`; a list is recorded under lorapipe's key
        if lp.targets == "kohya":
            return {}
        if lp.targets == "attn":
            return {"exclude_patterns": "['.*(_mlp_).*']"}
        return {"lorapipe_targets": ",".join(lp.targets)}

    def base_version(self, pipe):
        return {"v2": False, "v_pred": False, "version": KOHYA_QWEN_IMAGE,
                "architecture": ARCH_QWEN_IMAGE, "implementation": QWEN_IMPLEMENTATION,
                "prediction_type": None, "network_module": "networks.lora_qwen_image"}


FAMILY = QwenImage()

# the words of the prompt template (its system message and roles): the builtin tokenizer
# knows them whole, so the template's prefix is 34 tokens as with the real tokenizer and the
# pipeline's fixed prompt_template_encode_start_idx drops exactly it
TEMPLATE_WORDS = """
system user assistant Describe image by detailing color shape size texture quantity text
spatial relationships of objects and background
""".split()
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
TINY_TEXT_TOKENS = 64  # the builtin's caption budget (its tokenizer's model_max_length)
# Measured on data/example at 64 px (tests/test_qwen_image.py keeps it true): the random tiny
# VAE's per-channel latent means and standard deviations there, which its config holds as
# the real config holds Wan 2.1's
TINY_LATENTS_MEAN = [0.172, 0.095, -0.145, -0.12, -0.091, -0.124, 0.219, 0.074, 0.275, 0.012,
                     0.162, 0.212, 0.143, 0.145, 0.16, -0.053]
TINY_LATENTS_STD = [0.054, 0.066, 0.07, 0.057, 0.069, 0.072, 0.067, 0.076, 0.083, 0.099, 0.057,
                    0.088, 0.104, 0.066, 0.067, 0.065]


def tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer class (its pre-tokenizer regex, byte-level BPE) with merges learnt
    here by the tokenizers library's own BPE trainer from the builtin words (bare, after a
    space, capitalised), so each is one token as real Qwen's common words are; Qwen's
    special tokens (ChatML's, the vision markers) after them. Deterministic."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = dict.fromkeys(TINY_WORDS + TEMPLATE_WORDS)
    bpe.train_from_iterator([form for word in words for form in (
        word, " " + word, word.capitalize(), " " + word.capitalize())], trainer)
    learnt = json.loads(bpe.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[tuple(m) for m in learnt["merges"]],
                          eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          additional_special_tokens=list(SPECIAL_TOKENS[1:]),
                          model_max_length=TINY_TEXT_TOKENS)


def tiny_qwen_vae() -> AutoencoderKLQwenImage:
    """Qwen-Image's VAE (Wan 2.1's causal 3D VAE: 8x spatial and 4x temporal downsampling,
    16 latent channels) with tiny widths and the measured statistics above, seeded."""
    torch.manual_seed(TINY_SEED + 52)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=TINY_LATENTS_MEAN,
        latents_std=TINY_LATENTS_STD)


def build_tiny_qwen_image() -> QwenImagePipeline:
    """A Qwen-Image-shaped pipeline small enough to train in minutes on 2 CPU cores.

    QwenImageTransformer2DModel with 2 blocks of 4 heads of 8 (RoPE axes 2+2+4), 64-channel
    packed input; Qwen2_5_VLForConditionalGeneration itself with a 2-layer, 32-wide language
    model (grouped-query attention, multimodal RoPE sections 1+1+2 as the 7B's 16+24+24) and
    a 1-block vision tower (unused for text, as in the pipeline); the Qwen2 tokenizer above;
    the tiny 3D VAE; Qwen-Image's scheduler config (dynamic shift 0.5-0.9, terminal 0.02).
    Seeded: identical every time."""
    tokenizer = tiny_qwen_tokenizer()
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(TINY_SEED + 50)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [1, 1, 2]},
            bos_token_id=None, eos_token_id=special["<|im_end|>"],
            pad_token_id=special["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=32, fullatt_block_indexes=[0]),
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"]))
    vae = tiny_qwen_vae()
    torch.manual_seed(TINY_SEED + 53)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    for model in (text_encoder, vae, transformer):
        model.eval()
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


# Qwen/Qwen-Image's scheduler/scheduler_config.json
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
    "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
}
# Qwen/Qwen-Image's transformer/config.json: the tests check the WebUI export against it and
# bench/ builds it, without weights
QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
    "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}
