"""Saved LoRAs: both files, loaded the way users load them, reproduce the trained UNet;
continuing from a LoRA starts exactly where it ended."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import WEBUI_FILE, train_in
from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import lora
from lorapipe.diffusion.families.sd import build_tiny_sd


@pytest.fixture(scope="module")
def trained(tmp_path_factory, example_cache):
    """A LoRA with alpha != rank, so a reload at the wrong scale would show."""
    root = tmp_path_factory.mktemp("trained")
    result = train_in(root, example_cache, lora__rank=4, lora__alpha=8, train__max_steps=30,
                      train__learning_rate=5e-3)
    return root, result


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    text = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        return unet.eval()(x, torch.tensor([100, 700]), text).sample


@pytest.mark.parametrize("source", ["folder", "webui"])
def test_saved_lora_reloads_in_a_fresh_diffusers_pipeline(trained, source):
    root, result = trained
    expected = unet_output(result.models["unet"])
    base = unet_output(build_tiny_sd().unet)
    assert (expected - base).abs().max() > 1e-3  # the LoRA does change the output

    pipe = build_tiny_sd()
    target = root / "lora" if source == "folder" else root / "lora" / WEBUI_FILE
    pipe.load_lora_weights(str(target))
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-5, atol=1e-5)
    image = pipe("a red circle, lpstyle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_webui_file_is_kohya_layout_with_real_alpha_and_metadata(trained):
    root, _ = trained
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys)
    assert any(k.endswith(".lora_up.weight") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert alpha.item() == 8.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_sd_model_name"] == "builtin:tiny-sd"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_steps"] == "30"
    assert meta["ss_num_train_images"] == "16" and meta["ss_seed"] == "42"  # 4 held out
    # lora.targets attn in kohya's network_args: what its default network adds, excluded
    assert json.loads(meta["ss_network_args"]) == {
        "exclude_patterns": "['.*(proj_in|proj_out|ff[._]net|mlp[._]fc).*']"}


def test_webui_metadata_as_a1111_and_kohya_read_it(trained, tmp_path, example_cache,
                                                    monkeypatch):
    """Field names, types and spellings A1111's metadata view, its SD-version check and
    the additional-networks hash check depend on."""
    import hashlib

    root, _ = trained
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    # A1111: the alias, and the SD version from ss_base_model_version / ss_v2 == "True"
    assert meta["ss_output_name"] == "lorapipe" and meta["modelspec.title"] == "lorapipe"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_v_parameterization"] == "False"
    assert meta["ss_gradient_checkpointing"] == "False"  # Python's spelling, as kohya's
    # per dataset folder (data.dir's name), as kohya counts them
    folder = "example"
    tags = json.loads(meta["ss_tag_frequency"])[folder]
    assert tags["lpstyle"] == 16 and sum(tags.values()) == 32  # "<shape>, lpstyle" x 16
    assert json.loads(meta["ss_dataset_dirs"]) == {folder: {"n_repeats": 1, "img_count": 16}}
    # the model spec
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == "epsilon"
    # no clock: no times unless SOURCE_DATE_EPOCH says which
    assert "ss_training_started_at" not in meta and "modelspec.date" not in meta
    # the hashes the additional-networks extension recomputes from the file itself
    data = (root / "lora" / WEBUI_FILE).read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]

    # a name, a reproducible date, and a v-prediction SD 2.x base are all recorded
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    train_in(tmp_path, example_cache, lora__name="my_style", train__max_steps=2)
    with safe_open(str(tmp_path / "lora/my_style.safetensors"), "pt") as f:
        named = f.metadata()
    assert named["ss_output_name"] == "my_style"
    assert named["ss_training_started_at"] == named["ss_training_finished_at"] == "1700000000.0"
    assert named["modelspec.date"] == "2023-11-14T22:13:20+00:00"


def test_base_version_from_the_actual_base():
    from lorapipe.diffusion.families.sd import base_version

    assert base_version(768, "epsilon")["version"] == "sd_v1"
    sd2 = base_version(1024, "v_prediction")
    assert sd2["v2"] and sd2["v_pred"] and sd2["version"] == "sd_v2"
    assert sd2["architecture"] == "stable-diffusion-v2-768-v"
    assert base_version(1024, "epsilon")["architecture"] == "stable-diffusion-v2-512"


def test_diffusers_file_carries_the_adapter_config(trained):
    root, _ = trained
    with safe_open(str(root / "lora" / lora.DIFFUSERS_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8


@pytest.mark.parametrize("source", ["folder", "webui"])
def test_continue_training_starts_from_the_lora(tmp_path, trained, example_cache, source):
    root, result = trained
    init = root / "lora" if source == "folder" else root / "lora" / WEBUI_FILE
    # alpha 4 here, 8 in the file: the up weights are rescaled to keep the same function
    cont = train_in(tmp_path, example_cache, lora__rank=4, lora__alpha=4,
                    lora__init=str(init), train__max_steps=1, train__learning_rate=1e-12)
    torch.testing.assert_close(unet_output(cont.models["unet"]), unet_output(result.models["unet"]),
                               rtol=1e-4, atol=1e-5)


def test_continue_with_another_rank_is_a_clear_error(tmp_path, trained, example_cache):
    root, _ = trained
    with pytest.raises(LorapipeError, match="has rank 4 but lora.rank is 8; set lora.rank: 4"):
        train_in(tmp_path, example_cache, lora__rank=8, lora__init=str(root / "lora"))


def test_continue_with_other_targets_is_a_clear_error(tmp_path, trained, example_cache):
    root, _ = trained
    with pytest.raises(LorapipeError, match="trained on other layers than lora.targets"):
        train_in(tmp_path, example_cache, lora__targets=["to_q", "to_v"],
                 lora__init=str(root / "lora" / WEBUI_FILE))


def test_targets_matching_nothing_is_a_clear_error(tmp_path, example_cache):
    with pytest.raises(LorapipeError, match="match no UNet layer"):
        train_in(tmp_path, example_cache, lora__targets=["no_such_layer"])
