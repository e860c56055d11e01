"""Base models: the builtin tiny models, a local diffusers folder, or a single .safetensors file.

Everything loads offline (lorapipe/__init__ sets the Hugging Face offline switches before
any HF library is imported). Pickle checkpoints are refused (lorapipe.params says why and
what to do): loading one runs arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lorapipe import families
from lorapipe.errors import LorapipeError
from lorapipe.params import BUILTIN_PREFIX, model_source_problem

TINY_SEED = 0

# Measured on data/example at 64 px (tests/test_models.py keeps it true): the random tiny
# VAE's latent means have a std of 0.363 there, so SD's 0.18215 would shrink them to ~0.07 and
# the diffusion loss would barely depend on the image. 1/0.363 = 2.76 gives unit variance.
TINY_VAE_SCALING = 2.76

# Words the builtin tokenizer knows whole (everything else falls back to characters):
# the example captions plus the words most captions are made of.
TINY_WORDS = """
a an the of in on at with and or for to from by is are this that photo picture image
painting drawing illustration render style lpstyle sks art artwork portrait landscape
red blue green yellow purple orange pink black white grey gray brown teal cyan magenta
circle square triangle star shape shapes round bold outline outlined highlight stripes
striped pastel background foreground dark light bright soft sharp simple flat
cat dog man woman person face girl boy tree sky sea water mountain city house car
small large big tiny one two three high quality detailed best
""".split()


def tiny_tokenizer() -> CLIPTokenizer:
    """A real CLIP BPE tokenizer with a small vocabulary made here, so nothing is downloaded."""
    chars = list(bytes_to_unicode().values())  # GPT-2/CLIP byte-level BPE's byte table
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_vae() -> AutoencoderKL:
    """SD's KL VAE (8x downsampling, 4 latent channels) with tiny widths, seeded; the tiny
    SDXL shares it (SDXL's VAE has SD's architecture, only its weights and scale differ)."""
    torch.manual_seed(TINY_SEED + 1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=64, scaling_factor=TINY_VAE_SCALING,
    )


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


def load_pipeline(base: str, config: str = "", root: Path | None = None):
    """The base model named by model.base (and model.config for single files), on the CPU,
    as its family's diffusers pipeline."""
    path = (root or Path.cwd()) / base
    if not base.startswith(BUILTIN_PREFIX):
        if not path.exists():
            raise LorapipeError(f"model.base: {base!r} does not exist")
        problem = model_source_problem(path, base)
        if problem:
            raise LorapipeError(f"model.base: {problem}")
    family = families.detect(path, base)
    if base.startswith(BUILTIN_PREFIX):
        return family.build_builtin()
    cls = family.pipeline_class
    kwargs = {"local_files_only": True, **family.load_kwargs}
    if path.is_dir():
        try:
            return cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LorapipeError(
                f"model.base: cannot load diffusers folder {base!r}: {exc}") from None
    if config:
        kwargs["config"] = str((root or Path.cwd()) / config)
    try:
        return cls.from_single_file(str(path), **kwargs)
    except Exception as exc:  # diffusers raises many types for a file it cannot map
        hint = "" if config else (
            "; offline, diffusers needs the model's configs: set model.config to a diffusers "
            f"folder of the same architecture (e.g. a saved {family.example} pipeline)"
        )
        raise LorapipeError(
            f"model.base: {base!r} is not a {family.title} checkpoint diffusers can load "
            f"({type(exc).__name__}: {exc}){hint}"
        ) from None


def training_scheduler(pipe: StableDiffusionPipeline) -> DDPMScheduler:
    """The DDPM noise schedule the base was trained with (epsilon or v-prediction)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)
