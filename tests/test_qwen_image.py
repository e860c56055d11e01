"""Qwen-Image on the builtin tiny Qwen-Image: its tokenizer and template as the real ones
count, the conditioning and latents its pipeline computes, the dynamic shift of its noise
levels, training (no text-encoder LoRA), the diffusers file loaded back and sampled with real
guidance, musubi-tuner's lora_unet_ file applied as ComfyUI applies it and read back by
diffusers' own Qwen reader, its names against the real Qwen-Image transformer built without
weights, and the single files people have."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import QWEN_IMAGE, WEBUI_FILE, make_params, train_in
from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import families
from lorapipe.diffusion.families import qwen_image
from lorapipe.diffusion.families.qwen_image import (
    QWEN_IMAGE_TRANSFORMER,
    TEMPLATE,
    TEMPLATE_PREFIX,
    build_tiny_qwen_image,
)
from lorapipe.diffusion.objectives import FlowMatching, FlowSettings
from stages import sample as sample_stage


def _probe(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = transformer.config
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0  # the second caption is shorter
    kw = dict(encoder_hidden_states=torch.randn(2, 7, c.joint_attention_dim, generator=gen),
              encoder_hidden_states_mask=mask, timestep=torch.tensor([0.3, 0.8]),
              img_shapes=[[(1, 4, 4)]] * 2)
    transformer.eval()
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, 16, 64, generator=gen), **kw).sample


def test_the_template_prefix_is_34_tokens_as_with_qwens_tokenizer():
    """The pipeline drops a fixed 34 tokens (prompt_template_encode_start_idx): the builtin
    tokenizer, Qwen2's class with merges learnt here, splits the template's prefix into the
    same 34 tokens as the real Qwen tokenizer (one per word, comma, newline, special)."""
    pipe = build_tiny_qwen_image()
    assert type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    prefix = TEMPLATE.split("{}")[0]
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prefix).input_ids)
    assert len(tokens) == TEMPLATE_PREFIX == pipe.prompt_template_encode_start_idx
    assert tokens[:4] == ["<|im_start|>", "system", "Ċ", "Describe"]
    assert tokens[-3:] == ["<|im_start|>", "user", "Ċ"]
    # built twice, the same tokenizer (the BPE trainer is deterministic)
    assert build_tiny_qwen_image().tokenizer.get_vocab() == pipe.tokenizer.get_vocab()


def test_tiny_qwen_image_encodes_as_its_pipeline(example_cache_qwen_image):
    from lorapipe.diffusion.cache import load_cache

    pipe = build_tiny_qwen_image()
    assert type(pipe.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage"
    cache = load_cache(example_cache_qwen_image)
    assert cache.meta["family"] == "qwen-image"
    assert cache.meta["latents_std"] == pipe.vae.config.latents_std
    # the per-channel statistics measured on the example (the builtin's config) normalise it
    everything = cache.latents.tensor
    per_channel = everything.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.2
    assert ((per_channel.std(1) > 0.7) & (per_channel.std(1) < 1.3)).all()
    n = len(cache.files)
    # the text as long as the longest caption (its template's end included), masked after
    lengths = cache.cond["text_mask"].sum(1)
    assert cache.cond["text_states"].shape == (n, int(lengths.max()), 32)
    embeds, mask = pipe.encode_prompt(cache.captions[:2], max_sequence_length=64)
    assert mask is None  # the example's captions are all as long: no padding
    torch.testing.assert_close(cache.cond["text_states"][:2], embeds, atol=1e-6, rtol=0)
    assert cache.cond["text_mask"].all()
    # one caption's own tokens, then the template's end (5 tokens)
    assert lengths[0] == len(pipe.tokenizer(cache.captions[0]).input_ids) + 5
    # the latents are what the pipeline decodes: latent * std + mean is the VAE's mean
    image = cache.files[0]
    from lorapipe.diffusion.cache import image_tensor

    pixels = image_tensor(example_cache_qwen_image.parent / "processed" / image)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None, :, None]).latent_dist.mode()[:, :, 0]
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1)
    torch.testing.assert_close(cache.latents[[0]] * std + mean, z,
                               atol=1e-5, rtol=1e-5)


def test_captions_of_different_lengths_are_padded_and_masked_as_the_pipeline_does(
        tmp_path, example_processed):
    """Batches of different caption lengths in one cache: each caption's states are the
    pipeline's, zero-padded to the longest and masked after its own tokens."""
    import csv
    import shutil

    from lorapipe.diffusion.cache import encode_dataset

    folder = tmp_path / "processed"
    shutil.copytree(example_processed, folder)
    with open(folder / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    long = "a photo of a red circle on a white background, high quality detailed art"
    for i, row in enumerate(rows):
        row["text"] = long if i == 3 else row["text"]
    with open(folder / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pipe = build_tiny_qwen_image()
    cache = encode_dataset(pipe, folder, batch_size=2)  # batch 1 holds the long caption
    states, mask = cache.cond["text_states"], cache.cond["text_mask"]
    short = len(pipe.tokenizer(rows[0]["text"]).input_ids) + 5
    assert states.shape[1] == len(pipe.tokenizer(long).input_ids) + 5 > short
    assert mask[3].all() and mask[0].sum() == short and not states[0, short:].any()
    embeds, want = pipe.encode_prompt([rows[0]["text"], long], max_sequence_length=64)
    torch.testing.assert_close(states[[0, 3]], embeds, atol=1e-6, rtol=0)
    assert torch.equal(mask[[0, 3]], want.float())


def test_noise_levels_take_the_dynamic_shift_of_the_image_size():
    """train.flow.resolution_shift on Qwen-Image is musubi-tuner's qwen_shift: the sigmoid
    draw shifted by exp(mu), mu linear in the 2x2 token count from 0.5 at 256 to 0.9 at
    8192 (its scheduler config's)."""
    settings = FlowSettings(timestep_sampling="sigmoid", logit_mean=0.0, logit_std=1.0,
                            sigmoid_scale=1.0, shift=1.0, resolution_shift=True,
                            weighting="none", guidance=1.0)
    objective = FlowMatching(build_tiny_qwen_image().scheduler, settings)
    for side, tokens in ((32, 256), (128, 4096)):  # latents of 256 and 1024 px
        sigmas = objective.sample_timesteps(4096, torch.Generator().manual_seed(0),
                                            (4096, 16, side, side))
        u = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
        shift = math.exp(0.5 + (0.9 - 0.5) * (tokens - 256) / (8192 - 256))
        torch.testing.assert_close(sigmas, shift * u / (1 + (shift - 1) * u))


@pytest.fixture(scope="module")
def qwen_trained(tmp_path_factory, example_cache_qwen_image):
    root = tmp_path_factory.mktemp("qwen")
    result = train_in(root, example_cache_qwen_image, train__max_steps=40,
                      lora__targets="kohya", train__learning_rate=5e-3, **QWEN_IMAGE)
    return root, result


def test_qwen_image_trains_and_refuses_a_text_encoder_lora(tmp_path, qwen_trained,
                                                           example_cache_qwen_image):
    root, result = qwen_trained
    s = result.summary
    assert s["model"]["family"] == "qwen-image"
    assert s["fixed_loss_end"] < s["fixed_loss_start"]
    assert set(result.models) == {"transformer"}
    assert (root / "logs/train.log").read_text().startswith(
        "train: qwen-image base builtin:tiny-qwen-image;")
    with pytest.raises(LorapipeError, match="text encoder is the 7B Qwen2.5-VL"):
        train_in(tmp_path, example_cache_qwen_image, lora__text_encoder=True, **QWEN_IMAGE)


def test_qwen_image_lora_loads_back_and_samples_with_real_guidance(qwen_trained):
    from lorapipe.diffusion.sampling import SampleSettings, generate

    root, result = qwen_trained
    trained = _probe(result.models["transformer"])
    pipe = build_tiny_qwen_image()
    assert not torch.allclose(_probe(pipe.transformer), trained)
    pipe.load_lora_weights(str(root / "lora"))
    assert torch.equal(_probe(pipe.transformer), trained)
    pipe.set_progress_bar_config(disable=True)
    family = families.of_pipeline(pipe)

    def image(lora, scale=1.0, negative="", guidance=4.0):
        s = SampleSettings(steps=3, guidance_scale=guidance, negative_prompt=negative,
                           width=64, height=64, lora_scale=scale)
        return np.asarray(generate(pipe, "a red circle, lpstyle", 7, s, lora, family))

    base, lora = image(False), image(True)
    assert (base == image(False)).all() and (base != lora).any()
    assert (image(True, 0.0) == base).all()
    assert (image(True, negative="blurry") != lora).any()  # the negative prompt is used
    assert (image(True, guidance=1.0) != lora).any()  # true_cfg_scale is the guidance


def test_the_webui_file_applied_as_comfyui_does_is_the_trained_model(qwen_trained):
    """ComfyUI maps lora_unet_<module with underscores> onto its own (Qwen's = diffusers')
    module names and adds up @ down * alpha / rank to each weight: done here on the tiny
    base, the transformer computes what training left; diffusers' own reader of the file
    (QwenImagePipeline.load_lora_weights) likewise."""
    root, result = qwen_trained
    base = build_tiny_qwen_image().transformer
    state = base.state_dict()
    tensors = load_file(root / "lora" / WEBUI_FILE)
    by_name = {k.removesuffix(".weight").replace(".", "_"): k for k in state
               if k.endswith(".weight")}
    modules = {k.split(".")[0] for k in tensors}
    assert modules <= {f"lora_unet_{n}" for n in by_name}
    assert not any("_mod_" in m for m in modules)  # musubi-tuner's exclude_mod
    for module in modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        alpha = tensors[f"{module}.alpha"].item()
        key = by_name[module.removeprefix("lora_unet_")]
        state[key] = state[key] + up @ down * (alpha / down.shape[0])
    merged = QwenImageTransformer2DModel(**base.config)
    merged.load_state_dict(state)
    want = _probe(result.models["transformer"])
    torch.testing.assert_close(_probe(merged), want, atol=2e-5, rtol=1e-4)
    pipe = build_tiny_qwen_image()
    pipe.load_lora_weights(str(root / "lora" / WEBUI_FILE))
    torch.testing.assert_close(_probe(pipe.transformer), want, atol=2e-5, rtol=1e-4)
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_network_module"]) == (
        "qwen_image", "networks.lora_qwen_image")
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert "modelspec.prediction_type" not in meta


@pytest.mark.parametrize("preset", ["attn", "kohya"])
def test_webui_names_are_the_real_qwen_image_modules(preset):
    """The real 60-block transformer on the meta device: every module of the WebUI file is
    a Linear of it under ComfyUI's lora_unet_ mapping (no two modules share a name), with
    its shapes, and diffusers' Qwen reader maps each back to exactly that module."""
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER)
    suffixes = qwen_image.FAMILY.targets(preset)["transformer"]
    linears = {name: m for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    underscored = [n.replace(".", "_") for n in linears]
    assert len(set(underscored)) == len(underscored)
    rank, state = 4, {}
    for name, module in linears.items():
        if any(name.endswith("." + s) for s in suffixes):
            state[name] = (torch.zeros(rank, module.in_features),
                           torch.zeros(module.out_features, rank))
    assert len(state) == 60 * (8 if preset == "attn" else 12)
    tensors = qwen_image.FAMILY.to_webui(state, float(rank), transformer.config)
    comfy = {"lora_unet_" + n.replace(".", "_"): n for n in linears}
    for name, (down, up) in state.items():
        key = "lora_unet_" + name.replace(".", "_")
        assert comfy[key] == name
        assert tensors[f"{key}.lora_down.weight"].shape == down.shape
        assert tensors[f"{key}.lora_up.weight"].shape == up.shape
    back = _convert_non_diffusers_qwen_lora_to_diffusers(dict(tensors))
    got = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in back
           if k.endswith(".lora_A.weight")}
    assert got == set(state)
    # the top-level modules a list of targets may name read back too
    top = {n: (torch.zeros(rank, m.in_features), torch.zeros(m.out_features, rank))
           for n, m in linears.items() if not n.startswith("transformer_blocks.")}
    back = _convert_non_diffusers_qwen_lora_to_diffusers(
        qwen_image.FAMILY.to_webui(top, float(rank), transformer.config))
    assert {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in back
            if k.endswith("lora_A.weight")} == set(top)


