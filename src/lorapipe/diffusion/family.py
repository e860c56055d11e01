"""The model-family interface of the image task: everything that differs between
image-diffusion architectures, as one class a family module fills in (the family list and
detection are in lorapipe.diffusion.families)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorapipe.diffusion.objectives import Objective, Predict


class Family:
    """The interface; families.unet.UNetFamily (SD, SDXL) implements most of it."""

    name: str  # shown in the train stage's first line and as model.family in dvc exp show
    builtin: str  # the builtin model of this family (params: model.base)
    pipeline_class: type  # the diffusers pipeline that loads, saves LoRAs and samples
    diffusers_classes: tuple[str, ...]  # model_index.json `_class_name`s of this family
    # the pipeline attribute of the denoiser, which is also its key prefix in the diffusers
    # LoRA file: "unet" or "transformer"
    denoiser: str
    kohya_prefix: str  # the denoiser's prefix in kohya's WebUI file ("lora_unet_")
    target_example: str  # lora.targets module names to suggest in messages
    # the cache tensors that condition the denoiser, besides `latents`
    cond_keys: tuple[str, ...]
    load_kwargs: dict  # extra from_pretrained/from_single_file arguments
    title: str  # in messages: "a <title> checkpoint"
    example: str  # a base of this family, for hints
    # the pipeline's text encoders (attribute names, which are also the diffusers LoRA file's
    # key prefixes) -> their tokenizers' attribute names
    text_encoders: dict[str, str]
    # text encoder -> kohya's WebUI prefix ('lora_te_', or 'lora_te1_'/'lora_te2_' for SDXL)
    kohya_text_prefixes: dict[str, str]
    # text encoder -> how many of its last layers the conditioning never uses (SDXL reads the
    # penultimate layer of its first encoder): they get no LoRA, which would never train
    unused_text_layers: dict[str, int] = {}

    def build_builtin(self):
        """The seeded builtin pipeline (params: model.base builtin:tiny-...)."""
        raise NotImplementedError

    def objective(self, pipe) -> Objective:
        """The training objective and its noise schedule, from the base's scheduler config."""
        raise NotImplementedError

    def predictor(self, denoiser, cond: dict[str, torch.Tensor]) -> Predict:
        """(noisy latents, timesteps) -> the denoiser's prediction under this conditioning."""
        raise NotImplementedError

    def lora_scale_kwargs(self, scale: float) -> dict:
        """The pipeline call's keyword arguments that scale the LoRA when sampling."""
        raise NotImplementedError

    def lora_reading_kwargs(self, denoiser) -> dict:
        """Extra arguments of pipeline_class.lora_state_dict (lora.init) for this denoiser."""
        return {}

    def denoiser_lora_to_peft(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A LoRA file's denoiser part (diffusers or kohya names) in peft's names."""
        raise NotImplementedError

    def latent_scale(self, vae_config) -> tuple[float, float]:
        """(shift, scale) of the cached latents: latent = (VAE mean - shift) * scale, with the
        VAE's shift_factor where it has one (Flux's VAE) and its scaling_factor."""
        return getattr(vae_config, "shift_factor", None) or 0.0, vae_config.scaling_factor

    def owns_single_file(self, keys: set[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is of this family."""
        raise NotImplementedError

    def targets(self, preset: str | list[str]) -> dict[str, list[str]]:
        """lora.targets -> peft target module names per component (the denoiser and every
        text encoder)."""
        raise NotImplementedError

    def tokenize(self, tokenizers: dict, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per text encoder, padded to the tokenizer's length as the pipeline pads."""
        out = {}
        for name, tok in tokenizers.items():
            out[name] = tok(captions, padding="max_length", max_length=tok.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
        return out

    def encode_tokens(self, encoders: dict, ids: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """The text conditioning (cond_keys' text part) from token ids, as the pipeline
        computes it for sampling; differentiable, so a text-encoder LoRA trains through it."""
        raise NotImplementedError

    def tokenizers_of(self, pipe) -> dict:
        return {name: getattr(pipe, tok) for name, tok in self.text_encoders.items()}

    def encoders_of(self, pipe) -> dict:
        return {name: getattr(pipe, name) for name in self.text_encoders}

    @torch.no_grad()
    def encode_text(self, pipe, captions: list[str]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:
        """The cached text conditioning of these captions, their token ids (per text
        encoder: a text-encoder LoRA or caption augmentation encodes them per step), and the
        indices of captions cut at the token limit."""
        tokenizers = self.tokenizers_of(pipe)
        ids = self.tokenize(tokenizers, captions)
        cond = self.encode_tokens(self.encoders_of(pipe), ids)
        cut = set()
        for tok in tokenizers.values():
            full = tok(captions, truncation=False).input_ids
            cut |= {i for i, seq in enumerate(full) if len(seq) > tok.model_max_length}
        return {k: v.float() for k, v in cond.items()}, ids, sorted(cut)

    def image_conditioning(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Per-image conditioning from data/processed/metadata.csv rows (sizes, crops)."""
        return {}

    def denoiser_inputs(self, cond: dict[str, torch.Tensor]) -> dict:
        """The denoiser's keyword inputs besides the noisy latents and timesteps."""
        raise NotImplementedError

    def base_version(self, pipe) -> dict:
        """What the base is, for the WebUI file's metadata (lorapipe.diffusion.webui)."""
        raise NotImplementedError

    def webui_module(self, module: str, denoiser_config) -> str:
        """A denoiser module's diffusers name -> the name WebUI loaders map (without prefix)."""
        return module.replace(".", "_")
