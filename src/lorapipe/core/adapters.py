"""The adapter itself, for every task: one LoRA config builder and the LoRA state of a
run's trained components (checkpoints, early stopping's best state, exports), keyed
'<component>.<peft name>'.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from lorapipe.core.errors import LorapipeError

RUN_KEY = "lorapipe.run"  # metadata: the TensorBoard run that trained it (sample logs beside)




@dataclass(frozen=True)
class Shape:
    """The lora.* fields lora_config and configs_for read, for code that builds an adapter
    without a params.yaml (the benches, the tests); the pipeline passes params.lora."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    method: str = "lora"
    conv_rank: int = 0
    conv_alpha: float = 1.0
    lokr_factor: int = -1
    decompose_both: bool = False
    rslora: bool = False
    init_weights: str = "default"
    targets: str | tuple[str, ...] = "attn"
    text_encoder: bool = False


def lora_config(lp, targets, layers: list[int] | None = None, init: str | bool = "gaussian",
                patterns: tuple[dict, dict] | None = None, **task: object) -> PeftConfig:
    """The peft config of one component for lora.method (lp: the lora params): a LoraConfig
    (use_dora for dora), LoHaConfig or LoKrConfig. peft rather than the LyCORIS library: one
    adapter framework for both tasks, so diffusers' add_adapter, peft's state helpers (the
    checkpoints, early stopping's best state, lora.init), the LLM's PeftModel and vLLM's and
    peft's loaders all take every method as they take LoRA; the WebUI file gets LyCORIS's key
    names at export (lorapipe.diffusion.lycoris).

    layers: for a text encoder, the encoder layers that get an adapter (None = all); init:
    peft's init_lora_weights for lora/dora (the image task: "gaussian" A, as diffusers' and
    kohya's trainers; the LLM task: True, peft's Kaiming-uniform A, or "pissa"/"olora"); B
    (LoHa: w2_b, LoKr: w2) starts at zero for every method, so the adapter starts as a no-op
    on the base. patterns: per-module (ranks, alphas), LoCon's convolutions. task: the task's
    own config fields (task_type, base_model_name_or_path)."""
    where = {"layers_to_transform": layers, "layers_pattern": "layers"} if layers else {}
    ranks, alphas = patterns or ({}, {})
    common = {"r": lp.rank, "target_modules": targets if isinstance(targets, str)
              else list(targets), "rank_pattern": ranks, "alpha_pattern": alphas,
              **where, **task}
    if lp.method in ("lora", "dora"):
        return LoraConfig(lora_alpha=lp.alpha, lora_dropout=lp.dropout, init_lora_weights=init,
                          use_dora=lp.method == "dora", use_rslora=lp.rslora, **common)
    if lp.method == "loha":
        return LoHaConfig(alpha=lp.alpha, init_weights=True, **common)
    return LoKrConfig(alpha=lp.alpha, init_weights=True, decompose_both=lp.decompose_both,
                      decompose_factor=lp.lokr_factor, **common)


def config_alpha(config: PeftConfig) -> float:
    """A config's alpha, whatever its method calls it."""
    return config.lora_alpha if isinstance(config, LoraConfig) else config.alpha


def peft_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft naming ('<module>.lora_A.weight'), contiguous fp32 copies."""
    return {k: v.detach().float().contiguous().clone()
            for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def adapter_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every component's LoRA weights, keyed '<component>.<peft name>' (diffusers' prefixes:
    'unet.', 'text_encoder.', 'text_encoder_2.')."""
    return {f"{name}.{k}": v for name, model in models.items()
            for k, v in peft_state(model).items()}


def split_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """'<component>.<name>' keys -> {component: {name: tensor}}."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        parts.setdefault(component, {})[rest] = tensor
    return parts


def load_adapter_state(models: dict[str, torch.nn.Module], state: dict[str, torch.Tensor],
                       source: str) -> None:
    """Put adapter_state() weights back; every component's LoRA tensors must all be there
    (peft itself would skip missing ones without a word)."""
    parts = split_state(state)
    for name, model in models.items():
        part = parts.get(name, {})
        expected = set(get_peft_model_state_dict(model))
        if set(part) != expected:
            raise LorapipeError(
                f"{source} holds {len(part)} {name} LoRA tensors where this run has "
                f"{len(expected)}: it was saved by another configuration")
        set_peft_model_state_dict(model, part, adapter_name="default")


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


@contextmanager
def switched_off(models: dict[str, torch.nn.Module]) -> Iterator[None]:
    """The base alone, for a measurement: every LoRA layer of these components off (peft's
    own switch on each layer), then back on, each parameter's requires_grad as it was."""
    layers = [m for model in models.values() for m in model.modules()
              if isinstance(m, BaseTunerLayer)]
    grads = [(q, q.requires_grad) for model in models.values() for q in model.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for q, grad in grads:
            q.requires_grad_(grad)
