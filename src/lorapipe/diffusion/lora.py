"""The image task's LoRA on the denoiser and, with lora.text_encoder, the text encoder(s):
attach (peft), export in the diffusers and WebUI/kohya formats, load back, and continue from
an existing LoRA.

A run's adapters are a dict of components (the family's denoiser, 'unet' or 'transformer',
and 'text_encoder', 'text_encoder_2', as the pipeline names them); their weights travel
together as lorapipe.core.adapters.adapter_state(), keyed '<component>.<peft name>'.

Two files are written to the output folder:
- pytorch_lora_weights.safetensors: diffusers/peft format with the adapter config in its
  metadata, so `pipe.load_lora_weights(folder)` restores the right alpha/rank scale;
- <lora.name>.safetensors: one file for AUTOMATIC1111/Forge/ComfyUI in kohya's layout
  (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoders
  `lora_te_*`, SDXL's `lora_te1_*` and `lora_te2_*`) with kohya's metadata
  (lorapipe.diffusion.webui).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
)
from peft import LoraConfig, PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorapipe.core import outputs
from lorapipe.core.adapters import (  # noqa: F401  (lora_config: the image task's builder too)
    RUN_KEY,
    adapter_metadata,
    adapter_state,
    config_alpha,
    lora_config,
    split_state,
)
from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import compat, lycoris, webui
from lorapipe.diffusion.compat import DIFFUSERS_FILE, PEFT_CONFIG, PEFT_FILE, adapter_files
from lorapipe.diffusion.families.unet import UNetFamily

PEFT_PREFIX = "base_model.model."  # how PeftModel names its base's modules in that file


def configs_for(lp, family, models: dict[str, torch.nn.Module]) -> dict[str, PeftConfig]:
    """The peft config (lora.method's) of every component that gets an adapter: the
    denoiser, with LoCon (lora.conv_rank) its convolutions too, and with lora.text_encoder
    each text encoder (all its layers the conditioning uses)."""
    targets = family.targets(lp.targets)
    denoiser, patterns = targets[family.denoiser], None
    if lp.conv_rank:
        main, conv = family.conv_targets(models[family.denoiser])
        denoiser = [*denoiser, *main, *conv]
        # full names, escaped: peft matches these keys as regular expressions
        patterns = ({re.escape(name): lp.conv_rank for name in conv},
                    {re.escape(name): lp.conv_alpha for name in conv})
    out = {family.denoiser: lora_config(lp, denoiser, patterns=patterns)}
    if lp.text_encoder:
        for name in family.trained_text_encoders():
            unused = family.unused_text_layers.get(name, 0)
            layers = list(range(models[name].config.num_hidden_layers - unused)) if unused \
                else None
            out[name] = lora_config(lp, targets[name], layers)
    return out


def module_rank_alpha(config: PeftConfig, module: str) -> tuple[int, float]:
    """A module's rank and alpha under its config (LoCon's convolutions have their own)."""
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern, module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, module),
                                     config_alpha(config))
    return rank, float(alpha)


def attach(models: dict[str, torch.nn.Module], configs: dict[str, LoraConfig],
           family=None) -> dict[str, int]:
    """Freeze each component and add its LoRA; returns the LoRA modules per component.
    Raises if a component's targets match nothing (family: whose module names to suggest;
    the UNet families' by default)."""
    example = (family or UNetFamily).target_example
    counts = {}
    for name, config in configs.items():
        model = models[name]
        model.requires_grad_(False)
        try:
            model.add_adapter(config)
        except ValueError as exc:
            raise LorapipeError(
                f"lora.targets {sorted(config.target_modules)} match no {_title(name)} layer "
                f"({exc}); use a preset (attn, kohya) or {example}") from None
        counts[name] = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    return counts


