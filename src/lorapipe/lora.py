"""LoRA on the UNet: attach (peft), export in the diffusers and WebUI/kohya formats, load
back, and continue from an existing LoRA.

Two files are written to the output folder:
- pytorch_lora_weights.safetensors: diffusers/peft format with the adapter config in its
  metadata, so `pipe.load_lora_weights(folder)` restores the right alpha/rank scale;
- <lora.name>.safetensors: one file for AUTOMATIC1111/Forge/ComfyUI in kohya's layout
  (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`) with kohya's metadata
  (lorapipe.webui).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from lorapipe import outputs, webui
from lorapipe.errors import LorapipeError

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_PREFIX = "lora_unet_"


def lora_config(rank: int, alpha: float, dropout: float, targets: list[str]) -> LoraConfig:
    # Gaussian A, zero B (Hu et al., 2021): the LoRA starts as a no-op on the base model.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=list(targets))


def attach_lora(unet: torch.nn.Module, config: LoraConfig) -> None:
    """Freeze the UNet and add the LoRA adapter; raises if a target matches nothing."""
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config)
    except ValueError as exc:
        raise LorapipeError(
            f"lora.targets {sorted(config.target_modules)} match no UNet layer ({exc}); use "
            "attention projections such as to_q, to_k, to_v, to_out.0"
        ) from None


def peft_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft naming ('<module>.lora_A.weight'), contiguous fp32 copies."""
    return {k: v.detach().float().contiguous().clone()
            for k, v in get_peft_model_state_dict(unet).items()}


def adapter_metadata(config: LoraConfig) -> dict:
    """The peft config as JSON-safe values, sets sorted: set order differs between processes,
    and the saved bytes must not."""
    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value"):  # enums such as PeftType
            value = value.value
        out[key] = value
    return out


RUN_KEY = "lorapipe.run"  # metadata: the TensorBoard run that trained it (sample logs beside)


def save_diffusers(state: dict[str, torch.Tensor], config: LoraConfig, family, folder: Path,
                   run: str) -> Path:
    """The diffusers/peft file, written by the family's pipeline; `run` names the training
    run, so the sample stage can name its TensorBoard run the same (diffusers ignores
    metadata keys it does not know)."""
    family.pipeline_class.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=convert_state_dict_to_diffusers(state),
        safe_serialization=True,
        weight_name=DIFFUSERS_FILE,
        unet_lora_adapter_metadata=adapter_metadata(config),
    )
    outputs.canonical_safetensors(folder / DIFFUSERS_FILE, {RUN_KEY: run})
    return folder / DIFFUSERS_FILE


def training_run(folder: Path) -> str | None:
    """The training run recorded in a LoRA folder's diffusers file, if any."""
    with safe_open(str(Path(folder) / DIFFUSERS_FILE), "pt") as f:
        return (f.metadata() or {}).get(RUN_KEY)


