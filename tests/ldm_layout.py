"""Test helper: write a diffusers pipeline as one single-file checkpoint in the original
key layout (CompVis LDM for SD 1.x, Stability SGM for SDXL), as the files users download
are. diffusers reads that layout (diffusers.loaders.single_file_utils) but does not write
it; the UNet part is lorapipe.diffusion.ldm's (which the WebUI export uses too), the VAE and text
encoder parts invert diffusers' own tables here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

from lorapipe.diffusion.ldm import unet_module


def unet_state(unet) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        out[f"model.diffusion_model.{unet_module(module, unet.config)}.{param}"] = tensor
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_state(vae) -> dict[str, torch.Tensor]:
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, tensor in vae.state_dict().items():
        name = top.get(key)
        if name is None:
            name = key.replace("conv_shortcut", "nin_shortcut")
            name = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", name)
            name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", name)
            name = re.sub(r"up_blocks\.(\d+)\.resnets\.",
                          lambda m: f"up.{n_up - 1 - int(m[1])}.block.", name)
            name = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.",
                          lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.", name)
            name = re.sub(r"mid_block\.resnets\.(\d+)\.",
                          lambda m: f"mid.block_{int(m[1]) + 1}.", name)
            m = re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name)
            if m:
                name = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
                if m[3] == "weight" and m[2] != "group_norm":
                    tensor = tensor[:, :, None, None]  # 1x1 convolutions in the original
        out[f"first_stage_model.{name}"] = tensor
    return out


def _hf_state(text_encoder) -> dict[str, torch.Tensor]:
    """The text model's weights under the names original checkpoints use (`text_model.`
    before everything but the projection; transformers 5 leaves that level out)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in text_encoder.state_dict().items()}


def clip_state(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model, kept in HF layout (SD 1.x and SDXL's first encoder)."""
    return {prefix + k: v for k, v in _hf_state(text_encoder).items()}


def open_clip_state(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's bigG)."""
    layers = {v: k for k, v in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    state = _hf_state(text_encoder)
    out = {}
    for ldm_name, hf_name in layers.items():
        tensor = state[hf_name]
        out[prefix + ldm_name] = tensor.T.contiguous() if ldm_name == "text_projection" \
            else tensor
    for i in range(text_encoder.config.num_hidden_layers):
        hf = f"text_model.encoder.layers.{i}."
        ldm = f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{ldm}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for hf_part, ldm_part in (("self_attn.out_proj", "attn.out_proj"),
                                      ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                                      ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{ldm}{ldm_part}.{kind}"] = state[f"{hf}{hf_part}.{kind}"]
    return out


def write_single_file(pipe, path: Path, marks: tuple[str, ...] = ()) -> Path:
    """The whole pipeline's weights in one .safetensors file, original layout; marks: empty
    marker tensors as v-prediction checkpoints carry them ("v_pred", "ztsnr")."""
    tensors = {**unet_state(pipe.unet), **vae_state(pipe.vae)}
    tensors.update({mark: torch.tensor([]) for mark in marks})
    if hasattr(pipe, "text_encoder_2"):  # SDXL
        tensors.update(clip_state(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        tensors.update(open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        tensors.update(clip_state(pipe.text_encoder, "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
