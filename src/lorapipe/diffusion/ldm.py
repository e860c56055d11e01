"""The original (CompVis LDM / Stability SGM) names of a diffusers UNet's modules.

kohya's SDXL LoRAs name UNet modules as the original SGM code does
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and A1111/Forge, ComfyUI and
kohya's SDXL loader all map those names; single-file checkpoints use the same layout under
`model.diffusion_model.`. diffusers ships only the other direction (original -> diffusers, in
diffusers.loaders.single_file_utils), so the forward map is written here, derived from the
UNet's config rather than tabulated for one model: the tests prove it against diffusers'
own converter and the real SDXL 1.0 config.
"""

from __future__ import annotations

import re

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
        "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return ".".join(filter(None, [_RESNET.get(head, head), tail]))


def unet_module(name: str, config) -> str:
    """A diffusers UNet2DConditionModel module or parameter name -> its original name.

    config: the UNet's config (layers_per_block, up_block_types)."""
    layers = config["layers_per_block"] if isinstance(config, dict) else config.layers_per_block
    up_types = config["up_block_types"] if isinstance(config, dict) else config.up_block_types
    for prefix, target in _TOP.items():
        if name == prefix or name.startswith(prefix + "."):
            return target + name[len(prefix):]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.?(.*)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":  # 'downsamplers.0.conv' -> 'input_blocks.N.0.op'
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op" + rest.removeprefix("conv")
        block = 1 + i * (layers + 1) + j
        return (f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets"
                else f"input_blocks.{block}.1.{rest}").rstrip(".")
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.?(.*)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":  # after the resnet (and the attention, where there is one)
            slot = 2 if "CrossAttn" in up_types[i] else 1
            return f"output_blocks.{i * (layers + 1) + layers}.{slot}.{rest}".rstrip(".")
        block = i * (layers + 1) + j
        return (f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets"
                else f"output_blocks.{block}.1.{rest}").rstrip(".")
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.?(.*)", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}".rstrip(".")
        return f"middle_block.{2 * j}.{_resnet(rest)}".rstrip(".")
    raise ValueError(f"no original name for UNet module {name!r}")
