"""The encode cache: VAE latents and the family's conditioning for every processed image.

Encoding is the same for every LoRA experiment on one base model, so it is done once and
sweeps over lora.* and train.* read this file instead of running the VAE and text encoder.
One safetensors file holds everything; its metadata names the images and the base.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lorapipe import families, outputs
from lorapipe.errors import LorapipeError

CACHE_FILE = "latents.safetensors"


@dataclass
class Cache:
    latents: torch.Tensor  # [N, 4, H/8, W/8], already multiplied by the VAE scaling factor
    # the family's conditioning (families.Family.cond_keys): SD's text_states [N, 77, D];
    # SDXL's text_states [N, 77, D1+D2], pooled [N, P] and time_ids [N, 6]
    cond: dict[str, torch.Tensor]
    files: list[str]
    captions: list[str]
    meta: dict


def read_processed(folder: str | Path) -> list[dict[str, str]]:
    """data/processed/metadata.csv's rows (file_name, text, sizes and crops)."""
    path = Path(folder) / "metadata.csv"
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise LorapipeError(f"{path} not found; run the preprocess stage first") from None
    if not rows:
        raise LorapipeError(f"{path} lists no images")
    return rows


_PIXELS = VaeImageProcessor(do_resize=False)  # PIL -> [-1, 1] float tensors, diffusers' way


def image_tensor(path: Path) -> torch.Tensor:
    """An RGB image as a [3, H, W] float tensor in [-1, 1], the VAE's input range."""
    with Image.open(path) as im:
        return _PIXELS.preprocess(im.convert("RGB"))[0]


@torch.no_grad()
def encode_dataset(pipe, folder: str | Path, batch_size: int) -> Cache:
    folder = Path(folder)
    family = families.of_pipeline(pipe)
    rows = read_processed(folder)
    files = [r["file_name"] for r in rows]
    captions = [r["text"] for r in rows]
    vae = pipe.vae.eval()
    scale = vae.config.scaling_factor
    latents, conds, truncated = [], [], []
    size = None
    bar = tqdm(total=len(rows), desc="encode", unit="img", dynamic_ncols=True)
    with bar:
        for start in range(0, len(rows), batch_size):
            names = files[start:start + batch_size]
            pixels = []
            for name in names:
                tensor = image_tensor(folder / name)
                if size is None:
                    size = tensor.shape[1:]
                elif tensor.shape[1:] != size:
                    raise LorapipeError(
                        f"{name} is {tuple(tensor.shape[1:])}, not {tuple(size)} like the "
                        "others; rerun the preprocess stage"
                    )
                pixels.append(tensor)
            # The posterior mean: a random-init VAE has posterior std ~1, so a sample would
            # be mostly noise; for trained VAEs the std is tiny and mean ~ sample.
            z = vae.encode(torch.stack(pixels)).latent_dist.mode() * scale
            for name, latent in zip(names, z, strict=True):
                if not torch.isfinite(latent).all():
                    raise LorapipeError(
                        f"{name}: the VAE gave non-finite latents; check the image, or the "
                        "base model's VAE (fp16 SD VAEs overflow: use an fp32 VAE)"
                    )
            cond, cut = family.encode_text(pipe, captions[start:start + batch_size])
            truncated += [files[start + i] for i in cut]
            latents.append(z.float())
            conds.append(cond)
            bar.update(len(names))
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    cond.update(family.image_conditioning(rows))
    meta = {"scaling_factor": scale, "image_size": list(size), "truncated": truncated,
            "family": family.name}
    return Cache(torch.cat(latents), cond, files, captions, meta)


def save_cache(cache: Cache, folder: str | Path, base: str) -> Path:
    path = Path(folder) / CACHE_FILE
    metadata = {
        "files": json.dumps(cache.files, ensure_ascii=False),
        "captions": json.dumps(cache.captions, ensure_ascii=False),
        "base": base,
        "meta": json.dumps(cache.meta),
    }
    tensors = {"latents": cache.latents.contiguous(),
               **{k: v.contiguous() for k, v in cache.cond.items()}}
    with outputs.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        outputs.canonical_safetensors(tmp)  # same content, same bytes: DVC sees no change
    return path


def load_cache(folder: str | Path) -> Cache:
    path = Path(folder) / CACHE_FILE
    if not path.exists():
        raise LorapipeError(f"{path} not found; run the encode stage first")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    latents = tensors.pop("latents")
    return Cache(latents, tensors, json.loads(meta["files"]), json.loads(meta["captions"]),
                 {**json.loads(meta["meta"]), "base": meta["base"]})
