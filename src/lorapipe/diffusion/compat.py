"""Where an image adapter loads (lorapipe.core.compat): diffusers, ComfyUI, A1111/Forge and
kohya's sd-scripts, for the run's family, lora.method, LoCon and text-encoder parts. Each rule
names the loader it comes from. Light (no torch, no diffusers): the params stage writes the
report before any heavy import, and the train stage checks it against the saved files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorapipe.core.compat import Row
from lorapipe.diffusion import family_list

# what diffusers' load_lora_weights reads in peft's format (diffusers/loaders/peft.py,
# diffusers/utils/peft_utils.py get_peft_kwargs: use_dora from `lora_magnitude_vector`);
# LoHa and LoKr are written as per-component peft folders instead
DIFFUSERS_METHODS = ("lora", "dora")
# a saved LoRA folder's files (lorapipe.diffusion.lora writes them): the diffusers file, or
# per component a peft folder with these two
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
TITLES = {f.name: f.title for f in family_list.FAMILIES}
PIPELINES = {f.pipeline: f.name for f in family_list.FAMILIES}
BUILTINS = {f.builtin: f.name for f in family_list.FAMILIES}


@dataclass(frozen=True)
class ImageAdapter:
    family: str  # family_list.Facts.name: sd, sdxl, flux, sd3, chroma, qwen-image
    method: str  # lora.method
    rank: int
    conv_rank: int  # LoCon's; 0 = none
    text_encoder: bool
    webui: bool  # whether the WebUI file is written


def webui_refusal(family: str, method: str) -> str | None:
    """Why no WebUI file can be written, or None. Flux's WebUI names fuse q, k, v (and the
    single blocks' MLP input) into one BFL module: a LoRA fuses exactly (stacked down,
    block-diagonal up: families.flux.Flux.to_webui), a Hadamard or Kronecker product of
    parts does not, and a fused DoRA's magnitude is not written by lorapipe yet."""
    if family_list.BY_NAME[family].fused_webui and method != "lora":
        return (f"{TITLES[family]}'s WebUI names fuse q, k and v into one module, which a "
                f"{method} adapter of the separate projections cannot be written as")
    return None


def family_of(base: str, root: Path) -> str:
    """model.base's family from its name, model_index.json or a single file's tensor names
    (the header only)."""
    if base in BUILTINS:
        return BUILTINS[base]
    path = root / base
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            return PIPELINES.get(index.get("_class_name"), "sd")
        keys = _header(path)
    except (OSError, ValueError):
        return "sd"
    found = family_list.single_file_family(set(keys))
    return found.name if found is not None else "sd"


def from_params(params, root: Path) -> ImageAdapter:
    lp = params.lora
    family = family_of(params.model.base, root)
    return ImageAdapter(family, lp.method, lp.rank, lp.conv_rank, lp.text_encoder,
                        webui_refusal(family, lp.method) is None)


def adapter_files(folder: Path) -> list[Path]:
    """The adapter files of a LoRA folder: the diffusers file, or the per-component peft
    files (LoHa, LoKr)."""
    folder = Path(folder)
    if (folder / DIFFUSERS_FILE).exists():
        return [folder / DIFFUSERS_FILE]
    return sorted(folder.glob(f"*/{PEFT_FILE}"))


def from_files(folder: Path, family: str, webui_file: str) -> ImageAdapter:
    """The same facts read back from a saved LoRA folder (its file headers: no weights
    read): the method from the tensor names or the peft config, ranks from the shapes."""
    folder = Path(folder)
    files = adapter_files(folder)
    shapes = {k: v["shape"] for file in files for k, v in _header(file).items()
              if k != "__metadata__"}
    config = {} if not files or files[0].name == DIFFUSERS_FILE else json.loads(
        (files[0].parent / PEFT_CONFIG).read_text(encoding="utf-8"))
    method = config.get("peft_type", "").lower()
    if method not in ("loha", "lokr"):
        method = "dora" if any("lora_magnitude_vector" in k for k in shapes) else "lora"
    # the rank is the first dimension of LoRA's down (A) and LoHa's w1_b; a 3x3 one is LoCon's
    ranked = [v for k, v in shapes.items() if k.endswith(("lora_A.weight", "hada_w1_b"))]
    ranks = [v[0] for v in ranked if not _spatial(v)]
    conv = [v[0] for v in ranked if _spatial(v)]
    if method == "lokr":  # its factors' shapes do not show the rank: the config does
        ranks, conv = [config["r"]], [1] if any(map(_spatial, shapes.values())) else []
    text = any(k.startswith("text_encoder") for k in shapes) or any(
        f.parent.name.startswith("text_encoder") for f in files)
    return ImageAdapter(family, method, max(ranks, default=0), max(conv, default=0), text,
                        (folder / webui_file).exists())


def _spatial(shape: list[int]) -> bool:
    """A convolution weight with a kernel larger than 1x1."""
    return len(shape) == 4 and shape[2:] != [1, 1]


