"""The LLM task's part of the params check (lorapipe.core.params.TaskRules): the image
task's switches it cannot honour are refused, the rest of that task's keys ignored (params.yaml
holds both tasks' keys). Light: no torch, no transformers."""

from __future__ import annotations

from lorapipe.core.params import TaskRules

# builtin:tiny-llm (Qwen2.5's shape, ChatML) and one per chat family (lorapipe.llm.tiny)
BUILTINS = ("builtin:tiny-llm", "builtin:tiny-llama3", "builtin:tiny-qwen3",
            "builtin:tiny-gemma3", "builtin:tiny-mistral", "builtin:tiny-smollm2")

# Switches of the image task that the LLM cannot honour: set under llm, they are refused.
SD_ONLY_SWITCHES = {
    "lora.text_encoder": "the LLM has no separate text encoder",
    "lora.conv_rank": "LoCon adapts a UNet's convolutions; a language model has none",
    "preprocess.buckets": "buckets are for images",
    "train.captions.shuffle": "caption handling is for image captions",
    "train.captions.dropout": "caption handling is for image captions",
    "train.captions.tag_dropout": "caption handling is for image captions",
    "train.noise_offset": "there is no diffusion noise",
    "train.min_snr_gamma": "there are no diffusion timesteps",
}


def checks(v: dict[str, object]) -> list[str]:
    problems = []
    for dotted, why in SD_ONLY_SWITCHES.items():
        if v.get(dotted):
            problems.append(f"{dotted} is for task_type sd ({why}); set it to "
                            f"{'false' if v[dotted] is True else 0} for task_type llm")
    if v.get("model.config"):
        problems.append("model.config is for single-file Stable Diffusion checkpoints; "
                        "set it to \"\" for task_type llm")
    if v.get("llm.export_gguf") and v.get("lora.method", "lora") != "lora":
        problems.append(f"llm.export_gguf: llama.cpp loads LoRA adapters only, not lora.method "
                        f"{v['lora.method']}; use lora.method lora, or set llm.export_gguf: "
                        "false (llm.merge: true writes a merged model to convert instead)")
    for dotted in ("model.prediction_type", "model.noise_schedule"):
        if v.get(dotted, "auto") != "auto":
            problems.append(f"{dotted} is for task_type sd (a diffusion model's noise "
                            "schedule); set it to auto for task_type llm")
    return problems


RULES = TaskRules(
    name="llm", builtins=BUILTINS, kind="a language model",
    base_hint=f"use {', '.join(BUILTINS)} or a local Hugging Face folder",
    # lora.targets presets (lorapipe.llm.adapter.TARGETS)
    presets=("attn", "all-linear"),
    unused=("validate.min_side", "validate.max_pixels", "preprocess", "encode", "model.config",
            "model.prediction_type", "model.noise_schedule",
            "lora.conv_rank", "lora.conv_alpha",
            "train.text_encoder_lr", "train.noise_offset", "train.min_snr_gamma",
            "train.captions", "train.flow", "train.sample_steps", "train.sample_scheduler",
            "train.sample_guidance_scale", "train.validation.timesteps",
            "sample.negative_prompt", "sample.images_per_prompt", "sample.steps",
            "sample.guidance_scale", "sample.scheduler", "sample.width",
            "sample.height"),
    checks=checks,
)
