"""The model-family interface of the image task: everything that differs between
image-diffusion architectures, as one class a family module fills in (the family list and
detection are in lorapipe.diffusion.families)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorapipe.core.evaluation import evaluating
from lorapipe.diffusion.family_list import Facts
from lorapipe.diffusion.schedulers import make_scheduler
from lorapipe.diffusion.webui import network_args

if TYPE_CHECKING:
    from lorapipe.diffusion.objectives import Objective, Predict


class Family:
    """The interface; families.unet.UNetFamily (SD, SDXL) implements most of it."""

    # its entry in the family list: its name (shown in the train stage's first line and as
    # model.family in dvc exp show), title, builtin, pipeline class name, fused WebUI names
    facts: Facts
    pipeline_class: type  # the diffusers pipeline that loads, saves LoRAs and samples
    # the pipeline attribute of the denoiser, which is also its key prefix in the diffusers
    # LoRA file: "unet" or "transformer"
    denoiser: str
    kohya_prefix: str  # the denoiser's prefix in kohya's WebUI file ("lora_unet_")
    target_example: str  # lora.targets module names to suggest in messages
    # the cache tensors that condition the denoiser, besides `latents`
    cond_keys: tuple[str, ...]
    load_kwargs: dict  # extra from_pretrained/from_single_file arguments
    example: str  # a base of this family, for hints
    # the pipeline's text encoders (attribute names, which are also the diffusers LoRA file's
    # key prefixes) -> their tokenizers' attribute names
    text_encoders: dict[str, str]
    # text encoder -> kohya's WebUI prefix ('lora_te_', or 'lora_te1_'/'lora_te2_' for SDXL)
    kohya_text_prefixes: dict[str, str]
    # text encoder -> how many of its last layers the conditioning never uses (SDXL reads the
    # penultimate layer of its first encoder): they get no LoRA, which would never train
    unused_text_layers: dict[str, int] = {}
    # the text encoders lora.text_encoder trains (None: all of them); with none, why not
    lora_text_encoders: tuple[str, ...] | None = None
    no_text_lora = ""
    # whether diffusers' reader of this family's kohya files multiplies alpha / rank into the
    # weights it returns (lora.init must then not scale them again)
    reader_bakes_alpha = False
    # whether diffusers reads this family's kohya (WebUI) files at all (lora.init); SD3's it
    # does not
    reads_webui_files = True
    # image sides must be multiples of this (the VAE's 8x; Flux packs latents 2x2: 16)
    size_multiple = 8
    # whether sample.scheduler / train.sample_scheduler choose its sampler (else sampler()
    # keeps the family's own)
    uses_sample_scheduler = True
    # params key -> why this family refuses a non-zero value (the train stage checks)
    refused: dict[str, str] = {}

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def builtin(self) -> str:
        return self.facts.builtin

    @property
    def title(self) -> str:
        """In messages: "a <title> checkpoint"."""
        return self.facts.title

    @property
    def diffusers_classes(self) -> tuple[str, ...]:
        """model_index.json `_class_name`s of this family."""
        return (self.facts.pipeline,)

    @property
    def fuses_webui_modules(self) -> bool:
        """Its WebUI names fuse several diffusers modules into one (Flux's BFL qkv):
        to_webui writes them."""
        return self.facts.fused_webui

    def specialize(self, pipe) -> Family:
        """This family as it applies to one loaded base (a variant: Flux dev or schnell)."""
        return self

    def set_schedule(self, pipe, prediction_type: str, noise_schedule: str,
                     marks: set[str]) -> None:
        """model.prediction_type and model.noise_schedule applied to the loaded base's
        scheduler ("auto": as the base says; marks: a single file's tensor names, where
        v_pred / ztsnr say it). Flow-matching families have neither (params refuse them)."""

    def enable_gradient_checkpointing(self, denoiser) -> None:
        """train.gradient_checkpointing on the denoiser (diffusers' own switch)."""
        denoiser.enable_gradient_checkpointing()

    def trained_text_encoders(self) -> tuple[str, ...]:
        return tuple(self.text_encoders if self.lora_text_encoders is None
                     else self.lora_text_encoders)

    def build_builtin(self):
        """The seeded builtin pipeline (params: model.base builtin:tiny-...)."""
        raise NotImplementedError

    def objective(self, pipe, flow=None) -> Objective:
        """The training objective and its noise schedule, from the base's scheduler config
        (flow: objectives.FlowSettings, train.flow, for flow-matching families)."""
        raise NotImplementedError

    def predictor(self, denoiser, cond: dict[str, torch.Tensor], objective=None) -> Predict:
        """(noisy latents, timesteps) -> the denoiser's prediction under this conditioning
        (objective: the training objective, whose settings some denoisers take as inputs)."""
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

    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """The cached latents of images in [-1, 1] ([B, 3, H, W]): the VAE's posterior mean
        (a random-init VAE has posterior std ~1, so a sample would be mostly noise; a trained
        one's is tiny), shifted and scaled by latent_scale ([B, C, H/8, W/8])."""
        shift, scale = self.latent_scale(vae.config)
        # shift 0.0 (no shift_factor) leaves every value as it was, -0.0 included
        return (vae.encode(pixels).latent_dist.mode() - shift) * scale

    def latent_meta(self, vae_config) -> dict:
        """What the cache file records of the latents' normalisation."""
        shift, scale = self.latent_scale(vae_config)
        return {"scaling_factor": scale, **({"shift_factor": shift} if shift else {})}

    def single_file_variant(self, keys: set[str]) -> str | None:
        """The variant a single file is of (specialize's), from its tensor names."""
        return None

    def load_single_file(self, path, config, keys: set[str]):
        """The pipeline of a single-file checkpoint (config: model.config's folder or None);
        None: the pipeline class's own from_single_file (models._load)."""
        return None

    def sampler(self, name: str, scheduler):
        """The scheduler of sample.scheduler / train.sample_scheduler for this base."""
        return make_scheduler(name, scheduler.config)

    def sampling_kwargs(self, settings, scheduler_config) -> dict:
        """The pipeline call's guidance arguments for sampling.SampleSettings on a base with
        this scheduler config."""
        return {"negative_prompt": settings.negative_prompt or None,
                "guidance_scale": settings.guidance_scale}

    def token_limit(self, name: str, tokenizer) -> int:
        """The tokens a caption gets in this text encoder (the pipeline's padding length)."""
        return tokenizer.model_max_length

    def to_webui(self, state: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float,
                 config) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA ({diffusers module: (A, B)}) as kohya's WebUI tensors
        (without the text encoders'), one module each, named by webui_module."""
        out = {}
        for module, (down, up) in state.items():
            name = self.kohya_prefix + self.webui_module(module, config)
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = up
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        return out

    def network_args(self, lp) -> dict[str, str]:
        """lora.targets in kohya's network_args vocabulary (webui.network_args)."""
        return network_args(lp)

    def conv_targets(self, denoiser) -> tuple[list[str], list[str]]:
        """LoCon (lora.conv_rank): the denoiser's extra modules at (lora.rank, conv_rank).
        A family without convolutions has none (its rules refuse lora.conv_rank)."""
        return [], []

    def targets(self, preset: str | list[str]) -> dict[str, list[str]]:
        """lora.targets -> peft target module names per component (the denoiser and every
        text encoder)."""
        raise NotImplementedError

    def tokenize(self, tokenizers: dict, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids per text encoder, padded to the tokenizer's length as the pipeline pads."""
        out = {}
        for name, tok in tokenizers.items():
            out[name] = tok(captions, padding="max_length",
                            max_length=self.token_limit(name, tok), truncation=True,
                            return_tensors="pt").input_ids
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
        encoders = self.encoders_of(pipe)
        with evaluating(*encoders.values()):  # no dropout (T5 has some), as pipelines encode
            cond = self.encode_tokens(encoders, ids)
        cut = set()
        for name, tok in tokenizers.items():
            full = tok(captions, truncation=False).input_ids
            limit = self.token_limit(name, tok)
            cut |= {i for i, seq in enumerate(full) if len(seq) > limit}
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


def fused_webui(state: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, prefix: str,
                locate, sizes) -> dict[str, torch.Tensor]:
    """A transformer's LoRA ({diffusers module: (A, B)}) under original names that fuse
    several diffusers projections into one (Flux's BFL qkv and linear1, SD3's MMDiT qkv).
    locate(module) -> (original module, its part, the parts, whether its rows swap halves:
    the (shift, scale) modulations diffusers stores as (scale, shift)); sizes(original) ->
    each part's output size. A fused projection gets one LoRA of rank parts x r: its down
    matrix stacks each part's A (zeros for an untrained part), its up matrix places each
    part's B on the diagonal, so its product is exactly the parts' products side by side;
    alpha grows by the same factor, keeping alpha / rank. Written by hand: no library writes
    kohya's fused layout (diffusers and ComfyUI only read it)."""
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    layout: dict[str, tuple[int, bool]] = {}
    for module, pair in state.items():
        original, part, parts, swapped = locate(module)
        groups.setdefault(original, {})[part] = pair
        layout[original] = (parts, swapped)
    out = {}
    for original, members in groups.items():
        parts, swapped = layout[original]
        a0, _ = next(iter(members.values()))
        rank = a0.shape[0]
        if parts == 1:
            down, up = members[0]
            if swapped:
                first, second = up.chunk(2, dim=0)
                up = torch.cat([second, first], dim=0)
        else:
            widths = sizes(original)
            downs = [members[i][0] if i in members else torch.zeros_like(a0)
                     for i in range(parts)]
            ups = [members[i][1] if i in members else torch.zeros(widths[i], rank)
                   for i in range(parts)]
            down, up = torch.cat(downs, dim=0), torch.block_diag(*ups)
        name = prefix + original.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha * parts))
    return out
