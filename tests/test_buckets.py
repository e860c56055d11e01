"""Aspect-ratio buckets (preprocess.buckets): the bucket set, where an image goes, the
preprocess and validate stages, the cache of several latent shapes, and training on
single-bucket batches (the trace of every batch), for both model families."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import SDXL, make_params, rgb_image, train_in, write_csv
from lorapipe.core.evaluation import holdout
from lorapipe.diffusion import buckets
from lorapipe.diffusion.cache import load_cache
from stages import preprocess as preprocess_stage
from stages import validate as validate_stage

STEP = 16
SET = buckets.make_buckets(64, STEP, 32, 128)


def test_bucket_set_keeps_the_area_budget_and_the_step():
    assert (64, 64) in SET and len(SET) >= 7
    for w, h in SET:
        assert w * h <= 64 * 64 and w % STEP == 0 and h % STEP == 0
        assert 32 <= min(w, h) and max(w, h) <= 128 and (h, w) in SET  # both orientations
    # SDXL at 1024 px with kohya's 64 px steps and sides up to 2048: its usual buckets
    big = buckets.make_buckets(1024, 64, 256, 2048)
    assert (1024, 1024) in big and (832, 1216) in big and (1216, 832) in big


@pytest.mark.parametrize("size", [(192, 192), (224, 160), (160, 224), (256, 192), (300, 100),
                                  (1000, 997), (640, 480), (480, 1000)])
def test_an_image_is_cropped_by_less_than_a_step_on_one_axis(size):
    p = buckets.place(size, SET, STEP, upscale=True)
    assert (p.width, p.height) == buckets.nearest(size, SET)
    # resized to cover the bucket: one axis exact, the other cut by less than a step
    cut_w, cut_h = p.resized[0] - p.width, p.resized[1] - p.height
    assert min(cut_w, cut_h) == 0 and 0 <= max(cut_w, cut_h) < 2 * STEP
    assert math.isclose(p.resized[0] / size[0], p.resized[1] / size[1], rel_tol=0.03)
    # no bucket in the set is closer in aspect ratio
    ratio = math.log(size[0] / size[1])
    assert all(abs(math.log(w / h) - ratio) >= abs(math.log(p.width / p.height) - ratio)
               for w, h in SET)


def test_no_upscale_gives_a_small_image_a_bucket_of_its_own_size():
    p = buckets.place((40, 70), SET, STEP, upscale=False)  # its nearest bucket is 48x80
    assert (p.width, p.height) == (32, 64)  # its sides rounded down to the step
    assert p.resized[0] <= 40 and p.resized[1] <= 70  # never enlarged
    assert buckets.place((40, 70), SET, STEP, upscale=True).resized[0] > 40


@pytest.fixture
def mixed(tmp_path):
    """Portraits, landscapes and squares of mixed sizes, one odd panorama."""
    images = tmp_path / "images"
    images.mkdir()
    sizes = {"p1.png": (120, 180), "p2.jpg": (200, 310), "l1.png": (180, 120),
             "l2.jpg": (330, 210), "s1.png": (150, 150), "s2.jpg": (260, 250),
             "pano.png": (400, 100)}
    for name, size in sizes.items():
        rgb_image(images / name, size=size)
    write_csv(images / "metadata.csv", [[n, f"caption {n}"] for n in sizes])
    return images, sizes


def _run(tmp_path, images, monkeypatch, **overrides):
    make_params(tmp_path, data__dir=str(images), preprocess__buckets=True,
                preprocess__bucket_step=STEP, preprocess__min_side=32,
                preprocess__max_side=128, preprocess__resolution=64, validate__min_side=64,
                **overrides)
    monkeypatch.chdir(tmp_path)
    assert validate_stage.main(["--images", str(images), "--report", "validation.json",
                                "--usable", "usable.csv"]) == 0
    assert preprocess_stage.main(["--images", str(images), "--usable", "usable.csv",
                                  "--out", "processed"]) == 0
    with open(tmp_path / "processed/metadata.csv", encoding="utf-8") as f:
        return json.loads((tmp_path / "validation.json").read_text()), list(csv.DictReader(f))


def test_validate_reports_buckets_and_preprocess_fills_them(tmp_path, mixed, monkeypatch):
    images, sizes = mixed
    report, rows = _run(tmp_path, images, monkeypatch)
    landed = {r["source"]: (int(r["width"]), int(r["height"])) for r in rows}
    assert len(set(landed.values())) >= 3  # portrait, landscape and square buckets
    # validate predicted exactly where preprocess put every image
    counts = {}
    for size in landed.values():
        counts[f"{size[0]}x{size[1]}"] = counts.get(f"{size[0]}x{size[1]}", 0) + 1
    assert report["buckets"] == dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    lonely = [f for f in report["findings"] if f["code"] == "SINGLE_IMAGE_BUCKET"]
    assert [f["file"] for f in lonely] == ["pano.png"]  # 4:1: a bucket of its own
    for r in rows:
        w, h = landed[r["source"]]
        with Image.open(tmp_path / "processed" / r["file_name"]) as im:
            assert im.size == (w, h)
        ow, oh = sizes[r["source"]]
        assert (int(r["original_width"]), int(r["original_height"])) == (ow, oh)
        # aspect ratio kept within one bucket step: the crop is under one step
        scale = max(w / ow, h / oh)
        assert round(ow * scale) - w < STEP and round(oh * scale) - h < STEP
        assert int(r["crop_left"]) == (round(ow * scale) - w) // 2
        assert int(r["crop_top"]) == (round(oh * scale) - h) // 2


def test_bucketed_preprocess_is_byte_identical_for_any_worker_count(tmp_path, mixed,
                                                                    monkeypatch):
    from conftest import tree_digest

    images, _ = mixed
    _run(tmp_path, images, monkeypatch, preprocess__workers=1)
    serial = tree_digest(tmp_path / "processed")
    _run(tmp_path, images, monkeypatch, preprocess__workers=0)
    assert tree_digest(tmp_path / "processed") == serial


def test_the_cache_holds_one_tensor_per_size(bucketed_cache, example_processed_buckets):
    cache = load_cache(bucketed_cache)
    assert cache.latents.histogram() == {"80x48": 10, "48x80": 5, "64x64": 5}
    with open(example_processed_buckets / "metadata.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        latent = cache.latents[[i]]
        assert latent.shape == (1, 4, int(r["height"]) // 8, int(r["width"]) // 8)
    assert 0.8 < cache.latents.std().item() < 1.25
    with pytest.raises(ValueError, match="spans buckets"):
        cache.latents[[0, 1]]  # a square and a landscape


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_every_batch_comes_from_one_bucket(tmp_path, family, request, monkeypatch):
    cache_dir = request.getfixturevalue("bucketed_cache" if family == "sd"
                                        else "bucketed_cache_sdxl")
    cache = load_cache(cache_dir)
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv("LORAPIPE_TRACE_BATCHES", str(trace))
    result = train_in(tmp_path, cache_dir, train__max_steps=12, train__batch_size=3,
                      **(SDXL if family == "sdxl" else {}))
    batches = [json.loads(line)["images"] for line in
               (trace / "rank0.jsonl").read_text().splitlines()]
    assert len(batches) == 12 and all(len(b) == 3 for b in batches)
    for batch in batches:
        assert len({cache.latents.bucket(i) for i in batch}) == 1, batch
    assert len({cache.latents.bucket(b[0]) for b in batches}) == 3  # every bucket visited
    assert np.isfinite(result.summary["loss"]["val"])  # validation across buckets
    assert "train: 3 buckets (training images per size): 80x48:" in (tmp_path / "logs/train.log"
                                                             ).read_text()
    if family == "sdxl":  # micro-conditioning: the bucket is the target size
        w, h = map(int, cache.latents.bucket(batches[0][0]).split("x"))
        assert cache.cond["time_ids"][batches[0][0]][4:].tolist() == [h, w]


def test_webui_file_records_the_buckets(tmp_path, bucketed_cache):
    from safetensors import safe_open

    train_in(tmp_path, bucketed_cache, train__max_steps=2)
    with safe_open(str(tmp_path / "lora/lorapipe.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_enable_bucket"] == "True" and meta["ss_resolution"] == "(64, 64)"
    info = json.loads(meta["ss_bucket_info"])["buckets"]
    cache = load_cache(bucketed_cache)
    train, _ = holdout(cache.files, 0.2)  # the params' split: the training images only
    expected = {}
    for i in train:
        w, h = map(int, cache.latents.bucket(i).split("x"))
        expected[(w, h)] = expected.get((w, h), 0) + 1
    assert {tuple(b["resolution"]): b["count"] for b in info.values()} == expected
    assert sum(expected.values()) == 16
