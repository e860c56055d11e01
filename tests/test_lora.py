"""Saved LoRAs: both files, loaded the way users load them, reproduce the trained UNet;
continuing from a LoRA starts exactly where it ended."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import train_in
from lorapipe import lora
from lorapipe.errors import LorapipeError
from lorapipe.models import build_tiny_sd


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
    expected = unet_output(result.unet)
    base = unet_output(build_tiny_sd().unet)
    assert (expected - base).abs().max() > 1e-3  # the LoRA does change the output

    pipe = build_tiny_sd()
    target = root / "lora" if source == "folder" else root / "lora" / lora.WEBUI_FILE
    pipe.load_lora_weights(str(target))
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-5, atol=1e-5)
    image = pipe("a red circle, lpstyle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_webui_file_is_kohya_layout_with_real_alpha_and_metadata(trained):
    root, _ = trained
    with safe_open(str(root / "lora" / lora.WEBUI_FILE), "pt") as f:
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
    assert json.loads(meta["ss_network_args"]) == {"targets": ["to_q", "to_k", "to_v", "to_out.0"]}


def test_diffusers_file_carries_the_adapter_config(trained):
    root, _ = trained
    with safe_open(str(root / "lora" / lora.DIFFUSERS_FILE), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8


@pytest.mark.parametrize("source", ["folder", "webui"])
def test_continue_training_starts_from_the_lora(tmp_path, trained, example_cache, source):
    root, result = trained
    init = root / "lora" if source == "folder" else root / "lora" / lora.WEBUI_FILE
    # alpha 4 here, 8 in the file: the up weights are rescaled to keep the same function
    cont = train_in(tmp_path, example_cache, lora__rank=4, lora__alpha=4,
                    lora__init=str(init), train__max_steps=1, train__learning_rate=1e-12)
    torch.testing.assert_close(unet_output(cont.unet), unet_output(result.unet),
                               rtol=1e-4, atol=1e-5)


def test_continue_with_another_rank_is_a_clear_error(tmp_path, trained, example_cache):
    root, _ = trained
    with pytest.raises(LorapipeError, match="has rank 4 but lora.rank is 8; set lora.rank: 4"):
        train_in(tmp_path, example_cache, lora__rank=8, lora__init=str(root / "lora"))


def test_continue_with_other_targets_is_a_clear_error(tmp_path, trained, example_cache):
    root, _ = trained
    with pytest.raises(LorapipeError, match="trained on other layers than lora.targets"):
        train_in(tmp_path, example_cache, lora__targets=["to_q", "to_v"],
                 lora__init=str(root / "lora" / lora.WEBUI_FILE))


def test_targets_matching_nothing_is_a_clear_error(tmp_path, example_cache):
    with pytest.raises(LorapipeError, match="match no UNet layer"):
        train_in(tmp_path, example_cache, lora__targets=["no_such_layer"])
