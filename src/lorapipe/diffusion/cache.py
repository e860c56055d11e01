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
from safetensors.torch import save_file
from tqdm import tqdm

from lorapipe.core import outputs
from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import buckets as buckets_module
from lorapipe.diffusion import families

CACHE_FILE = "latents.safetensors"


class Latents:
    """The cached latents: one tensor per bucket (image size), and where each image is.

    Images of one size are stacked in one tensor in file order; a square dataset has one.
    Indexing takes image indices that all lie in one bucket (every batch does: the train
    plan draws single-bucket batches) and returns their stacked latents."""

    def __init__(self, buckets: dict[str, torch.Tensor], where: list[tuple[str, int]]):
        self.buckets, self.where = buckets, where

    @classmethod
    def single(cls, latents: torch.Tensor) -> Latents:
        name = f"{latents.shape[-1] * 8}x{latents.shape[-2] * 8}"
        return cls({name: latents}, [(name, i) for i in range(len(latents))])

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        names = {self.where[i][0] for i in idx}
        if len(names) != 1:
            raise ValueError(f"a batch spans buckets {sorted(names)}")
        return self.buckets[names.pop()][[self.where[i][1] for i in idx]]

    def bucket(self, i: int) -> str:
        return self.where[i][0]

    def groups(self, idx: list[int]) -> list[list[int]]:
        """idx split by bucket (buckets in name order, images in the given order)."""
        by: dict[str, list[int]] = {}
        for i in idx:
            by.setdefault(self.where[i][0], []).append(i)
        return [by[name] for name in sorted(by)]

    def to(self, device) -> Latents:
        return Latents({k: v.to(device) for k, v in self.buckets.items()}, self.where)

    @property
    def tensor(self) -> torch.Tensor:
        """All latents as one tensor (a dataset of one size only)."""
        if len(self.buckets) != 1:
            raise ValueError(f"{len(self.buckets)} buckets: the latents are not one tensor")
        return next(iter(self.buckets.values()))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def std(self) -> torch.Tensor:
        return torch.cat([t.flatten() for t in self.buckets.values()]).std()

    def histogram(self) -> dict[str, int]:
        """Images per bucket ('WxH'), largest count first."""
        counts: dict[str, int] = {}
        for name, _ in self.where:
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class Cache:
    latents: Latents  # already multiplied by the VAE scaling factor
    # the family's conditioning (families.Family.cond_keys): SD's text_states [N, 77, D];
    # SDXL's text_states [N, 77, D1+D2], pooled [N, P] and time_ids [N, 6]
    cond: dict[str, torch.Tensor]
    # the captions' token ids per text encoder ([N, 77] each): what a text-encoder LoRA
    # encodes per step (families.Family.encode_tokens)
    tokens: dict[str, torch.Tensor]
    files: list[str]
    captions: list[str]
    meta: dict

    def subset(self, n: int) -> Cache:
        """The first n images (a dataset of one size)."""
        return Cache(Latents.single(self.latents.tensor[:n]),
                     {k: v[:n] for k, v in self.cond.items()},
                     {k: v[:n] for k, v in self.tokens.items()}, self.files[:n],
                     self.captions[:n], dict(self.meta))


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
def encode_dataset(pipe, folder: str | Path, batch_size: int,
                   family: families.Family | None = None) -> Cache:
    """Latents of every image (in batches of one size) and the family's conditioning (in
    batches in file order). family: the base's (models.load_base), else looked up from the
    pipeline's class."""
    folder = Path(folder)
    family = family or families.of_pipeline(pipe)
    rows = read_processed(folder)
    files = [r["file_name"] for r in rows]
    captions = [r["text"] for r in rows]
    vae = pipe.vae.eval()
    by_size: dict[str, list[int]] = {}
    m = family.size_multiple
    for i, name in enumerate(files):
        with Image.open(folder / name) as im:
            if im.width % m or im.height % m:
                raise LorapipeError(
                    f"{folder / name} is {im.width}x{im.height} px: {family.title} needs "
                    f"image sides that are multiples of {m}; set preprocess.resolution and "
                    f"preprocess.bucket_step to multiples of {m}")
            by_size.setdefault(f"{im.width}x{im.height}", []).append(i)
    buckets, where = {}, [("", 0)] * len(files)
    bar = tqdm(total=2 * len(rows), desc="encode", unit="img", dynamic_ncols=True)
    with bar:
        for size in sorted(by_size):
            members, chunks = by_size[size], []
            for start in range(0, len(members), batch_size):
                names = [files[i] for i in members[start:start + batch_size]]
                pixels = torch.stack([image_tensor(folder / name) for name in names])
                z = family.encode_latents(vae, pixels)
                for name, latent in zip(names, z, strict=True):
                    if not torch.isfinite(latent).all():
                        raise LorapipeError(
                            f"{name}: the VAE gave non-finite latents; check the image, or "
                            "the base model's VAE (fp16 SD VAEs overflow: use an fp32 VAE)")
                chunks.append(z.float())
                bar.update(len(names))
            buckets[size] = torch.cat(chunks)
            for row, i in enumerate(members):
                where[i] = (size, row)
        conds, tokens, truncated = [], [], []
        for start in range(0, len(rows), batch_size):
            cond, ids, cut = family.encode_text(pipe, captions[start:start + batch_size])
            truncated += [files[start + i] for i in cut]
            conds.append(cond)
            tokens.append(ids)
            bar.update(min(batch_size, len(rows) - start))
    cond = {k: _cat_padded([c[k] for c in conds]) for k in conds[0]}
    cond.update(family.image_conditioning(rows))
    latents = Latents(buckets, where)
    common = next(iter(latents.histogram()))  # the most frequent size: samples use it
    width, height = map(int, common.split("x"))
    layout = folder / buckets_module.LAYOUT_FILE
    meta = {**family.latent_meta(vae.config), "image_size": [height, width], "truncated": truncated,
            "family": family.name, "buckets": latents.histogram(),
            "layout": json.loads(layout.read_text()) if layout.exists() else {},
            # each image's file in data.dir, as metadata.csv names it: the reports name it
            "sources": [r.get("source") or r["file_name"] for r in rows]}
    return Cache(latents, cond, {k: torch.cat([t[k] for t in tokens]) for k in tokens[0]},
                 files, captions, meta)


