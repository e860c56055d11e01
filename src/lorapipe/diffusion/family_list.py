"""The image task's family list: what is known of each model family without loading it.
Light (no torch, no diffusers), so the params check (lorapipe.diffusion.rules) and the
compatibility report (lorapipe.diffusion.compat) read it before any heavy import, and the
family modules (lorapipe.diffusion.families.<module>) take their names from it: an entry
here, a module there and its name in families.all_families' import are a family.

A single file's family is told by its tensor names (the header only): each family's marker
tensors, with or without a loader's prefix (ComfyUI's "model.diffusion_model."); no file
matches two families, so the order of the list does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

SD_SCRIPTS = "kohya's sd-scripts"  # the trainer of most families' WebUI files

# tensors of one family's single files only
SD_UNET = "model.diffusion_model.input_blocks.0.0.weight"  # the LDM UNet (SD and SDXL)
SDXL_ADM = "model.diffusion_model.label_emb.0.0.weight"  # SDXL's size embedding
SDXL_BIGG = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG (a prefix)
BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"  # Black Forest Labs' Flux layout
CHROMA_MARKER = "distilled_guidance_layer.in_proj.bias"  # Chroma's, in Flux's layout
MMDIT_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"  # Stability's SD3 MMDiT
QWEN_MARKER = "transformer_blocks.0.img_mod.1.weight"  # Qwen-Image's own (diffusers') names


def _has(keys: set[str], marker: str) -> bool:
    return any(k == marker or k.endswith("." + marker) for k in keys)


@dataclass(frozen=True)
class Facts:
    name: str  # families.Family.name: model.family in dvc exp show
    title: str  # in messages
    builtin: str  # its builtin model (model.base)
    pipeline: str  # its diffusers pipeline class: model_index.json's _class_name
    flow_matching: bool  # trained by flow matching (else DDPM)
    # the kohya-family trainer and --network_module that read its WebUI file
    trainer: str = SD_SCRIPTS
    network_module: str = "networks.lora"
    # its WebUI names fuse q, k and v into one module (Flux's, SD3's reference layouts)
    fused_webui: bool = False
    # AUTOMATIC1111 and Forge: "ok", "forge" (Forge only) or "no"
    a1111: str = "ok"

    # a single file is this family's when it has all of `requires` (tensor names) and a
    # tensor under `requires_prefix`, and none of `excludes` or under `excludes_prefix`
    requires: tuple[str, ...] = ()
    requires_prefix: str = ""
    excludes: tuple[str, ...] = ()
    excludes_prefix: str = ""

    def owns(self, keys: set[str]) -> bool:
        """Whether a single file with these tensor names is of this family."""
        return (all(_has(keys, m) for m in self.requires)
                and not any(_has(keys, m) for m in self.excludes)
                and (not self.requires_prefix
                     or any(k.startswith(self.requires_prefix) for k in keys))
                and not (self.excludes_prefix
                         and any(k.startswith(self.excludes_prefix) for k in keys)))


FAMILIES = (
    Facts("sd", "Stable Diffusion 1.x/2.x", "builtin:tiny-sd", "StableDiffusionPipeline",
          flow_matching=False, requires=(SD_UNET,), excludes_prefix="conditioner."),
    Facts("sdxl", "SDXL", "builtin:tiny-sdxl", "StableDiffusionXLPipeline",
          flow_matching=False, requires=(SDXL_ADM,), requires_prefix=SDXL_BIGG),
    Facts("flux", "Flux.1", "builtin:tiny-flux", "FluxPipeline", flow_matching=True,
          network_module="networks.lora_flux", fused_webui=True, a1111="forge",
          requires=(BFL_MARKER,), excludes=(CHROMA_MARKER,)),  # Chroma's have Flux's blocks
    Facts("sd3", "SD3", "builtin:tiny-sd3", "StableDiffusion3Pipeline", flow_matching=True,
          network_module="networks.lora_sd3", fused_webui=True, a1111="no",
          requires=(MMDIT_MARKER,)),
    Facts("chroma", "Chroma", "builtin:tiny-chroma", "ChromaPipeline", flow_matching=True,
          network_module="networks.lora_flux", fused_webui=True, a1111="no",
          requires=(CHROMA_MARKER,)),
    Facts("qwen-image", "Qwen-Image", "builtin:tiny-qwen-image", "QwenImagePipeline",
          flow_matching=True, trainer="musubi-tuner", network_module="networks.lora_qwen_image",
          a1111="no", requires=(QWEN_MARKER,)),
)
BY_NAME = {f.name: f for f in FAMILIES}
BY_BUILTIN = {f.builtin: f for f in FAMILIES}
BY_PIPELINE = {f.pipeline: f for f in FAMILIES}


def single_file_family(keys: set[str]) -> Facts | None:
    """The family of a single file's tensor names, or None."""
    return next((f for f in FAMILIES if f.owns(keys)), None)