def save_diffusers(state: dict[str, torch.Tensor], configs: dict[str, LoraConfig], family,
                   folder: Path, run: str) -> Path:
    """The diffusers/peft file (adapter_state() weights: the denoiser's and any text encoder's),
    written by the family's pipeline; `run` names the training run, so the sample stage can
    name its TensorBoard run the same (diffusers ignores metadata keys it does not know)."""
    # peft's own key format ('.lora_A.weight'), which every diffusers loader reads; not
    # convert_state_dict_to_diffusers, which renames only the attention projections and
    # leaves a kohya-preset LoRA in two formats that load_lora_weights half-ignores
    layers = {}
    for name, part in split_state(state).items():
        if name != family.denoiser:
            part = {portable_text_name(k): v for k, v in part.items()}
        layers[f"{name}_lora_layers"] = part
        layers[f"{name}_lora_adapter_metadata"] = adapter_metadata(configs[name])
    family.pipeline_class.save_lora_weights(
        save_directory=str(folder), safe_serialization=True, weight_name=DIFFUSERS_FILE,
        **layers)
    outputs.canonical_safetensors(folder / DIFFUSERS_FILE, {RUN_KEY: run})
    return folder / DIFFUSERS_FILE


def portable_text_name(name: str) -> str:
    """A text-encoder module or tensor name as every loader knows it: transformers 5 flattened
    CLIPTextModel ('encoder.layers.0...'), while A1111, ComfyUI, kohya and older diffusers
    expect the 'text_model.' level (diffusers strips it again for a flattened model)."""
    return name if name.startswith("text_model.") else "text_model." + name


def save_peft(state: dict[str, torch.Tensor], configs: dict[str, PeftConfig], folder: Path,
              run: str) -> None:
    """Each component's adapter as peft saves one, for the methods diffusers'
    load_lora_weights does not read (LoHa, LoKr): `<component>/adapter_config.json` and
    `adapter_model.safetensors`, which `PeftModel.from_pretrained(pipe.unet, folder / "unet")`
    loads (load_into does the same in place)."""
    for name, part in split_state(state).items():
        sub = folder / name
        sub.mkdir()
        (sub / PEFT_CONFIG).write_text(json.dumps(adapter_metadata(configs[name]), indent=2,
                                                  sort_keys=True) + "\n", encoding="utf-8")
        save_file({PEFT_PREFIX + k: v for k, v in part.items()}, str(sub / PEFT_FILE))
        outputs.canonical_safetensors(sub / PEFT_FILE, {RUN_KEY: run})


def save_adapters(state: dict[str, torch.Tensor], configs: dict[str, PeftConfig], family,
                  folder: Path, run: str, method: str) -> None:
    """The adapter in the format its loaders read: the diffusers file (LoRA, DoRA) or the
    per-component peft folders (LoHa, LoKr)."""
    if method in compat.DIFFUSERS_METHODS:
        save_diffusers(state, configs, family, folder, run)
    else:
        save_peft(state, configs, folder, run)


def _peft_parts(folder: Path) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """A LoRA folder's per-component peft folders: component -> (its folder, its tensors
    under the component's own module names)."""
    return {file.parent.name: (file.parent, {k.removeprefix(PEFT_PREFIX): v
                                             for k, v in load_file(str(file)).items()})
            for file in sorted(Path(folder).glob(f"*/{PEFT_FILE}"))}


def training_run(folder: Path) -> str | None:
    """The training run recorded in a LoRA folder's adapter files, if any."""
    files = adapter_files(folder)
    if not files:
        return None
    with safe_open(str(files[0]), "pt") as f:
        return (f.metadata() or {}).get(RUN_KEY)


def load_into(pipe, folder: str) -> None:
    """A lorapipe LoRA folder into a pipeline, as its users load it: the diffusers file
    through `pipe.load_lora_weights`; per-component peft folders (LoHa, LoKr) through each
    component's `add_adapter` and peft's state loader, so the pipeline's LoRA switches and
    scale (enable_lora, cross_attention_kwargs) reach them as they reach a LoRA."""
    path = Path(folder)
    if (path / DIFFUSERS_FILE).exists():
        pipe.load_lora_weights(str(path))
        return
    for name, (sub, state) in _peft_parts(path).items():
        component = getattr(pipe, name, None)
        if component is None:
            raise LorapipeError(f"{sub} is an adapter for {name!r}, which "
                                f"{type(pipe).__name__} does not have")
        component.add_adapter(PeftConfig.from_pretrained(str(sub)))
        set_peft_model_state_dict(component, state, adapter_name="default")