def _cat_padded(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Batches of one conditioning tensor in one, the sequences zero-padded at the end to the
    longest: a family whose text conditioning is as long as its batch's longest caption
    (Qwen-Image, whose pipeline pads so) masks the padding, which zeros are, as its pipeline
    pads them."""
    if chunks[0].dim() < 2:
        return torch.cat(chunks)
    longest = max(c.shape[1] for c in chunks)
    # F.pad's pairs run from the last dimension: none for those after the sequence's
    return torch.cat([torch.nn.functional.pad(c, (0, 0) * (c.dim() - 2) + (0, longest - c.shape[1]))
                      for c in chunks])


TOKENS = "tokens."  # the key prefix of the token ids in the cache file


def save_cache(cache: Cache, folder: str | Path, base: str) -> Path:
    path = Path(folder) / CACHE_FILE
    metadata = {
        "files": json.dumps(cache.files, ensure_ascii=False),
        "captions": json.dumps(cache.captions, ensure_ascii=False),
        "base": base,
        "meta": json.dumps(cache.meta),
    }
    latents = cache.latents
    if len(latents.buckets) == 1:
        tensors = {"latents": latents.tensor.contiguous()}
    else:  # one tensor per size; metadata["bucket_of"] says where each image is
        tensors = {f"latents.{k}": v.contiguous() for k, v in latents.buckets.items()}
        metadata["bucket_of"] = json.dumps([name for name, _ in latents.where])
    tensors.update({k: v.contiguous() for k, v in cache.cond.items()})
    tensors.update({TOKENS + k: v.contiguous() for k, v in cache.tokens.items()})
    with outputs.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        outputs.canonical_safetensors(tmp)  # same content, same bytes: DVC sees no change
    return path


def load_cache(folder: str | Path) -> Cache:
    path = Path(folder) / CACHE_FILE
    tensors, meta = outputs.read_safetensors(path, "run the encode stage first")
    if "latents" in tensors:
        latents = Latents.single(tensors.pop("latents"))
    else:
        buckets = {k.removeprefix("latents."): tensors.pop(k) for k in list(tensors)
                   if k.startswith("latents.")}
        seen: dict[str, int] = {}
        where = []
        for name in json.loads(meta["bucket_of"]):
            where.append((name, seen.get(name, 0)))
            seen[name] = seen.get(name, 0) + 1
        latents = Latents(buckets, where)
    tokens = {k.removeprefix(TOKENS): tensors.pop(k) for k in list(tensors)
              if k.startswith(TOKENS)}
    if not tokens:
        raise LorapipeError(f"{path} holds no token ids (an older lorapipe wrote it); rerun "
                            "the encode stage: dvc repro -f encode")
    return Cache(latents, tensors, tokens, json.loads(meta["files"]), json.loads(meta["captions"]),
                 {**json.loads(meta["meta"]), "base": meta["base"]})
