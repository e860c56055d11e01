"""preprocess: every usable image to a square PNG at preprocess.resolution, on all cores.

    python -m stages.preprocess --images data/example --usable reports/usable.csv \
        --out data/processed
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from functools import partial
from pathlib import Path, PurePosixPath

from lorapipe import outputs
from lorapipe.cli import run_stage
from lorapipe.errors import LorapipeError
from lorapipe.images import resolve_inside, save_square_png
from lorapipe.parallel import map_progress, resolve_workers
from lorapipe.params import load_params


def output_names(file_names: list[str]) -> list[str]:
    """'a/b.jpg' -> 'a/b.png'; when two sources would collide ('x.jpg', 'x.png'), the later
    keeps its extension in the name ('x.png.png')."""
    taken: set[str] = set()
    names = []
    for name in file_names:
        out = PurePosixPath(name.replace("\\", "/")).with_suffix(".png").as_posix()
        if out.lower() in taken:
            out = PurePosixPath(name.replace("\\", "/")).as_posix() + ".png"
        taken.add(out.lower())
        names.append(out)
    return names


# what SDXL's micro-conditioning is told about each image (Podell et al., 2023, 2.2): the
# output size, the source size (after EXIF orientation) and the crop's top-left corner in the
# resized image, as diffusers' SDXL training example computes them
SIZE_COLUMNS = ("width", "height", "original_width", "original_height", "crop_left",
                "crop_top")


def size_columns(source: tuple[int, int], resolution: int) -> list[int]:
    """SIZE_COLUMNS for a source of (width, height) resized so its shorter side is
    `resolution` and centre-cropped to a square."""
    width, height = source
    scale = resolution / min(width, height)
    left = round((width * scale - resolution) / 2)
    top = round((height * scale - resolution) / 2)
    return [resolution, resolution, width, height, left, top]


def read_usable(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return [(r["file_name"], r["text"]) for r in csv.DictReader(f)]
    except FileNotFoundError:
        raise LorapipeError(f"{path} not found; run the validate stage first") from None


def process_one(images: str, out_dir: str, resolution: int, job: tuple[str, str]):
    """Worker: one source image to one PNG; returns the source size."""
    src_name, dst_name = job
    src = resolve_inside(images, src_name)  # validate checked it; re-check, never trust
    dst = Path(out_dir) / dst_name
    dst.parent.mkdir(parents=True, exist_ok=True)
    return save_square_png(src, dst, resolution)


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.preprocess", description=__doc__)
    parser.add_argument("--images", required=True, help="folder with the source images")
    parser.add_argument("--usable", required=True, help="usable rows from the validate stage")
    parser.add_argument("--out", required=True, help="folder to write the PNGs into")
    args = parser.parse_args(argv)
    params = load_params().preprocess

    rows = read_usable(args.usable)
    if not rows:
        raise LorapipeError(f"{args.usable} lists no usable images")
    names = output_names([src for src, _ in rows])
    workers = resolve_workers(params.workers)
    print(f"preprocess: {len(rows)} images -> {params.resolution}x{params.resolution} PNG, "
          f"{workers} worker(s)")

    with outputs.atomic_dir(args.out) as tmp:
        job = partial(process_one, args.images, str(tmp), params.resolution)
        sizes = map_progress(job, list(zip([s for s, _ in rows], names, strict=True)),
                             workers, desc="preprocess")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file_name", "text", "source", *SIZE_COLUMNS])
        writer.writerows(
            [name, text, src, *size_columns(size, params.resolution)]
            for name, (src, text), size in zip(names, rows, sizes, strict=True)
        )
        (tmp / "metadata.csv").write_text(buf.getvalue(), encoding="utf-8")

    upscaled = sum(min(size) < params.resolution for size in sizes)
    if upscaled:
        print(f"preprocess: {upscaled} image(s) were smaller than {params.resolution} px and "
              "were upscaled; raise validate.min_side to refuse them", file=sys.stderr)
    print(f"preprocess: wrote {len(rows)} images and metadata.csv to {args.out}")
    return 0


if __name__ == "__main__":
    run_stage("preprocess", main)
