"""Model families: everything that differs between Stable Diffusion architectures.

A family says how its base loads (builtin, diffusers folder, single file), what the encode
stage caches as conditioning, which extra inputs its UNet takes, how its WebUI export names
modules and describes the base, and which pipeline samples it. The training loop, the cache,
the export and the sample stage only talk to this interface, so the next family (SD3, Flux)
is one more module here, not an edit of the loop.

Detection (`detect`) needs no weights: the builtin's name, a diffusers folder's
model_index.json, or a single file's tensor names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorapipe.errors import LorapipeError


class Family:
    """The interface; lorapipe.families.sd and .sdxl implement it."""

    name: str  # shown in the train stage's first line and as model.family in dvc exp show
    builtin: str  # the builtin model of this family (params: model.base)
    pipeline_class: type  # the diffusers pipeline that loads, saves LoRAs and samples
    diffusers_classes: tuple[str, ...]  # model_index.json `_class_name`s of this family
    # the cache tensors that condition the UNet, besides `latents`
    cond_keys: tuple[str, ...]
    load_kwargs: dict  # extra from_pretrained/from_single_file arguments
    title: str  # in messages: "a <title> checkpoint"
    example: str  # a base of this family, for hints

    def build_builtin(self):
        raise NotImplementedError

    def owns_single_file(self, keys: set[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is of this family."""
        raise NotImplementedError

    def encode_text(self, pipe, captions: list[str]) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The cached text conditioning of these captions, and the indices of captions cut
        at the token limit."""
        raise NotImplementedError

    def image_conditioning(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Per-image conditioning from data/processed/metadata.csv rows (sizes, crops)."""
        return {}

    def unet_inputs(self, cond: dict[str, torch.Tensor]) -> dict:
        """The UNet's keyword inputs besides the noisy latents and timesteps."""
        raise NotImplementedError

    def base_version(self, pipe) -> dict:
        """What the base is, for the WebUI file's metadata (lorapipe.webui)."""
        raise NotImplementedError

    def webui_module(self, module: str, unet_config) -> str:
        """A UNet module's diffusers name -> the name WebUI loaders map (without prefix)."""
        return module.replace(".", "_")


def all_families() -> list[Family]:
    # imported here: the family modules import diffusers, which this module must not need
    from lorapipe.families import sd, sdxl

    return [sd.FAMILY, sdxl.FAMILY]


def by_name(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    raise LorapipeError(f"unknown model family {name!r}")


def of_pipeline(pipe) -> Family:
    for family in all_families():
        if type(pipe) is family.pipeline_class:
            return family
    raise LorapipeError(f"no model family for a {type(pipe).__name__}")


def detect(path: Path, name: str) -> Family:
    """The family of model.base: a builtin name, a diffusers folder or a single file."""
    families = all_families()
    for family in families:
        if name == family.builtin:
            return family
    if path.is_dir():
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        cls = index.get("_class_name", "")
        for family in families:
            if cls in family.diffusers_classes:
                return family
        raise LorapipeError(
            f"model.base: {name!r} is a {cls or 'unknown'} folder; lorapipe trains "
            + ", ".join(c for f in families for c in f.diffusers_classes))
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise LorapipeError(f"model.base: cannot read {name!r} ({exc})") from None
    for family in families:
        if family.owns_single_file(keys):
            return family
    raise LorapipeError(
        f"model.base: {name!r} holds no Stable Diffusion UNet (no "
        "'model.diffusion_model.*' tensors); is it a LoRA or a VAE rather than a base model?")
