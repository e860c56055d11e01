"""encode, image task: VAE latents of every processed image and the family's text
conditioning, cached so sweeps skip that work."""

from __future__ import annotations


def run(params, args) -> int:
    from lorapipe.diffusion.cache import encode_dataset, save_cache
    from lorapipe.diffusion.models import load_base

    base = load_base(params.model.base, params.model.config)
    cache = encode_dataset(base.pipe, args.images, params.encode.batch_size, base.family)
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
        print(f"encode: warning: the caption of {name} is longer than a text encoder's "
              "token limit (CLIP: 77; Flux's T5: 512 dev, 256 schnell) and was cut")
    return 0
