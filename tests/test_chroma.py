"""Chroma on the builtin tiny Chroma: T5 only with its masks as ChromaPipeline computes
them, training (no text-encoder LoRA), the diffusers file loaded back and sampled with real
guidance, kohya's Flux-layout file against the real Chroma1-HD transformer built without
weights (read back by diffusers' own kohya Flux reader), and single files told apart from
Flux's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_flux import bfl_checkpoint, bfl_shapes

from conftest import CHROMA, WEBUI_FILE, run_dirs, train_in
from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import families, family_list
from lorapipe.diffusion.families import chroma, flux
from lorapipe.diffusion.families.chroma import CHROMA_TRANSFORMER, build_tiny_chroma


def _probe(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = transformer.config
    mask = torch.ones(2, 7 + 16)
    mask[1, 5:7] = 0  # the second caption's text ends earlier
    kw = dict(encoder_hidden_states=torch.randn(2, 7, c.joint_attention_dim, generator=gen),
              timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3),
              txt_ids=torch.zeros(7, 3), attention_mask=mask)
    transformer.eval()
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, 16, 64, generator=gen), **kw).sample


def test_tiny_chroma_encodes_t5_with_its_masks_as_its_pipeline(example_cache_chroma):
    from lorapipe.diffusion.cache import load_cache

    pipe = build_tiny_chroma()
    assert set(pipe.components) >= {"transformer", "text_encoder", "tokenizer", "vae"}
    assert not hasattr(pipe, "text_encoder_2")  # no CLIP
    cache = load_cache(example_cache_chroma)
    assert cache.meta["family"] == "chroma"
    n = len(cache.files)
    assert cache.cond["text_states"].shape == (n, 64, 32)
    assert cache.cond["text_mask"].shape == (n, 64)
    embeds, _, mask, *_ = pipe.encode_prompt(cache.captions[:2], do_classifier_free_guidance=False,
                                             max_sequence_length=64)
    torch.testing.assert_close(cache.cond["text_states"][:2], embeds, atol=1e-6, rtol=0)
    assert torch.equal(cache.cond["text_mask"][:2], mask)
    # the mask keeps the caption's tokens and the first pad, not the rest
    ids = pipe.tokenizer(cache.captions[0]).input_ids
    assert cache.cond["text_mask"][0].sum().item() == len(ids) + 1


@pytest.fixture(scope="module")
def chroma_trained(tmp_path_factory, example_cache_chroma):
    root = tmp_path_factory.mktemp("chroma")
    result = train_in(root, example_cache_chroma, train__max_steps=40, lora__targets="kohya",
                      train__learning_rate=5e-3, **CHROMA)
    return root, result


def test_chroma_trains_and_refuses_a_text_encoder_lora(tmp_path, chroma_trained,
                                                       example_cache_chroma):
    root, result = chroma_trained
    s = result.summary
    assert s["model"]["family"] == "chroma" and s["fixed_loss_end"] < s["fixed_loss_start"]
    assert set(result.models) == {"transformer"}
    with pytest.raises(LorapipeError, match="only text encoder is T5-XXL"):
        train_in(tmp_path, example_cache_chroma, lora__text_encoder=True, **CHROMA)


def test_chroma_lora_loads_back_and_samples_with_real_guidance(chroma_trained):
    from lorapipe.diffusion.sampling import SampleSettings, generate

    root, result = chroma_trained
    trained = _probe(result.models["transformer"])
    pipe = build_tiny_chroma()
    assert not torch.allclose(_probe(pipe.transformer), trained)
    pipe.load_lora_weights(str(root / "lora"))
    assert torch.equal(_probe(pipe.transformer), trained)
    pipe.set_progress_bar_config(disable=True)
    family = families.of_pipeline(pipe)

    def image(lora, scale=1.0, negative=""):
        s = SampleSettings(steps=3, guidance_scale=4.0, negative_prompt=negative, width=64,
                           height=64, lora_scale=scale)
        return np.asarray(generate(pipe, "a red circle, lpstyle", 7, s, lora, family))

    base, lora = image(False), image(True)
    assert (base == image(False)).all() and (base != lora).any()
    assert (image(True, 0.0) == base).all()
    assert (image(True, negative="blurry") != lora).any()  # the negative prompt is used


@pytest.mark.parametrize("preset", ["attn", "kohya"])
def test_webui_names_are_the_real_chroma_modules(preset):
    """Chroma1-HD's transformer on the meta device: every module of the kohya file is a
    Linear of BFL's Flux layout with its shapes (Chroma keeps Flux's blocks; its pruned
    modulations get none), and diffusers' kohya Flux reader gives back exactly the trained
    modules' products."""
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    with torch.device("meta"):
        transformer = ChromaTransformer2DModel(**CHROMA_TRANSFORMER)
    pattern = chroma.FAMILY.targets(preset)["transformer"]
    rank, gen, state = 4, torch.Generator().manual_seed(0), {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, name):
            state[name] = (torch.randn(rank, module.in_features, generator=gen) * 0.1,
                           torch.randn(module.out_features, rank, generator=gen) * 0.1)
    per_block = {"attn": (8, 3), "kohya": (12, 5)}[preset]  # Flux's less the modulations
    assert len(state) == 19 * per_block[0] + 38 * per_block[1]
    tensors = chroma.FAMILY.to_webui(state, float(rank), transformer.config)
    shapes = {k.replace(".", "_"): v for k, v in bfl_shapes(
        {**flux.FLUX_1_DEV_TRANSFORMER, "guidance_embeds": False}).items()}
    modules = {k.removeprefix("lora_unet_").split(".")[0] for k in tensors}
    assert modules <= set(shapes) and not any("_mod" in m for m in modules)
    for module in modules:
        down = tensors[f"lora_unet_{module}.lora_down.weight"]
        up = tensors[f"lora_unet_{module}.lora_up.weight"]
        assert (up.shape[0], down.shape[1]) == shapes[module], module
    back = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    back = {k.removeprefix("transformer."): v for k, v in back.items()}
    got = {k.removesuffix(".lora_A.weight") for k in back if k.endswith(".lora_A.weight")}
    assert set(state) <= got
    for name in sorted(state):
        a, b = back[f"{name}.lora_A.weight"], back[f"{name}.lora_B.weight"]
        a0, b0 = state[name]
        x = torch.randn(a.shape[1], 2, generator=gen)
        assert torch.allclose(b @ (a @ x), b0 @ (a0 @ x), atol=1e-5), name


