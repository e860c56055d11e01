"""The LLM task's LoRA as peft makes it: config, attaching, the adapter folder.

The adapter folder (adapter_config.json + adapter_model.safetensors) is peft's own layout:
what PeftModel.from_pretrained, vLLM's LoRA loader and LLaMA-Factory read.
"""

from __future__ import annotations

import math
from pathlib import Path

from peft import PeftConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from lorapipe.core.adapters import RUN_KEY
from lorapipe.core.adapters import lora_config as build_lora_config
from lorapipe.core.errors import LorapipeError

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# lora.targets presets: the attention projections, or peft's every-Linear-but-the-head
TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"}

def targets_of(targets: str | list[str]) -> str | list[str]:
    return TARGETS[targets] if isinstance(targets, str) else list(targets)


def lora_config(lp, base: str) -> PeftConfig:
    """lora.method's peft config for a causal LM. init: peft's default (Kaiming-uniform A,
    zero B), as peft's and TRL's LLM recipes, or lora.init_weights' PiSSA / OLoRA (from the
    base's SVD / QR; full decompositions, so a rebuilt run starts identically)."""
    init = True if lp.init_weights == "default" else lp.init_weights
    return build_lora_config(lp, targets_of(lp.targets), init=init, task_type="CAUSAL_LM",
                             base_model_name_or_path=base)


def attach(model, lp, base: str):
    """The peft model: the base frozen, a LoRA on lora.targets (seeded by the caller)."""
    try:
        return get_peft_model(model, lora_config(lp, base))
    except ValueError as exc:
        raise LorapipeError(
            f"lora.targets {lp.targets} match no layer of {base} ({str(exc)[:200]}); use a "
            "preset (attn, all-linear) or module names such as q_proj, v_proj") from None


def load_adapter(model, folder: str) -> str:
    """Continue from a peft adapter folder (lora.init); every tensor must match this run's
    LoRA (same targets and rank). Returns the note to print."""
    path = Path(folder)
    file = path / ADAPTER_FILE if path.is_dir() else path
    if not file.exists():
        raise LorapipeError(f"lora.init: {folder!r} holds no {ADAPTER_FILE}; give a peft "
                            "adapter folder (adapter_config.json + adapter_model.safetensors)")
    state = load_file(str(file))
    ours = get_peft_model_state_dict(model)
    incoming = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    mine = {k.removeprefix("base_model.model."): v for k, v in ours.items()}
    missing = sorted(set(mine) - set(incoming))
    wrong = [k for k in mine if k in incoming and incoming[k].shape != mine[k].shape]
    if missing or wrong or set(incoming) - set(mine):
        raise LorapipeError(
            f"lora.init: {folder!r} does not fit this LoRA ({len(missing)} tensors missing, "
            f"{len(set(incoming) - set(mine))} extra, {len(wrong)} of another shape); set "
            "lora.rank and lora.targets as when it was trained")
    set_peft_model_state_dict(model, state)
    return f"train: lora.init: continuing the LoRA in {folder} ({len(state)} tensors)"


def training_run(folder: Path) -> str | None:
    """The training run recorded in an adapter folder, if any (the sample stage names its
    TensorBoard run after it)."""
    with safe_open(str(Path(folder) / ADAPTER_FILE), "pt") as f:
        return (f.metadata() or {}).get(RUN_KEY)


def scale_lora(model, scale: float) -> None:
    """The adapter's strength at generation (sample.lora_scale): 0 = the base, 1 = as
    trained; every method's layers (LoRA, DoRA, LoHa, LoKr) take peft's set_scale."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "set_scale"):
            module.set_scale("default", scale)


def bake_rslora(config: dict) -> dict:
    """adapter_config.json with rsLoRA's scale alpha / sqrt(r) written as a plain
    lora_alpha = scale x r: llama.cpp's convert_lora_to_gguf.py reads lora_alpha and ignores
    use_rslora, and peft's set_scale (sample.lora_scale) rescales by lora_alpha / r; the
    update is the same in every loader."""
    if not config.get("use_rslora"):
        return config
    scale = config["lora_alpha"] / math.sqrt(config["r"])
    return {**config, "use_rslora": False, "lora_alpha": scale * config["r"]}