def _header(file: Path) -> dict:
    """A .safetensors file's header (tensor names, shapes; no weights read)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > 100_000_000:
            raise ValueError(f"{file}: not a safetensors header")
        return json.loads(f.read(size))


def facts(a: ImageAdapter) -> list[tuple[str, str]]:
    return [("task", "sd (images)"), ("family", TITLES[a.family]), ("lora.method", a.method),
            ("rank", str(a.rank) + (f"; LoCon convolutions at rank {a.conv_rank}"
                                    if a.conv_rank else "")),
            ("parts", "denoiser" + (" and text encoder(s)" if a.text_encoder else "")),
            ("weights", "fp32 (as trained: the LoRA weights stay fp32 under mixed precision)")]


def rows(a: ImageAdapter) -> list[Row]:
    return [_diffusers(a), _comfyui(a), _a1111(a), _kohya(a)]


def _diffusers(a: ImageAdapter) -> Row:
    # diffusers/loaders/lora_pipeline.py load_lora_weights: LoRA and DoRA in peft's names
    # (DoRA: use_dora from `lora_magnitude_vector`, diffusers/utils/peft_utils.py)
    if a.method in DIFFUSERS_METHODS:
        return Row("diffusers", "ok", "pipe.load_lora_weights(\"models/lora\") reads "
                   "pytorch_lora_weights.safetensors" + (" (DoRA included)" if a.method == "dora"
                                                          else ""))
    return Row("diffusers", "caveat",
               f"load_lora_weights reads LoRA and DoRA only; the {a.method} adapter is in "
               "peft's own folders (models/lora/<component>)",
               "PeftModel.from_pretrained(pipe.unet, \"models/lora/unet\") (per component)")


def _no_webui(client: str, a: ImageAdapter) -> Row:
    return Row(client, "no", f"no WebUI file: {webui_refusal(a.family, a.method)}",
               "lora.method lora for this client")


def _comfyui(a: ImageAdapter) -> Row:
    if not a.webui:
        return _no_webui("ComfyUI", a)
    if a.method == "dora":
        # comfy/weight_adapter/base.py weight_decompose: an output-axis dora_scale is
        # divided by the *base* weight's row norm, where peft, LyCORIS and the DoRA paper use
        # the merged weight's
        return Row("ComfyUI", "caveat", "ComfyUI's weight_decompose (comfy/weight_adapter/"
                   "base.py) normalises output-axis DoRA by the base weight's row norm, not "
                   "the merged one: each row's strength is off by ‖W+ΔW‖/‖W‖, near 1 only for "
                   "small updates", "lora.method lora for exact strength")
    # comfy/lora.py model_lora_keys_unet/clip map kohya's names; comfy/weight_adapter/
    # lora.py (LoCon convolutions too), loha.py, lokr.py rebuild each method
    return Row("ComfyUI", "ok", "the WebUI file (kohya/LyCORIS names) in models/loras")


def _a1111(a: ImageAdapter) -> Row:
    if not a.webui:
        return _no_webui("A1111/Forge", a)
    support = family_list.BY_NAME[a.family].a1111
    if support == "forge":
        return Row("A1111/Forge", "caveat", f"AUTOMATIC1111 has no {TITLES[a.family]}; Forge "
                   "loads the WebUI file", "use Forge (or ComfyUI)")
    if support == "no":
        # neither A1111's extensions-builtin/Lora nor Forge's loaders know these models
        return Row("A1111/Forge", "no", f"neither AUTOMATIC1111 nor Forge runs "
                   f"{TITLES[a.family]}", "load the WebUI file in ComfyUI (or SwarmUI, which "
                   "runs ComfyUI)")
    if a.method == "dora":
        # extensions-builtin/Lora/network.py apply_weight_decompose: the norm is taken per
        # input column (the DoRA paper's original axis) only
        return Row("A1111/Forge", "no", "A1111's apply_weight_decompose (extensions-builtin/"
                   "Lora/network.py) reads DoRA magnitudes per input column; peft's are per "
                   "output row and broadcast to the wrong shape",
                   "lora.method lora, or load the DoRA in ComfyUI")
    # extensions-builtin/Lora: network_lora.py (LoCon convolutions), network_hada.py,
    # network_lokr.py
    return Row("A1111/Forge", "ok", "the WebUI file in models/Lora; <lora:name:1> in the prompt")


def _kohya(a: ImageAdapter) -> Row:
    if not a.webui:
        return _no_webui("kohya", a)
    if a.method != "lora":
        # networks/lora.py (networks/lora_flux.py) create_network_from_weights reads
        # lora_down/lora_up/alpha only
        return Row("kohya", "caveat", f"networks.lora reads lora_down/lora_up only; the "
                   f"{a.method} file needs LyCORIS in sd-scripts",
                   "--network_module lycoris.kohya --network_weights <file> "
                   "(pip install lycoris-lora)")
    if a.conv_rank:
        return Row("kohya", "ok", "networks.lora with its LoCon switch",
                   f"--network_args conv_dim={a.conv_rank} (ss_network_args says so)")
    known = family_list.BY_NAME[a.family]
    if known.trainer != family_list.SD_SCRIPTS:
        return Row("kohya", "ok", f"{known.trainer}'s {known.network_module} reads it: "
                   "--network_weights to continue")
    return Row("kohya", "ok", f"{known.network_module}: --network_weights to continue, "
               "merge_lora.py to merge")
