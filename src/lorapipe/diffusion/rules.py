"""The image task's part of the params check (lorapipe.core.params.TaskRules). Light: no
torch, no diffusers, so params.yaml is checked in a second."""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.core.params import TaskRules
from lorapipe.diffusion import family_list

BUILTINS = tuple(f.builtin for f in family_list.FAMILIES)


# what a flow-matching family refuses, and what to use instead (their Family.refused;
# checked here where the base's family is known without loading)
FLOW_MATCHING_REFUSED = {
    "train.noise_offset": "offset noise is a DDPM notion; flow matching shapes its noise levels "
                          "with train.flow.timestep_sampling and train.flow.shift",
    "train.min_snr_gamma": "Min-SNR weights DDPM timesteps; flow matching weights its noise "
                           "levels with train.flow.weighting (sigma_sqrt, cosmap)",
}


def refusals(refused: dict[str, str], v: dict[str, object], family: str) -> list[str]:
    """The refused keys set to a non-zero value, each with why and what instead."""
    return [f"{dotted} is {v[dotted]} but {family} bases are trained by flow matching: {why}; "
            f"set {dotted} to 0" for dotted, why in refused.items() if v.get(dotted)]


def _flow_matching_base(base: object) -> str | None:
    """The title of model.base's family when it is known, without loading it, to be a
    flow-matching model: a builtin, or a diffusers folder of such a pipeline (single files:
    the train stage)."""
    if not isinstance(base, str):
        return None
    found = family_list.BY_BUILTIN.get(base)
    if found is None:
        index = Path(base) / "model_index.json"
        try:
            found = family_list.BY_PIPELINE.get(json.loads(index.read_text(encoding="utf-8")).get(
                "_class_name"))
        except (OSError, ValueError, AttributeError):
            return None
    return found.title if found is not None and found.flow_matching else None


# the LLM task's adapter switches (peft's, for causal LMs): refused here, not ignored
LLM_ONLY = {
    "lora.rslora": ("rank-stabilised scaling is the LLM task's (kohya's image LoRAs scale by "
                    "alpha / rank)", "false"),
    "lora.init_weights": ("PiSSA and OLoRA are the LLM task's", "default"),
}


def checks(v: dict[str, object]) -> list[str]:
    problems = [f"{dotted} is for task_type llm ({why}); set it to {value} for task_type sd"
                for dotted, (why, value) in LLM_ONLY.items()
                if v.get(dotted) not in (None, False, "default")]
    title = _flow_matching_base(v.get("model.base"))
    if title:
        problems += refusals(FLOW_MATCHING_REFUSED, v, title)
        for dotted in ("model.prediction_type", "model.noise_schedule"):
            if v.get(dotted, "auto") != "auto":
                problems.append(f"{dotted} is {v[dotted]} but {title} bases are trained by "
                                "flow matching, which has no DDPM prediction type or noise "
                                f"schedule; set {dotted} to auto")
        if v.get("lora.conv_rank"):
            problems.append("lora.conv_rank is LoCon, LoRA on a UNet's convolutions, and "
                            f"{title}'s transformer has none; set lora.conv_rank to 0")
    if v.get("train.flow.resolution_shift") and v.get("train.flow.shift", 1.0) != 1.0:
        problems.append("train.flow.shift and train.flow.resolution_shift both shift the noise "
                        "levels; set shift to 1.0 or resolution_shift to false")
    return problems

RULES = TaskRules(
    name="sd", builtins=BUILTINS, kind="a Stable Diffusion model",
    base_hint="set task_type: llm, or model.base to builtin:tiny-sd",
    # lora.targets presets (lorapipe.diffusion.families.unet.UNetFamily.targets)
    presets=("attn", "kohya"),
    unused=("llm", "lora.rslora", "lora.init_weights"),
    checks=checks,
)
