"""The image task's part of the params check (lorapipe.core.params.TaskRules). Light: no
torch, no diffusers, so params.yaml is checked in a second."""

from __future__ import annotations

from lorapipe.core.params import TaskRules

BUILTINS = ("builtin:tiny-sd", "builtin:tiny-sdxl")

RULES = TaskRules(
    name="sd", builtins=BUILTINS, kind="a Stable Diffusion model",
    base_hint="set task_type: llm, or model.base to builtin:tiny-sd",
    # lora.targets presets (lorapipe.diffusion.families.unet.UNetFamily.targets)
    presets=("attn", "kohya"),
    unused=("llm",),
    checks=lambda v: [],
)