def test_qwen_single_files_train_and_sample(tmp_path, example_processed, monkeypatch):
    """What users have: ComfyUI's qwen_image_bf16.safetensors (the transformer in Qwen's own
    names) or a ComfyUI checkpoint with the model.diffusion_model. prefix, with model.config
    naming a diffusers Qwen-Image folder: detected, loaded to the same weights, trained,
    sampled; without model.config, told what to set."""
    from lorapipe.diffusion.cache import encode_dataset, save_cache
    from lorapipe.diffusion.models import load_pipeline

    pipe = build_tiny_qwen_image()
    pipe.save_pretrained(tmp_path / "qwen-config")
    state = {k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(state, str(tmp_path / "qwen_image_tiny.safetensors"))
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()},
              str(tmp_path / "qwen_checkpoint.safetensors"))
    for name in ("qwen_image_tiny.safetensors", "qwen_checkpoint.safetensors"):
        assert families.detect(tmp_path / name, "x") is qwen_image.FAMILY
        loaded = load_pipeline(str(tmp_path / name), str(tmp_path / "qwen-config"))
        got = loaded.transformer.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
        with pytest.raises(LorapipeError, match="set model.config to a diffusers Qwen-Image"):
            load_pipeline(str(tmp_path / name))
    base = {"model__base": str(tmp_path / "qwen_image_tiny.safetensors"),
            "model__config": str(tmp_path / "qwen-config")}
    save_cache(encode_dataset(loaded, example_processed, batch_size=8), tmp_path / "cache",
               base["model__base"])
    result = train_in(tmp_path, tmp_path / "cache", train__max_steps=4, **base)
    assert result.summary["model"]["family"] == "qwen-image"
    make_params(tmp_path, sample__steps=2, sample__images_per_prompt=1, **base)
    monkeypatch.chdir(tmp_path)
    assert sample_stage.main(["--lora", "lora", "--out", "samples", "--logs", "slogs"]) == 0
    assert (tmp_path / "samples/grid.png").exists()
