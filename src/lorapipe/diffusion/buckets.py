"""Aspect-ratio buckets: the set of training sizes, and where each image goes.

As kohya's sd-scripts make them (`--enable_bucket`): for every width from min_side to
max_side in steps of bucket_step, the tallest height (a multiple of bucket_step, at most
max_side) whose area stays within resolution², and the same turned on its side. An image
goes to the bucket whose aspect ratio is closest to its own (compared as logarithms, so 2:1
and 1:2 are equally far from 1:1), is resized so it covers the bucket and is centre-cropped
on the one axis that overhangs. Written here because neither diffusers nor kohya's code is a
library to call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LAYOUT_FILE = "layout.json"  # preprocess's resolution and bucket params, beside metadata.csv


@dataclass(frozen=True)
class Placement:
    """How one source image becomes one training image."""

    width: int  # the bucket
    height: int
    resized: tuple[int, int]  # the source resized to cover the bucket (before the crop)
    crop_left: int
    crop_top: int


def make_buckets(resolution: int, step: int, min_side: int, max_side: int
                 ) -> list[tuple[int, int]]:
    """(width, height) of every bucket, sorted by aspect ratio (tall to wide)."""
    area = resolution * resolution
    found = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            found |= {(width, height), (height, width)}
    return sorted(found, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to size's (ties: the larger bucket)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def place(size: tuple[int, int], buckets: list[tuple[int, int]], step: int,
          upscale: bool) -> Placement:
    """Where a source of size (width, height) goes. upscale=False (kohya's
    bucket_no_upscale): an image that would have to be enlarged to cover its bucket gets a
    bucket of its own size instead, rounded down to multiples of step."""
    width, height = size
    bw, bh = nearest(size, buckets)
    scale = max(bw / width, bh / height)
    if scale > 1 and not upscale:
        bw, bh = max(step, width // step * step), max(step, height // step * step)
        scale = max(bw / width, bh / height)
    resized = (max(bw, round(width * scale)), max(bh, round(height * scale)))
    return Placement(bw, bh, resized, (resized[0] - bw) // 2, (resized[1] - bh) // 2)


def square(size: tuple[int, int], resolution: int) -> Placement:
    """The square centre crop (preprocess.buckets: false), in the same terms."""
    width, height = size
    scale = resolution / min(width, height)
    resized = (round(width * scale), round(height * scale))
    return Placement(resolution, resolution, resized, round((width * scale - resolution) / 2),
                     round((height * scale - resolution) / 2))