def to_kohya(state: dict[str, torch.Tensor], configs: dict[str, PeftConfig], family,
             denoiser_config) -> dict[str, torch.Tensor]:
    """adapter_state() names -> kohya/WebUI names: 'unet.a.b.lora_A.weight' ->
    'lora_unet_a_b.lora_down.weight' (SD) or the module's original name (SDXL's SGM names),
    LoHa's, LoKr's and DoRA's tensors under LyCORIS's names (lorapipe.diffusion.lycoris),
    each module with its own alpha (LoCon's convolutions have conv_alpha);
    'text_encoder.text_model.encoder.layers.0.self_attn.q_proj' ->
    'lora_te_text_model_encoder_layers_0_self_attn_q_proj' (SDXL: lora_te1_, lora_te2_).
    A family whose WebUI names fuse modules (Flux's BFL names) writes its LoRA through
    Family.to_webui."""
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        module, kind = lycoris.split_name(rest)
        modules.setdefault((component, module), {})[kind] = tensor
    out, fused = {}, {}
    for (component, module), parts in modules.items():
        if component == family.denoiser and family.fuses_webui_modules:
            fused[module] = (parts["lora_A.weight"], parts["lora_B.weight"])
            continue
        name = webui_name(family, component, module, denoiser_config)
        rank, alpha = module_rank_alpha(configs[component], module)
        for kind, tensor in lycoris.module_tensors(parts, rank, alpha).items():
            out[f"{name}.{kind}"] = tensor
    if fused:
        out.update(family.to_webui(fused, config_alpha(configs[family.denoiser]),
                                   denoiser_config))
    return dict(sorted(out.items()))


def _is_kohya_file(path: Path, family) -> bool:
    """Whether a .safetensors file holds kohya's names (its header only)."""
    from safetensors import safe_open

    if path.is_dir() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return any(k.startswith(family.kohya_prefix) for k in f.keys())
    except Exception:  # safetensors' own error types; the reader below reports the file
        return False


def webui_name(family, component: str, module: str, denoiser_config) -> str:
    """The WebUI name of a component's module, one module each (not Flux's fused ones)."""
    if component == family.denoiser:
        return family.kohya_prefix + family.webui_module(module, denoiser_config)
    return family.kohya_text_prefixes[component] + portable_text_name(module).replace(".", "_")


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
    dirs: list[str]  # the dataset folder of each training image (kohya's ss_dataset_dirs)
    max_steps: int
    epochs: int
    step: int  # the step whose weights are saved (the best one after early stopping)
    run: str  # the TensorBoard run
    layout: dict | None = None  # preprocess's resolution and bucket params
    histogram: dict[str, int] | None = None  # images per bucket ('WxH')
    network_args: dict | None = None  # ss_network_args (families.Family.network_args)