def test_the_webui_file_holds_the_trained_update_on_bfl_weights(chroma_trained):
    """Every fused module of the tiny run's file is the trained modules' updates stacked in
    BFL's order (as ComfyUI adds it to the BFL weight)."""
    root, result = chroma_trained
    transformer = result.models["transformer"]
    tensors = load_file(root / "lora" / WEBUI_FILE)
    expected: dict[str, dict[int, torch.Tensor]] = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            bfl, part, _ = flux.bfl_module(name)
            expected.setdefault(bfl, {})[part] = (b @ a * module.scaling["default"]).detach()
    assert {f"lora_unet_{k.replace('.', '_')}" for k in expected} == {
        k.split(".")[0] for k in tensors}
    for bfl, members in expected.items():
        key = f"lora_unet_{bfl.replace('.', '_')}"
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        delta = up @ down * (tensors[f"{key}.alpha"].item() / down.shape[0])
        sizes = flux.part_sizes(bfl, transformer.config) if len(members) > 1 else [
            delta.shape[0]]
        for part, want in members.items():
            assert torch.allclose(torch.split(delta, sizes)[part], want, atol=1e-7), bfl


def test_chroma_single_files_are_told_apart_from_flux(tmp_path):
    from lorapipe.diffusion.models import load_base

    c = {**flux.FLUX_1_DEV_TRANSFORMER, "num_attention_heads": 1, "attention_head_dim": 2,
         "in_channels": 4, "joint_attention_dim": 2, "pooled_projection_dim": 2,
         "num_layers": 2, "num_single_layers": 2, "guidance_embeds": False}
    names = {k: torch.zeros(1) for k in bfl_checkpoint(c, "cpu") if "_mod." not in k
             and "modulation" not in k and not k.startswith("vector_in")}
    names[family_list.CHROMA_MARKER] = torch.zeros(1)
    save_file({f"model.diffusion_model.{k}": v for k, v in names.items()},
              str(tmp_path / "Chroma1-HD.safetensors"))
    assert families.detect(tmp_path / "Chroma1-HD.safetensors", "x").name == "chroma"
    del names[family_list.CHROMA_MARKER]
    save_file(names, str(tmp_path / "flux.safetensors"))
    assert families.detect(tmp_path / "flux.safetensors", "x").name == "flux"
    with pytest.raises(LorapipeError, match="set model.config to a diffusers Chroma folder"):
        load_base(str(tmp_path / "Chroma1-HD.safetensors"))


def test_a_saved_chroma_folder_trains(tmp_path, example_processed):
    from lorapipe.diffusion.cache import encode_dataset, save_cache
    from lorapipe.diffusion.models import load_pipeline

    folder, run = run_dirs(tmp_path, "Chroma1-tiny", "run")
    build_tiny_chroma().save_pretrained(folder)
    assert families.detect(folder, str(folder)).name == "chroma"
    save_cache(encode_dataset(load_pipeline(str(folder)), example_processed, batch_size=8),
               tmp_path / "cache", str(folder))
    result = train_in(run, tmp_path / "cache", train__max_steps=4, model__base=str(folder))
    assert result.summary["model"]["family"] == "chroma"


def test_checkpointing_recomputes_each_block_with_the_text_mask():
    """diffusers' own switch drops the mask in checkpointed single blocks; the family's
    checkpointing runs each block twice (forward, then recomputed in backward), with it."""
    pipe = build_tiny_chroma()
    transformer, calls = pipe.transformer, []
    block = transformer.single_transformer_blocks[0]
    original = block.forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attention_mask") is not None)
        return original(*args, **kwargs)

    block.forward = counting
    chroma.FAMILY.enable_gradient_checkpointing(transformer)
    cond = {"text_states": torch.randn(1, 7, 32), "text_mask": torch.ones(1, 7)}
    predict = chroma.FAMILY.predictor(transformer, cond)
    predict(torch.randn(1, 16, 8, 8), torch.tensor([0.5])).square().mean().backward()
    assert calls == [True, True]