def to_kohya(state: dict[str, torch.Tensor], alpha: float, family, unet_config
             ) -> dict[str, torch.Tensor]:
    """peft names -> kohya/WebUI names: 'a.b.lora_A.weight' -> 'lora_unet_a_b.lora_down.weight'
    (SD), or the module's original SGM name (SDXL; families.Family.webui_module)."""
    out = {}
    for key, tensor in state.items():
        module, kind, _ = key.rsplit(".", 2)
        name = KOHYA_PREFIX + family.webui_module(module, unet_config)
        out[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return dict(sorted(out.items()))


def save_webui(tensors: dict[str, torch.Tensor], metadata: dict, path: Path) -> Path:
    """kohya-layout tensors (to_kohya) in one file with `metadata` (webui.build_metadata)
    written as kohya writes it, plus the additional-networks hashes of its tensors."""
    meta = webui.as_strings(metadata)
    meta.update(webui.addnet_hashes(tensors, meta))
    save_file(tensors, str(path), metadata=meta)
    outputs.canonical_safetensors(path)
    return path


@dataclass(frozen=True)
class Record:
    """What the WebUI file's metadata says about the training run (webui.build_metadata)."""

    base: dict  # families.Family.base_version
    resolution: tuple[int, int]  # (width, height)
    captions: list[str]  # of the training images
    max_steps: int
    epochs: int
    step: int  # the step whose weights are saved (the best one after early stopping)
    run: str  # the TensorBoard run
    layout: dict | None = None  # preprocess's resolution and bucket params
    histogram: dict[str, int] | None = None  # images per bucket ('WxH')


def save_lora(unet, config: LoraConfig, family, params, out_dir: Path, record: Record) -> None:
    """Both formats into out_dir, atomically; refuses non-finite weights."""
    state = peft_state(unet)
    bad = [k for k, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise LorapipeError(f"refusing to save non-finite LoRA weights ({bad[0]})")
    name = webui.output_name(params.lora.name)
    metadata = webui.build_metadata(params, name, record.base, record.resolution,
                                    record.captions, record.max_steps, record.epochs,
                                    record.step, record.layout, record.histogram)
    tensors = to_kohya(state, params.lora.alpha, family, unet.config)
    with outputs.atomic_dir(out_dir) as tmp:
        save_diffusers(state, config, family, tmp, record.run)
        save_webui(tensors, metadata, tmp / webui.file_name(name))


def load_init(unet: torch.nn.Module, path: str, config: LoraConfig, family) -> int:
    """Load an existing LoRA (diffusers folder/file or a kohya/WebUI file) into the attached
    adapter, so training continues from it. Returns the number of tensors loaded.

    A LoRA saved with another alpha is rescaled (up weights * file_alpha / alpha) so the model
    starts out computing exactly what that LoRA computed.
    """
    try:
        # unet_config: diffusers maps kohya's SGM block names (SDXL) back to its own
        loaded, alphas, metadata = family.pipeline_class.lora_state_dict(
            path, local_files_only=True, return_lora_metadata=True, unet_config=unet.config
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LorapipeError(f"lora.init: cannot read a LoRA from {path!r}: {exc}") from None
    unet_part = {k.removeprefix("unet."): v for k, v in loaded.items() if k.startswith("unet.")}
    if not unet_part:
        raise LorapipeError(f"lora.init: {path!r} holds no UNet LoRA weights")
    incoming = convert_unet_state_dict_to_peft(unet_part)
    current = get_peft_model_state_dict(unet)
    missing = sorted(set(current) - set(incoming))
    extra = sorted(set(incoming) - set(current))
    if missing or extra:
        detail = "; ".join(
            f"{len(keys)} LoRA tensors {what} (e.g. {keys[0]})"
            for keys, what in ((missing, "missing from it"), (extra, "it has that we do not"))
            if keys
        )
        raise LorapipeError(
            f"lora.init: {path!r} was trained on other layers than lora.targets "
            f"{sorted(config.target_modules)}: {detail}; set lora.targets to the layers it "
            "was trained on"
        )
    for key, tensor in incoming.items():
        if tensor.shape != current[key].shape:
            file_rank = min(tensor.shape)
            raise LorapipeError(
                f"lora.init: {path!r} has rank {file_rank} but lora.rank is {config.r}; "
                f"set lora.rank: {file_rank} to continue training it"
            )
    file_alpha = _file_alpha(path, alphas, metadata, config)
    if file_alpha != config.lora_alpha:
        for key in incoming:
            if key.endswith("lora_B.weight"):
                incoming[key] = incoming[key] * (file_alpha / config.lora_alpha)
    set_peft_model_state_dict(unet, incoming, adapter_name="default")
    return len(incoming)


def _file_alpha(path: str, alphas: dict | None, metadata: dict | None, config: LoraConfig):
    """The alpha a LoRA file was saved with: kohya files store one per module, our diffusers
    files store the peft config; a file with neither is taken to use ours."""
    if alphas:
        values = {float(v) for v in alphas.values()}
        if len(values) > 1:
            raise LorapipeError(
                f"lora.init: {path!r} uses different alphas per layer {sorted(values)}; "
                "continuing such a LoRA is not supported"
            )
        return values.pop()
    if metadata and "unet.lora_alpha" in metadata:
        return float(metadata["unet.lora_alpha"])
    return float(config.lora_alpha)
