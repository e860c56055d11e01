"""The family list (lorapipe.diffusion.family_list): every entry is a loaded family of that
name, builtin and pipeline class; a single file is one family's only, with or without
ComfyUI's prefix, and the light readers (the params rules, the compatibility report) tell
the same family as detection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lorapipe.diffusion import compat, families, family_list, rules


def test_every_entry_is_a_family_of_its_name_builtin_and_pipeline():
    loaded = families.all_families()
    assert [f.name for f in loaded] == [f.name for f in family_list.FAMILIES]
    for facts, family in zip(family_list.FAMILIES, loaded, strict=True):
        assert (family.builtin, family.title) == (facts.builtin, facts.title)
        assert family.pipeline_class.__name__ == facts.pipeline
        assert family.fuses_webui_modules == facts.fused_webui
        assert bool(family.refused) == facts.flow_matching  # the DDPM keys refused
    assert rules.BUILTINS == tuple(f.builtin for f in family_list.FAMILIES)


def _marker_keys(facts: family_list.Facts, prefix: str) -> set[str]:
    keys = {prefix + m for m in facts.requires}
    if facts.requires_prefix:
        keys.add(facts.requires_prefix + "x.weight")
    return keys


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("facts", [f for f in family_list.FAMILIES if f.name not in ("sd", "sdxl")],
                         ids=lambda f: f.name)
def test_a_single_file_is_one_familys_only(tmp_path, facts, prefix):
    """A transformer file with its family's marker (and, for Chroma, Flux's blocks too) is
    owned by that family alone; detection and compat's light reader agree."""
    keys = _marker_keys(facts, prefix)
    if facts.name == "chroma":  # Chroma's files are in Flux's layout
        keys.add(prefix + family_list.BFL_MARKER)
    owners = [f.name for f in family_list.FAMILIES if f.owns(keys)]
    assert owners == [facts.name]
    path = tmp_path / "base.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert families.detect(path, "base").name == facts.name
    assert compat.family_of(str(path), tmp_path) == facts.name


def test_sd_and_sdxl_checkpoints_are_told_apart():
    sd = {family_list.SD_UNET, "cond_stage_model.transformer.x"}
    sdxl = {family_list.SD_UNET, family_list.SDXL_ADM, family_list.SDXL_BIGG + "x"}
    assert family_list.single_file_family(sd).name == "sd"
    assert family_list.single_file_family(sdxl).name == "sdxl"
    assert family_list.single_file_family({"lora_unet_x.lora_down.weight"}) is None
