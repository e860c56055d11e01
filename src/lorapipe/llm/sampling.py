"""Generation for the LLM task: each prompt answered by the base and by the LoRA, greedily and
sampled, written side by side (samples.md, samples.json, TensorBoard's text tab)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lorapipe.llm.data import prompt_text


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: float  # 0 = greedy only
    top_p: float
    seed: int

    @classmethod
    def from_params(cls, llm, seed: int) -> GenerationSettings:
        return cls(llm.max_new_tokens, llm.temperature, llm.top_p, seed)

    @property
    def modes(self) -> list[str]:
        return ["greedy"] + (["sampled"] if self.temperature > 0 else [])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, settings: GenerationSettings, mode: str) -> str:
    """One answer. Sampling draws from the seed only (forked RNG: training is unaffected)."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt_text(prompt, tokenizer), return_tensors="pt",
                        add_special_tokens=not tokenizer.chat_template).to(device)
    kwargs = {"do_sample": False} if mode == "greedy" else {
        "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
        "top_k": 0}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        out = model.generate(**encoded, max_new_tokens=settings.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def base_and_lora(model, tokenizer, prompts: list[str], settings: GenerationSettings,
                  progress=None) -> list[dict]:
    """For a peft model: each prompt's answers with the adapter off (base) and on (LoRA)."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for prompt in prompts:
            row = {"prompt": prompt}
            for who, context in (("base", model.disable_adapter), ("lora", nullcontext)):
                with context():
                    for mode in settings.modes:
                        row[f"{who}_{mode}"] = generate(model, tokenizer, prompt, settings, mode)
                        if progress is not None:
                            progress.update()
            rows.append(row)
    finally:
        model.train(was_training)
    return rows


def to_markdown(rows: list[dict], settings: GenerationSettings, title: str) -> str:
    """A table per prompt: base beside LoRA, one line per mode."""
    lines = [f"# {title}", "",
             f"max_new_tokens {settings.max_new_tokens}; sampled: temperature "
             f"{settings.temperature:g}, top_p {settings.top_p:g}, seed {settings.seed}"
             if settings.temperature > 0 else
             f"max_new_tokens {settings.max_new_tokens}; greedy only (llm.temperature 0)"]
    for row in rows:
        lines += ["", f"## {_cell(row['prompt'])}", "", "| | base | LoRA |", "|---|---|---|"]
        for mode in settings.modes:
            lines.append(f"| {mode} | {_cell(row[f'base_{mode}'])} | "
                         f"{_cell(row[f'lora_{mode}'])} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return (text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>").strip()
            or "(nothing)")
