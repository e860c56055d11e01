"""Make the example dataset: 20 synthetic images of one style, "lpstyle", with captions.

The style a LoRA should learn: a single bold shape with a thick dark outline and a white
highlight, on pastel diagonal stripes. Captions name the colour and shape and the trigger
word, e.g. "a red circle, lpstyle". Sizes vary and are not all square, so preprocess's
resize and center-crop have something to do.

Deterministic: run it twice and the files are identical (`python data/example/make_example.py`).
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
COLOURS = {
    "red": (214, 40, 40),
    "blue": (38, 84, 200),
    "green": (46, 160, 67),
    "yellow": (240, 190, 20),
    "purple": (128, 52, 170),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ((192, 192), (224, 160), (160, 224), (256, 192))
STRIPES = ((250, 228, 214), (214, 236, 246))
OUTLINE = (30, 30, 40)


def star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_image(colour: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, STRIPES[0])
    d = ImageDraw.Draw(im)
    step = 16
    for k in range(-h, w + h, 2 * step):  # diagonal stripes
        d.polygon([(k, 0), (k + step, 0), (k + step - h, h), (k - h, h)], fill=STRIPES[1])
    r = min(w, h) * rng.uniform(0.28, 0.36)
    cx = w / 2 + rng.uniform(-0.08, 0.08) * w
    cy = h / 2 + rng.uniform(-0.08, 0.08) * h
    fill = COLOURS[colour]
    width = max(4, int(r * 0.12))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=OUTLINE, width=width)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=OUTLINE, width=width)
    elif shape == "triangle":
        pts = [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
        d.polygon(pts, fill=fill)
        d.line([*pts, pts[0], pts[1]], fill=OUTLINE, width=width, joint="curve")
    else:
        d.polygon(star(cx, cy, r * 1.15), fill=fill, outline=OUTLINE, width=width)
    hr = r * 0.14  # the white highlight, up and left of centre
    hx, hy = cx - r * 0.35, cy - r * 0.35
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=(255, 255, 255))
    return im


def main() -> None:
    rng = random.Random(1234)
    rows = []
    i = 0
    for shape in SHAPES:
        for colour in COLOURS:
            name = f"{i:02d}_{colour}_{shape}.png"
            draw_image(colour, shape, SIZES[i % len(SIZES)], rng).save(HERE / name)
            rows.append((name, f"a {colour} {shape}, lpstyle"))
            i += 1
    with open(HERE / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file_name", "text"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} images and metadata.csv to {HERE}")


if __name__ == "__main__":
    main()
