"""The adapter itself, for every task: one LoRA config builder and the LoRA state of a
run's trained components (checkpoints, early stopping's best state, exports), keyed
'<component>.<peft name>'.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from lorapipe.core.errors import LorapipeError

RUN_KEY = "lorapipe.run"  # metadata: the TensorBoard run that trained it (sample logs beside)




def lora_config(rank: int, alpha: float, dropout: float, targets, layers: list[int] | None = None,
                init: str | bool = "gaussian", **task: object) -> LoraConfig:
    """The peft LoraConfig of one component. layers: for a text encoder, the encoder layers
    that get a LoRA (None = all); init: peft's init_lora_weights (the image task: "gaussian"
    A, as diffusers' and kohya's trainers; the LLM task: peft's default, Kaiming-uniform A);
    B is zero either way (Hu et al., 2021), so the LoRA starts as a no-op on the base model.
    task: the task's own LoraConfig fields (task_type, base_model_name_or_path)."""
    where = {"layers_to_transform": layers, "layers_pattern": "layers"} if layers else {}
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      **where, **task)


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