def save_lora(models: dict[str, torch.nn.Module], configs: dict[str, LoraConfig], family,
              params, out_dir: Path, record: Record) -> None:
    """Both formats into out_dir, atomically; refuses non-finite weights."""
    state = adapter_state(models)
    bad = [k for k, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise LorapipeError(f"refusing to save non-finite LoRA weights ({bad[0]})")
    name = webui.output_name(params.lora.name)
    metadata = webui.build_metadata(params, name, record)
    method = params.lora.method
    tensors = (None if compat.webui_refusal(family.name, method)
               else to_kohya(state, configs, family, models[family.denoiser].config))
    with outputs.atomic_dir(out_dir) as tmp:
        save_adapters(state, configs, family, tmp, record.run, method)
        if tensors is not None:
            save_webui(tensors, metadata, tmp / webui.file_name(name))


def load_init(models: dict[str, torch.nn.Module], path: str, configs: dict[str, LoraConfig],
              family) -> list[str]:
    """Load an existing LoRA (diffusers folder/file or a kohya/WebUI file) into the attached
    adapters, so training continues from it. Returns notes for the user.

    Every part of the file must be used: a text-encoder part while lora.text_encoder is off
    is an error, never a silent drop. A component the file lacks (a denoiser-only LoRA continued
    with lora.text_encoder on) starts fresh, with a note. A LoRA saved with another alpha is
    rescaled (up weights * file_alpha / alpha) so the model starts out computing exactly
    what that LoRA computed.
    """
    if not isinstance(configs[family.denoiser], LoraConfig):  # LoHa, LoKr
        return _load_lycoris_init(models, Path(path), configs, family)
    if not family.reads_webui_files and _is_kohya_file(Path(path), family):
        raise LorapipeError(
            f"lora.init: {path!r} is a kohya/WebUI file, which diffusers cannot read for "
            f"{family.title}; continue from the run's LoRA folder (models/lora, its "
            "pytorch_lora_weights.safetensors)")
    try:
        read = family.pipeline_class.lora_state_dict(
            path, local_files_only=True, return_lora_metadata=True,
            **family.lora_reading_kwargs(models[family.denoiser]))
        # (state, alphas, metadata); SD3's reader returns no alphas (its files carry none)
        loaded, alphas, metadata = read if len(read) == 3 else (read[0], None, read[1])
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LorapipeError(f"lora.init: cannot read a LoRA from {path!r}: {exc}") from None
    parts = split_state(loaded)
    denoiser = family.denoiser
    if getattr(configs[denoiser], "use_dora", False) and not any(
            "lora_magnitude_vector" in k for k in loaded):
        raise LorapipeError(
            f"lora.init: {path!r} holds no DoRA magnitudes: a plain LoRA, or a WebUI file, "
            "whose dora_scale diffusers' reader drops; continue a DoRA from its run's "
            "models/lora folder, or set lora.method: lora")
    if denoiser not in parts:
        raise LorapipeError(f"lora.init: {path!r} holds no {_title(denoiser)} LoRA weights")
    unused = [name for name in parts if name not in models]
    if unused:
        count = sum(len(parts[name]) for name in unused)
        raise LorapipeError(
            f"lora.init: {path!r} also holds a text-encoder LoRA ({count} tensors: "
            f"{', '.join(unused)}), which lora.text_encoder: false would drop; set "
            "lora.text_encoder: true to continue all of it")
    notes = []
    file_alpha = _file_alpha(path, alphas, metadata, configs[denoiser], denoiser,
                             family.reader_bakes_alpha)
    for name, model in models.items():
        if name not in parts:
            notes.append(f"lora.init: {path} has no {name} LoRA; the {name} LoRA starts fresh")
            continue
        if name == denoiser:
            incoming = family.denoiser_lora_to_peft(parts[name])
        else:
            incoming = convert_state_dict_to_peft(convert_state_dict_to_diffusers(parts[name]))
            if not hasattr(model, "text_model"):  # flattened (transformers 5): as diffusers does
                incoming = {k.removeprefix("text_model."): v for k, v in incoming.items()}
        _check_init(path, name, incoming, get_peft_model_state_dict(model), configs[name])
        if file_alpha != configs[name].lora_alpha:
            for key in incoming:
                if key.endswith("lora_B.weight"):
                    incoming[key] = incoming[key] * (file_alpha / configs[name].lora_alpha)
        set_peft_model_state_dict(model, incoming, adapter_name="default")
    return notes


def _load_lycoris_init(models: dict[str, torch.nn.Module], path: Path,
                       configs: dict[str, PeftConfig], family) -> list[str]:
    """lora.init for LoHa and LoKr (diffusers reads neither): a lorapipe LoRA folder (the
    per-component peft folders) or a WebUI file in LyCORIS's names, mapped back through the
    names the export gives every module; the file's scale is carried into the weights, so
    the model starts out computing what that file computes."""
    if path.is_dir():
        parts = {name: state for name, (_, state) in _peft_parts(path).items()}
        if not parts:
            raise LorapipeError(f"lora.init: {str(path)!r} holds no {PEFT_FILE} in a "
                                "component folder (unet/, text_encoder/): give the models/lora "
                                "folder of a LoHa or LoKr run, or its WebUI file")
    else:
        parts = _from_webui(models, load_file(str(path)), configs, family)
    notes = []
    for name, model in models.items():
        if name not in parts:
            notes.append(f"lora.init: {path} has no {name} LoRA; the {name} LoRA starts fresh")
            continue
        _check_init(str(path), name, parts[name], get_peft_model_state_dict(model),
                    configs[name])
        set_peft_model_state_dict(model, parts[name], adapter_name="default")
    extra = sorted(set(parts) - set(models))
    if extra:
        raise LorapipeError(f"lora.init: {str(path)!r} also holds a {', '.join(extra)} "
                            "adapter, which this run does not train; set lora.text_encoder: true")
    return notes


def _from_webui(models, weights: dict[str, torch.Tensor], configs, family
                ) -> dict[str, dict[str, torch.Tensor]]:
    """A LyCORIS WebUI file -> {component: peft-named tensors} at this run's scale."""
    config = models[family.denoiser].config
    names = {}
    for component, model in models.items():
        for module, _ in model.named_modules():
            names.setdefault(webui_name(family, component, module, config), (component, module))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name, _, kind = key.partition(".")
        grouped.setdefault(name, {})[kind] = tensor
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensors in grouped.items():
        if name not in names:
            raise LorapipeError(f"lora.init: {name} names no module of this base; was "
                                "the file trained on another model family?")
        component, module = names[name]
        rank, alpha = module_rank_alpha(configs[component], module)
        for kind, tensor in lycoris.to_peft(tensors, rank, alpha).items():
            out.setdefault(component, {})[f"{module}.{kind}"] = tensor
    return out


def _title(component: str) -> str:
    """'unet' -> 'UNet', 'text_encoder_2' -> 'text encoder 2': for messages."""
    return {"unet": "UNet"}.get(component, component.replace("_", " "))


def _check_init(path: str, name: str, incoming: dict, current: dict, config: LoraConfig):
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
            f"{sorted(config.target_modules)} ({_title(name)}): {detail}; set lora.targets to "
            "the layers it was trained on (a preset: attn, kohya; or the list)"
        )
    for key, tensor in incoming.items():
        if tensor.shape != current[key].shape:
            file_rank = min(tensor.shape[:2])
            raise LorapipeError(
                f"lora.init: {path!r} has rank {file_rank} but lora.rank is {config.r}; "
                f"set lora.rank: {file_rank} to continue training it"
            )


def _file_alpha(path: str, alphas: dict | None, metadata: dict | None, config: LoraConfig,
                denoiser: str, baked: bool = False):
    """The alpha a LoRA file was saved with: kohya files store one per module, our diffusers
    files store the peft config; a file with neither is taken to use ours, unless the
    family's reader already multiplied alpha / rank into the weights (baked: Flux's kohya
    reader, which returns no alphas), which then hold the update at scale 1 (alpha = rank)."""
    if alphas:
        values = {float(v) for v in alphas.values()}
        if len(values) > 1:
            raise LorapipeError(
                f"lora.init: {path!r} uses different alphas per layer {sorted(values)} (a "
                "LoCon's conv_alpha, or another trainer's per-block alphas); continuing such a "
                "file is not supported: continue a lorapipe LoCon from its models/lora folder"
            )
        return values.pop()
    if metadata and f"{denoiser}.lora_alpha" in metadata:
        return float(metadata[f"{denoiser}.lora_alpha"])
    return float(config.r if baked else config.lora_alpha)
