"""Benchmark the preprocess stage: images/s on large JPEGs, 1 worker vs all cores,
against a plain single-process PIL loop doing the same work.

    python bench/preprocess.py [--count 200] [--size 2048x1536] [--resolution 512]

Prints a table and writes bench/results/preprocess.json. The generated JPEGs are kept in
bench/.data/ (git-ignored) so a rerun skips making them.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

from lorapipe.core.parallel import cpu_count, map_progress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

from lorapipe.diffusion.stages.preprocess import output_names, process_one  # noqa: E402

HERE = Path(__file__).parent


def make_jpeg(folder: Path, size: tuple[int, int], i: int) -> str:
    """A photo-like JPEG: smooth colour fields plus fine grain, so it compresses like one."""
    rng = np.random.default_rng(i)
    base = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    im = base.resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (size[1], size[0], 1))
    arr = np.clip(np.asarray(im, np.float32) + grain, 0, 255).astype(np.uint8)
    name = f"photo_{i:04d}.jpg"
    Image.fromarray(arr).save(folder / name, quality=90)
    return name


def ensure_jpegs(count: int, size: tuple[int, int]) -> tuple[Path, list[str]]:
    folder = HERE / ".data" / f"jpeg_{size[0]}x{size[1]}"
    names = [f"photo_{i:04d}.jpg" for i in range(count)]
    if not all((folder / n).exists() for n in names):
        folder.mkdir(parents=True, exist_ok=True)
        map_progress(partial(make_jpeg, folder, size), list(range(count)), 0, desc="make jpegs")
    return folder, names


def plain_pil(src: Path, dst: Path, resolution: int) -> None:
    """What one would write without thinking about speed: full decode, then fit."""
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        ImageOps.fit(im, (resolution, resolution), Image.Resampling.LANCZOS).save(dst, "PNG")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", default="2048x1536")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", default=str(HERE / "results" / "preprocess.json"))
    args = parser.parse_args()
    size = tuple(int(x) for x in args.size.split("x"))
    folder, names = ensure_jpegs(args.count, size)
    jobs = list(zip(names, output_names(names), strict=True))
    cores = cpu_count()
    out = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))

    def lorapipe_run(workers: int) -> None:
        job = partial(process_one, str(folder), str(out), args.resolution)
        map_progress(job, jobs, workers, desc=f"lorapipe x{workers}")

    def plain_run() -> None:
        for src, dst in jobs:
            plain_pil(folder / src, out / dst, args.resolution)

    try:
        timed(lambda: lorapipe_run(1))  # warm the page cache so every run reads from memory
        runs = {
            "plain PIL loop, 1 process": (1, timed(plain_run)),
            "lorapipe, 1 worker": (1, timed(lambda: lorapipe_run(1))),
            f"lorapipe, {cores} workers": (cores, timed(lambda: lorapipe_run(cores))),
        }
    finally:
        shutil.rmtree(out)

    one = args.count / runs["lorapipe, 1 worker"][1]
    plain = args.count / runs["plain PIL loop, 1 process"][1]
    rows = []
    for name, (workers, seconds) in runs.items():
        rate = args.count / seconds
        rows.append({"run": name, "workers": workers, "seconds": round(seconds, 2),
                     "images_per_s": round(rate, 1), "per_core": round(rate / workers, 1),
                     "vs_lorapipe_1_worker": round(rate / one, 2),
                     "vs_plain_loop": round(rate / plain, 2)})
    result = {
        "benchmark": "preprocess",
        "images": args.count, "source_size": list(size), "resolution": args.resolution,
        "cores": cores, "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "pillow": PIL.__version__,
        "rows": rows,
    }
    report.table(
        f"{args.count} JPEGs {size[0]}x{size[1]} -> {args.resolution}px PNG, {cores} cores, "
        f"Pillow {PIL.__version__}",
        [("run", "run", "<28"), ("s", "seconds", ">7"), ("img/s", "images_per_s", ">7"),
         ("per core", "per_core", ">9"), ("vs 1 worker", "vs_lorapipe_1_worker", ">11"),
         ("vs plain", "vs_plain_loop", ">8")], rows)
    report.write(args.out, result)


if __name__ == "__main__":
    main()
