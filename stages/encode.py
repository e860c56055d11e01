"""encode: cache VAE latents and text-encoder states of every processed image.

    python -m stages.encode --images data/processed --out data/cache
"""

from __future__ import annotations

import argparse

from lorapipe.cli import run_stage
from lorapipe.params import load_params


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.encode", description=__doc__)
    parser.add_argument("--images", required=True, help="preprocessed images + metadata.csv")
    parser.add_argument("--out", required=True, help="folder for the cache file")
    args = parser.parse_args(argv)
    params = load_params()  # checked before the heavy imports below

    from lorapipe.cache import encode_dataset, save_cache
    from lorapipe.models import load_pipeline

    pipe = load_pipeline(params.model.base, params.model.config)
    cache = encode_dataset(pipe, args.images, params.encode.batch_size)
    path = save_cache(cache, args.out, params.model.base)
    std = cache.latents.std().item()
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in cache.cond.items())
    sizes = ", ".join(f"{size}: {n}" for size, n in cache.latents.histogram().items())
    print(f"encode: {len(cache.files)} images ({cache.meta['family']}) -> {path} (latents of "
          f"{sizes}, std {std:.3f}; {shapes})")
    if not 0.5 < std < 2.0:
        print(f"encode: warning: latent std {std:.3f} is far from 1; the VAE's scaling_factor "
              "may not suit this data, and the loss will say little about the image")
    for name in cache.meta["truncated"]:
        print(f"encode: warning: the caption of {name} is longer than the text encoder's "
              "77 tokens and was cut")
    return 0


if __name__ == "__main__":
    run_stage("encode", main)
