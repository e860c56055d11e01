"""Model families: everything that differs between image-diffusion architectures, behind
one interface (lorapipe.diffusion.family.Family); this package holds the family list, the
detection, and one module per family.

A family says how its base loads (builtin, diffusers folder, single file), what the encode
stage caches as conditioning, which component is its denoiser ("unet" or "transformer") and
which extra inputs it takes, its training objective (lorapipe.diffusion.objectives), how its
WebUI export names modules and describes the base, and which pipeline samples it. The
training loop, the cache, the export and the sample stage only talk to this interface, so
the next family is one more module here and one entry in the family list,
lorapipe.diffusion.family_list.FAMILIES (families.unet holds what the UNet families share).

Detection (`detect`) needs no weights: the builtin's name, a diffusers folder's
model_index.json, or a single file's tensor names (family_list.single_file_family).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import family_list
from lorapipe.diffusion.family import Family  # noqa: F401  (the interface, for its users)


def all_families() -> list[Family]:
    """The family list's families (lorapipe.diffusion.family_list.FAMILIES), in its order."""
    # imported here: the family modules import diffusers, which this module must not need;
    # by name, so that dvc.yaml's dependencies (tests/test_dvc_yaml.py) see them
    from lorapipe.diffusion.families import chroma, flux, qwen_image, sd, sd3, sdxl

    loaded = {m.FAMILY.name: m.FAMILY for m in (chroma, flux, qwen_image, sd, sd3, sdxl)}
    return [loaded[f.name] for f in family_list.FAMILIES]


def by_name(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    raise LorapipeError(f"unknown model family {name!r}")


def of_pipeline(pipe) -> Family:
    for family in all_families():
        if type(pipe) is family.pipeline_class:
            return family.specialize(pipe)
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
    found = family_list.single_file_family(single_file_keys(path, name))
    if found is not None:
        return by_name(found.name)
    raise LorapipeError(
        f"model.base: {name!r} holds no Stable Diffusion UNet (no "
        "'model.diffusion_model.*' tensors), no Flux.1 transformer (no 'double_blocks.*') and "
        "no SD3 MMDiT (no 'joint_blocks.*'); is it a LoRA or a VAE rather than a base model?")


def single_file_keys(path: Path, name: str) -> set[str]:
    """The tensor names of a .safetensors file (its header only: no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return set(f.keys())
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise LorapipeError(f"model.base: cannot read {name!r} ({exc})") from None
