"""encode: cache VAE latents and text-encoder states of every processed image; task_type
llm: the token ids and loss masks of every example.

    python -m stages.encode --images data/processed --out data/cache
"""

from __future__ import annotations

import argparse

from lorapipe.cli import run_stage
from lorapipe.params import load_params


def encode_llm(params, args) -> int:
    """task_type llm: token ids and loss masks of every example, by model.base's tokenizer
    and chat template."""
    from lorapipe.llm.data import encode_examples, read_processed, save_token_cache
    from lorapipe.llm.models import load_tokenizer

    tokenizer = load_tokenizer(params.model.base)
    cache = encode_examples(read_processed(args.images), tokenizer, params.llm, params.model.base)
    path = save_token_cache(cache, args.out)
    lengths = (cache.offsets[1:] - cache.offsets[:-1]).tolist()
    print(f"encode: {len(cache)} examples -> {path} ({len(cache.ids)} tokens, "
          f"{int(cache.trained.sum())} trained; longest {max(lengths)} of llm.max_length "
          f"{params.llm.max_length})" + (f"; {cache.meta['truncated']} truncated"
                                         if cache.meta["truncated"] else ""))
    return 0


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.encode", description=__doc__)
    parser.add_argument("--images", required=True, help="preprocessed images + metadata.csv")
    parser.add_argument("--out", required=True, help="folder for the cache file")
    args = parser.parse_args(argv)
    params = load_params()  # checked before the heavy imports below
    if params.task_type == "llm":
        return encode_llm(params, args)

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
    run_stage("encode", main, warm_start=True)
