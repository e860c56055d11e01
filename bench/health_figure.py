"""Make docs/loss_health.png: the fixed-noise curves and verdicts of three real runs of the
builtin model on the example data (defaults; learning rate 1e-6; learning rate 0.01 at rank 32).

    python bench/health_figure.py
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import yaml
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from train_step import example_cache  # noqa: E402

RUNS = [
    ("defaults", {}),
    ("learning_rate 1e-6", {"learning_rate": 1e-6}),
    ("learning_rate 0.01, rank 32", {"learning_rate": 0.01, "rank": 32}),
]
W, H, PAD = 360, 260, 40
COLOURS = {"loss/train/fixed": (31, 119, 180), "loss/validation/step_average": (255, 127, 14)}


def train(root: Path, cache: Path, overrides: dict) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from lorapipe.core.training import Paths, run
    from lorapipe.tasks import load_params, stage

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = str(REPO / "data/example")
    params["train"].update(sample_every=0, checkpoint_every=0, max_steps=300)
    params["train"]["validation"]["every"] = 20
    if "rank" in overrides:
        params["lora"].update(rank=overrides["rank"], alpha=overrides["rank"])
    if "learning_rate" in overrides:
        params["train"]["learning_rate"] = overrides["learning_rate"]
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    params = load_params(root / "params.yaml")
    summary = run(params, Paths(cache, root / "lora", root / "dvclive", root / "logs",
                                root / "ckpt", None), stage(params, "train").recipe_class()).summary
    series = {}
    for name in COLOURS:
        with open(root / "dvclive/plots/metrics" / f"{name}.tsv", encoding="utf-8") as f:
            key = name.split("/")[-1]
            series[name] = [(int(r["step"]), float(r[key])) for r in
                            csv.DictReader(f, delimiter="\t")]
    return {"summary": summary, "series": series}


def panel(title: str, result: dict, lo: float, hi: float) -> Image.Image:
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    d.text((PAD, 6), title, fill="black", font=font)
    health = result["summary"]["health"]["status"]
    d.text((PAD, 20), f"verdict: {health}", fill=(180, 0, 0) if health != "healthy"
           else (0, 120, 0), font=font)
    x0, y0, x1, y1 = PAD, 40, W - 10, H - 30
    d.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
    steps = max(s for s, _ in result["series"]["loss/train/fixed"])
    for name, colour in COLOURS.items():
        pts = [(x0 + (x1 - x0) * s / steps, y1 - (y1 - y0) * (v - lo) / (hi - lo))
               for s, v in result["series"][name]]
        d.line(pts, fill=colour, width=2)
    for v in (lo, (lo + hi) / 2, hi):
        y = y1 - (y1 - y0) * (v - lo) / (hi - lo)
        d.text((4, y - 6), f"{v:.2f}", fill="black", font=font)
    d.text((x0, y1 + 6), "0", fill="black", font=font)
    d.text((x1 - 24, y1 + 6), f"{steps}", fill="black", font=font)
    d.text((W // 2 - 14, y1 + 6), "step", fill="black", font=font)
    return im


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="health-figure-"))
    cache = example_cache(root / "data")
    results = [(title, train(root / f"run{i}", cache, o)) for i, (title, o) in enumerate(RUNS)]
    values = [v for _, r in results for s in r["series"].values() for _, v in s]
    lo, hi = min(values) - 0.02, max(values) + 0.02
    figure = Image.new("RGB", (W * len(results), H + 24), "white")
    for i, (title, result) in enumerate(results):
        figure.paste(panel(title, result, lo, hi), (i * W, 0))
    d = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    x = PAD
    for name, colour in COLOURS.items():
        d.line([(x, H + 12), (x + 20, H + 12)], fill=colour, width=3)
        d.text((x + 26, H + 6), name, fill="black", font=font)
        x += 240
    out = REPO / "docs" / "loss_health.png"
    out.parent.mkdir(exist_ok=True)
    figure.save(out)
    for title, result in results:
        s = result["summary"]
        print(f"{title:<30} {s['health']['status']:<13} fixed {s['fixed_loss_start']:.3f} -> "
              f"{s['fixed_loss_end']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
