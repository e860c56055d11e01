"""Image generation with a LoRA, and grids that put the base model beside the LoRA.

Schedulers are diffusers' own, built from the base model's scheduler config so they share
its noise schedule and prediction type.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

from lorapipe.diffusion import families
from lorapipe.diffusion.schedulers import SCHEDULERS, make_scheduler  # noqa: F401

MIN_CELL = 128  # grid cells are enlarged (nearest neighbour) to at least this many pixels
FONT_PX = 14  # label text size: readable beside 128 px cells (Pillow's bare default is 10)
LABEL_H = 22  # one label line: the font's height plus a margin


@dataclass(frozen=True)
class SampleSettings:
    steps: int
    guidance_scale: float
    negative_prompt: str
    width: int
    height: int
    lora_scale: float


def seeds_for(base_seed: int, count: int) -> list[int]:
    """The seeds of one prompt's images: consecutive from sample.seed, the same for every
    prompt, so a row-to-row comparison changes only the prompt."""
    return [base_seed + i for i in range(count)]


@torch.no_grad()
def generate(pipe, prompt: str, seed: int, s: SampleSettings, lora: bool,
             family: families.Family | None = None) -> Image.Image:
    """One image; lora=False gives the base model's image for the same seed. family: the
    pipeline's (looked up from its class when not given), which says how the LoRA scale is
    passed to it."""
    family = family or families.of_pipeline(pipe)
    if lora:
        pipe.enable_lora()
    else:
        pipe.disable_lora()
    try:
        out = pipe(
            prompt, num_inference_steps=s.steps, width=s.width, height=s.height,
            generator=torch.Generator("cpu").manual_seed(seed),
            **family.sampling_kwargs(s, pipe.scheduler.config),
            **(family.lora_scale_kwargs(s.lora_scale) if lora else {}),
        )
    finally:
        pipe.enable_lora()
    image = out.images[0]
    del out
    gc.collect()  # keeps memory flat over many prompts
    return image


def fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis where needed to be at most `width` pixels wide, so a
    label never runs into the next cell's."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def grid(rows: list[tuple[str, list[tuple[int, Image.Image, Image.Image]]]]) -> Image.Image:
    """One row per prompt; for each seed the base image then the LoRA image.

    rows: [(prompt, [(seed, base, lora), ...]), ...]
    """
    first = rows[0][1][0][1]
    zoom = max(1, -(-MIN_CELL // min(first.size)))  # ceil division
    cw, ch = first.width * zoom, first.height * zoom
    cols = 2 * max(len(cells) for _, cells in rows)
    canvas = Image.new("RGB", (cols * cw, len(rows) * (ch + 2 * LABEL_H)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_PX)
    for r, (prompt, cells) in enumerate(rows):
        top = r * (ch + 2 * LABEL_H)
        draw.text((4, top + 3), fit(draw, prompt, font, canvas.width - 8), fill="black",
                  font=font)
        for c, (seed, base, lora) in enumerate(cells):
            for k, (label, image) in enumerate((("base", base), ("LoRA", lora))):
                x = (2 * c + k) * cw
                draw.text((x + 4, top + LABEL_H + 3),
                          fit(draw, f"{label} seed {seed}", font, cw - 8), fill="black",
                          font=font)
                canvas.paste(image.resize((cw, ch), Image.Resampling.NEAREST),
                             (x, top + 2 * LABEL_H))
    return canvas


def sample_grid(pipe, prompts: list[str], seeds: list[int], s: SampleSettings,
                progress=None, family: families.Family | None = None
                ) -> tuple[Image.Image, list]:
    """Base and LoRA images for every prompt and seed, and their grid.

    Returns (grid, [(prompt_index, seed, base, lora), ...])."""
    rows, images = [], []
    for i, prompt in enumerate(prompts):
        cells = []
        for seed in seeds:
            base = generate(pipe, prompt, seed, s, lora=False, family=family)
            lora = generate(pipe, prompt, seed, s, lora=True, family=family)
            cells.append((seed, base, lora))
            images.append((i, seed, base, lora))
            if progress is not None:
                progress.update()
        rows.append((prompt, cells))
    return grid(rows), images
