"""Base models: the builtin tiny SD is fixed and offline; other sources load or are refused
with a message that says what to do."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO
from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion.cache import load_cache
from lorapipe.diffusion.families.sd import build_tiny_sd
from lorapipe.diffusion.families.tiny import tiny_tokenizer
from lorapipe.diffusion.models import load_pipeline, training_scheduler

FINGERPRINT = """
import json
from lorapipe.diffusion.families.sd import build_tiny_sd
pipe = build_tiny_sd()
out = {}
for part in ("unet", "vae", "text_encoder"):
    sd = pipe.__getattribute__(part).state_dict()
    out[part] = [len(sd), sum(t.numel() for t in sd.values()),
                 sum(float(t.double().pow(2).sum()) for t in sd.values()),
                 sum(float(t.double().abs().sum()) for t in sd.values())]
out["vocab"] = sorted(pipe.tokenizer.get_vocab().items())
out["ids"] = pipe.tokenizer("a red circle, lpstyle").input_ids
print(json.dumps(out))
"""

# The builtin model as built on this project's machines (torch 2.13, CPU): tensor count,
# parameter count, sum of squares and sum of absolute values of every weight. Sums with a
# relative tolerance of 1e-6 catch any change of architecture, seed or initialisation, and
# survive the last-bit differences of RNG transforms between CPU models.
PINNED = {
    "unet": [208, 792964, 3329.6357973919125, 27947.101876857763],
    "vae": [180, 261079, 1399.1257021513634, 9707.078439203753],
    "text_encoder": [36, 46720, 377.1920284998227, 2041.5252939031088],
}
PINNED_VOCAB_SHA256 = "798b493596b9ed80f6e7c721dce55c8963b2fd90053363b0c33d5c8ba5c9fade"


def fingerprint_here() -> dict:
    out = subprocess.run([sys.executable, "-c", FINGERPRINT], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_builtin_model_is_identical_every_time_and_pinned():
    a, b = fingerprint_here(), fingerprint_here()
    assert a == b  # two processes, different hash seeds: the same weights and tokenizer
    for part, (tensors, params, squares, absolute) in PINNED.items():
        assert a[part][:2] == [tensors, params], part
        assert a[part][2:] == pytest.approx([squares, absolute], rel=1e-6), part
    vocab = repr(sorted(tuple(item) for item in a["vocab"])).encode()
    assert hashlib.sha256(vocab).hexdigest() == PINNED_VOCAB_SHA256
    assert a["ids"] == [845, 320, 615, 670, 267, 586, 585, 846]


def test_builtin_tokenizer_is_a_real_clip_bpe():
    tok = tiny_tokenizer()
    ids = tok("a red circle, lpstyle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    tokens = tok.convert_ids_to_tokens(ids[:8])
    assert tokens[:5] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", ",</w>"]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle , lpstyle"
    unknown = tok("zebra").input_ids  # unknown words fall back to characters, never fail
    assert len(unknown) > 3


def test_offline_switches_are_set():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_latents_have_unit_variance_on_the_example_data(example_cache):
    cache = load_cache(example_cache)
    assert 0.8 < cache.latents.std().item() < 1.25
    assert cache.latents.shape == (20, 4, 8, 8) and cache.cond["text_states"].shape == (20, 77, 32)
    assert cache.files[0] == "00_red_circle.png"


def test_local_diffusers_folder_loads(tmp_path):
    pipe = build_tiny_sd()
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline("sd", root=tmp_path)
    for a, b in zip(pipe.unet.state_dict().values(), loaded.unet.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert training_scheduler(loaded).config.prediction_type == "epsilon"


def test_v_prediction_folder(tmp_path):
    build_tiny_sd().save_pretrained(tmp_path / "sd2")
    config_path = tmp_path / "sd2/scheduler/scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    assert training_scheduler(load_pipeline("sd2", root=tmp_path)).config.prediction_type == \
        "v_prediction"


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(LorapipeError, match="not a diffusers model .no model_index.json"):
        load_pipeline("weights", root=tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    (tmp_path / f"model{suffix}").write_bytes(b"not even read")
    with pytest.raises(LorapipeError, match="pickle checkpoint.*Convert it once"):
        load_pipeline(f"model{suffix}", root=tmp_path)


def test_unrecognised_checkpoint(tmp_path):
    save_file({"some.weight": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(LorapipeError, match="holds no Stable Diffusion UNet.*a LoRA or a VAE"):
        load_pipeline("odd.safetensors", root=tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(LorapipeError, match="does not exist"):
        load_pipeline("nowhere", root=tmp_path)


def test_repository_default_is_the_builtin_model():
    from lorapipe.tasks import load_params

    assert load_params(REPO / "params.yaml").model.base == "builtin:tiny-sd"


def test_encode_cache_is_byte_reproducible(tmp_path, example_cache):
    """The safetensors writer orders its header from a hash map; the cache must come out the
    same bytes every time, or DVC sees a changed cache and reruns train."""
    from lorapipe.diffusion.cache import CACHE_FILE, save_cache

    cache = load_cache(example_cache)
    meta = {k: v for k, v in cache.meta.items() if k != "base"}
    cache.meta = meta
    saved = set()
    for i in range(6):
        save_cache(cache, tmp_path / str(i), "builtin:tiny-sd")
        saved.add((tmp_path / str(i) / CACHE_FILE).read_bytes())
    assert len(saved) == 1
    assert saved == {(example_cache / CACHE_FILE).read_bytes()}
