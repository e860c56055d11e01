"""Generation for the LLM task: each prompt answered by the base and by the LoRA, greedily and
sampled, written side by side (samples.md, samples.json, TensorBoard's text tab, and as an
image for `dvc plots show` / `dvc plots diff`, which show images but not text)."""

from __future__ import annotations

import textwrap
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from lorapipe.core.evaluation import evaluating
from lorapipe.llm.data import prompt_text

FONT_PX = 14
LINE_H = 18  # one text line: the font's height plus a margin
COLUMNS = (90, 380, 380)  # mode, base, LoRA: pixel widths
MAX_LINES = 8  # per answer in the image (the markdown and JSON hold every word)


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


def base_only(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[dict]:
    """For a model without an adapter: each prompt's base answers (base_and_lora's base_*)."""
    with evaluating(model):
        return [{f"base_{mode}": generate(model, tokenizer, prompt, settings, mode)
                 for mode in settings.modes} for prompt in prompts]


def base_and_lora(model, tokenizer, prompts: list[str], settings: GenerationSettings,
                  progress=None) -> list[dict]:
    """For a peft model: each prompt's answers with the adapter off (base) and on (LoRA)."""
    rows = []
    with evaluating(model):
        for prompt in prompts:
            row = {"prompt": prompt}
            for who, context in (("base", model.disable_adapter), ("lora", nullcontext)):
                with context():
                    for mode in settings.modes:
                        row[f"{who}_{mode}"] = generate(model, tokenizer, prompt, settings, mode)
                        if progress is not None:
                            progress.update()
            rows.append(row)
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


def to_image(rows: list[dict], settings: GenerationSettings, title: str) -> Image.Image:
    """The to_markdown table as a picture: per prompt, base beside LoRA, one block per mode,
    answers wrapped to their column (and cut after MAX_LINES lines)."""
    font = ImageFont.load_default(size=FONT_PX)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    chars = [max(8, int(w / max(probe.textlength("n", font=font), 1)) - 1) for w in COLUMNS]

    def wrap(text: str, column: int) -> list[str]:
        lines = textwrap.wrap(text.replace("\r", ""), chars[column]) or ["(nothing)"]
        return lines[:MAX_LINES - 1] + ["…"] if len(lines) > MAX_LINES else lines

    # one block per table row: its lines in each of the three columns
    blocks = [([title], [], [])]
    for row in rows:
        blocks += [([""], [], []), ([f"prompt: {row['prompt']}"], [], []),
                   ([""], ["base"], ["LoRA"])]  # a blank line before each prompt
        blocks += [([mode], wrap(row[f"base_{mode}"], 1), wrap(row[f"lora_{mode}"], 2))
                   for mode in settings.modes]
    height = sum(max(map(len, block)) for block in blocks)
    image = Image.new("RGB", (sum(COLUMNS) + 16, (height + 1) * LINE_H), "white")
    draw = ImageDraw.Draw(image)
    top = 4
    for block in blocks:
        for col, lines in enumerate(block):
            for k, line in enumerate(lines):
                draw.text((8 + sum(COLUMNS[:col]), top + k * LINE_H), line, fill="black",
                          font=font)
        top += max(map(len, block)) * LINE_H
    return image


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell."""
    return (text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>").strip()
            or "(nothing)")
