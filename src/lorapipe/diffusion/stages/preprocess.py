"""preprocess, image task: every usable image to a square PNG at preprocess.resolution (or
to its aspect-ratio bucket, preprocess.buckets), on all cores, with the size columns SDXL's
micro-conditioning reads."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

from lorapipe.core import outputs
from lorapipe.core.errors import LorapipeError
from lorapipe.core.parallel import map_progress, resolve_workers
from lorapipe.diffusion import buckets
from lorapipe.diffusion.images import (
    oriented_size,
    resolve_inside,
    save_placed_png,
    save_square_png,
)


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


def size_columns(source: tuple[int, int], placement: buckets.Placement) -> list[int]:
    return [placement.width, placement.height, *source, placement.crop_left,
            placement.crop_top]


@dataclass(frozen=True)
class Layout:
    """Square crops at `resolution`, or the bucket set (preprocess.buckets)."""

    resolution: int
    buckets: tuple[tuple[int, int], ...] = ()
    step: int = 0
    upscale: bool = False

    @classmethod
    def from_params(cls, p) -> Layout:
        if not p.buckets:
            return cls(p.resolution)
        return cls(p.resolution, tuple(buckets.make_buckets(p.resolution, p.bucket_step,
                                                            p.min_side, p.max_side)),
                   p.bucket_step, p.upscale)

    def place(self, size: tuple[int, int]) -> buckets.Placement:
        if not self.buckets:
            return buckets.square(size, self.resolution)
        return buckets.place(size, list(self.buckets), self.step, self.upscale)


def read_usable(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return [(r["file_name"], r["text"]) for r in csv.DictReader(f)]
    except FileNotFoundError:
        raise LorapipeError(f"{path} not found; run the validate stage first") from None


def process_one(images: str, out_dir: str, layout: Layout, job: tuple[str, str]) -> list[int]:
    """Worker: one source image to one PNG; returns its SIZE_COLUMNS."""
    src_name, dst_name = job
    src = resolve_inside(images, src_name)  # validate checked it; re-check, never trust
    dst = Path(out_dir) / dst_name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not layout.buckets:
        source = save_square_png(src, dst, layout.resolution)
        return size_columns(source, layout.place(source))
    source = oriented_size(src)
    placement = layout.place(source)
    save_placed_png(src, dst, placement)
    return size_columns(source, placement)


def run(all_params, args) -> int:
    params = all_params.preprocess

    rows = read_usable(args.usable)
    if not rows:
        raise LorapipeError(f"{args.usable} lists no usable images")
    names = output_names([src for src, _ in rows])
    workers = resolve_workers(params.workers)
    layout = Layout.from_params(params)
    shape = (f"aspect-ratio buckets of at most {params.resolution}x{params.resolution} px "
             f"({len(layout.buckets)} possible)" if layout.buckets
             else f"{params.resolution}x{params.resolution} PNG")
    print(f"preprocess: {len(rows)} images -> {shape}, {workers} worker(s)")

    with outputs.atomic_dir(args.out) as tmp:
        job = partial(process_one, args.images, str(tmp), layout)
        sizes = map_progress(job, list(zip([s for s, _ in rows], names, strict=True)),
                             workers, desc="preprocess")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file_name", "text", "source", *SIZE_COLUMNS])
        writer.writerows(
            [name, text, src, *size]
            for name, (src, text), size in zip(names, rows, sizes, strict=True)
        )
        (tmp / "metadata.csv").write_text(buf.getvalue(), encoding="utf-8")
        # how the sizes were chosen, for the WebUI file's ss_* fields (encode keeps it)
        (tmp / buckets.LAYOUT_FILE).write_text(json.dumps({
            "resolution": params.resolution, "buckets": params.buckets,
            "bucket_step": params.bucket_step, "min_side": params.min_side,
            "max_side": params.max_side, "upscale": params.upscale}) + "\n")

    if layout.buckets:
        counts = Counter(f"{w}x{h}" for w, h, *_ in sizes)
        print("preprocess: buckets " + ", ".join(f"{b}: {n}" for b, n in sorted(
            counts.items(), key=lambda kv: (-kv[1], kv[0]))))
    upscaled = sum(max(w / ow, h / oh) > 1 for w, h, ow, oh, *_ in sizes)
    if upscaled:
        print(f"preprocess: {upscaled} image(s) were smaller than their output size and "
              "were upscaled; raise validate.min_side to refuse them", file=sys.stderr)
    print(f"preprocess: wrote {len(rows)} images and metadata.csv to {args.out}")
    return 0

