"""SDXL end to end on the builtin tiny SDXL: its shape, the encode cache (both encoders,
pooled embedding, micro-conditioning from preprocess), training, the two export files loaded
back the ways users load them, the WebUI names against the real SDXL 1.0 UNet, and
single-file bases in the original layout for both families."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from conftest import SDXL, WEBUI_FILE, make_params, train_in
from ldm_layout import write_single_file
from lorapipe.core import adapters
from lorapipe.diffusion import families, ldm, lora
from lorapipe.diffusion.cache import encode_dataset, load_cache, save_cache
from lorapipe.diffusion.families.sdxl import SDXL_1_0_UNET, build_tiny_sdxl
from lorapipe.diffusion.models import load_pipeline
from stages import sample as sample_stage


def test_tiny_sdxl_is_sdxl_shaped_and_its_cache_holds_the_micro_conditioning(
        example_cache_sdxl, example_processed):
    pipe = build_tiny_sdxl()
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time" and list(cfg.transformer_layers_per_block) \
        == [1, 1, 2] and cfg.down_block_types[0] == "DownBlock2D"
    # cross-attention sees both encoders' states side by side; the pooled one is bigG-like's
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.cross_attention_dim == width
    assert cfg.projection_class_embeddings_input_dim == \
        6 * cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim

    cache = load_cache(example_cache_sdxl)
    assert cache.meta["family"] == "sdxl" and 0.8 < cache.latents.std().item() < 1.25
    assert cache.cond["text_states"].shape == (20, 77, width)
    assert cache.cond["pooled"].shape == (20, pipe.text_encoder_2.config.projection_dim)
    # the pipeline's own prompt encoding (same batch of 8 as the encode stage's), so training
    # conditions exactly as sampling does
    states, _, pooled, _ = pipe.encode_prompt(cache.captions[:8],
                                              do_classifier_free_guidance=False)
    assert torch.equal(cache.cond["text_states"][:8], states)
    assert torch.equal(cache.cond["pooled"][:8], pooled)
    # time ids: (original h, w, crop top, left, target h, w) as preprocess recorded them
    with open(example_processed / "metadata.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    wide = next(i for i, r in enumerate(rows) if int(r["original_width"]) > int(
        r["original_height"]))
    r = rows[wide]
    assert int(r["crop_left"]) > 0 and int(r["crop_top"]) == 0  # a landscape loses its sides
    assert cache.cond["time_ids"][wide].tolist() == [
        float(r[c]) for c in ("original_height", "original_width", "crop_top", "crop_left",
                              "height", "width")]


@pytest.fixture(scope="module")
def sdxl_trained(tmp_path_factory, example_cache_sdxl):
    root = tmp_path_factory.mktemp("sdxl")
    result = train_in(root, example_cache_sdxl, lora__rank=4, lora__alpha=8,
                      train__max_steps=30, train__learning_rate=5e-3, **SDXL)
    return root, result


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    inputs = {
        "encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, cfg.projection_class_embeddings_input_dim
                                       - 6 * cfg.addition_time_embed_dim, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [160, 224, 0, 13, 64, 64]])}}
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return unet.eval()(x, torch.tensor([100, 700]), **inputs).sample


def test_sdxl_trains_and_says_so(sdxl_trained):
    root, result = sdxl_trained
    s = result.summary
    assert s["model"]["family"] == "sdxl" and s["fixed_loss_end"] < s["fixed_loss_start"]
    assert (root / "logs/train.log").read_text().startswith(
        "train: sdxl base builtin:tiny-sdxl;")


@pytest.mark.parametrize("source", ["folder", "webui"])
def test_sdxl_lora_loads_back_in_the_sdxl_pipeline_exactly(sdxl_trained, source):
    """Both files through StableDiffusionXLPipeline.load_lora_weights: the WebUI file goes
    through diffusers' own SGM -> diffusers mapping, an independent check of its names."""
    root, result = sdxl_trained
    expected = unet_output(result.models["unet"])
    assert (expected - unet_output(build_tiny_sdxl().unet)).abs().max() > 1e-3
    pipe = build_tiny_sdxl()
    pipe.load_lora_weights(str(root / "lora" if source == "folder" else root / "lora" / WEBUI_FILE))
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=0, atol=0)
    image = pipe("a red circle, lpstyle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_sdxl_webui_metadata_says_sdxl(sdxl_trained):
    root, _ = sdxl_trained
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert not any("down_blocks" in k for k in keys)  # SGM names only, as kohya writes SDXL


def test_continue_an_sdxl_lora_from_its_webui_file(tmp_path, sdxl_trained, example_cache_sdxl):
    root, result = sdxl_trained
    cont = train_in(tmp_path, example_cache_sdxl, lora__rank=4, lora__alpha=4,
                    lora__init=str(root / "lora" / WEBUI_FILE), train__max_steps=1,
                    train__learning_rate=1e-12, **SDXL)
    torch.testing.assert_close(unet_output(cont.models["unet"]), unet_output(result.models["unet"]),
                               rtol=1e-4, atol=1e-5)


def _meta_unet(config: dict) -> UNet2DConditionModel:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return UNet2DConditionModel(**config)


@pytest.mark.parametrize("preset, modules", [("attn", 560), ("kohya", 722)])
def test_webui_names_are_the_real_sdxl_unet_modules(preset, modules):
    """SDXL 1.0's UNet built from its config without weights: the original-name map agrees
    with diffusers' own converter on every tensor, and every exported LoRA key names a
    Linear of the original model, with matching shapes. The presets: attn, 70 transformer
    blocks x 2 attentions x 4 projections; kohya, + 2 feed-forward Linears per block and
    proj_in/proj_out of the 11 Transformer2DModels (the 722 kohya reports for SDXL)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = _meta_unet(SDXL_1_0_UNET)
    weights = {k: v for k, v in unet.state_dict().items()}
    original = {}
    for key, tensor in weights.items():
        module, param = key.rsplit(".", 1)
        original[f"model.diffusion_model.{ldm.unet_module(module, unet.config)}.{param}"] = tensor
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert set(back) == set(weights)
    assert all(back[k].shape == weights[k].shape for k in weights)

    sdxl = families.by_name("sdxl")
    config = lora.lora_config(adapters.Shape(), sdxl.targets(preset)["unet"])
    assert lora.attach({"unet": unet}, {"unet": config}) == {"unet": modules}
    state = adapters.adapter_state({"unet": unet})
    tensors = lora.to_kohya(state, {"unet": config}, sdxl, unet.config)
    linear = {k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(
        ".", "_"): v.shape for k, v in original.items() if v.ndim == 2}
    for key, tensor in tensors.items():
        module, kind = key.removeprefix("lora_unet_").split(".", 1)
        assert module in linear, key
        out_features, in_features = linear[module]
        if kind == "lora_down.weight":
            assert tensor.shape == (4, in_features), key
        elif kind == "lora_up.weight":
            assert tensor.shape == (out_features, 4), key
    # and diffusers maps the names back to exactly the modules that were trained
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    assert {f"unet.{k}" for k in convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in converted.items()})} == set(state)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_base_in_the_original_layout_loads_the_same_weights(tmp_path, family):
    """What users have: one .safetensors in the LDM/SGM layout, with model.config naming a
    diffusers folder of the same architecture for the configs (offline)."""
    f = families.by_name(family)
    pipe = f.build_builtin()
    pipe.save_pretrained(tmp_path / "config")
    write_single_file(pipe, tmp_path / "base.safetensors")
    assert families.detect(tmp_path / "base.safetensors", "base.safetensors") is f
    assert families.detect(tmp_path / "config", "config") is f
    loaded = load_pipeline("base.safetensors", "config", root=tmp_path)
    assert type(loaded) is f.pipeline_class
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(pipe, part):
            want, got = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
            assert want.keys() == got.keys(), part
            assert all(torch.equal(want[k], got[k]) for k in want), part


def test_sdxl_single_file_base_trains_and_samples(tmp_path, example_processed, monkeypatch):
    """model.base: a single SGM-layout file + model.config: encode, train and sample run on
    it, and it encodes exactly as the builtin it was written from."""
    pipe = build_tiny_sdxl()
    pipe.save_pretrained(tmp_path / "sdxl-config")
    write_single_file(pipe, tmp_path / "sdxl.safetensors")
    base = {"model__base": str(tmp_path / "sdxl.safetensors"),
            "model__config": str(tmp_path / "sdxl-config")}
    cache = encode_dataset(load_pipeline(base["model__base"], base["model__config"]),
                           example_processed, batch_size=8)
    builtin = encode_dataset(pipe, example_processed, batch_size=8)
    assert torch.equal(cache.latents.tensor, builtin.latents.tensor)
    assert all(torch.equal(cache.cond[k], builtin.cond[k]) for k in builtin.cond)
    save_cache(cache, tmp_path / "cache", base["model__base"])
    result = train_in(tmp_path, tmp_path / "cache", train__max_steps=4, **base)
    assert result.summary["model"]["family"] == "sdxl"

    make_params(tmp_path, sample__steps=2, sample__images_per_prompt=1, **base)
    monkeypatch.chdir(tmp_path)  # the stage reads params.yaml from the working folder
    assert sample_stage.main(["--lora", "lora", "--out", "samples", "--logs", "slogs"]) == 0
    assert (tmp_path / "samples/grid.png").exists()


def test_sdxl_sampling_seeds_schedulers_and_lora_scale(sdxl_trained):
    """The sample stage's generate() on the SDXL pipeline: a sampler from the base's own
    schedule, the LoRA changes the image, scale 0 gives the base image exactly."""
    from lorapipe.diffusion.sampling import SampleSettings, generate, make_scheduler

    root, _ = sdxl_trained
    pipe = build_tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(root / "lora"))
    pipe.scheduler = make_scheduler("dpm++_2m", pipe.scheduler.config)
    assert pipe.scheduler.config.timestep_spacing == "leading"  # SDXL's, kept
    on = SampleSettings(steps=3, guidance_scale=5.0, negative_prompt="blurry", width=64,
                        height=64, lora_scale=1.0)
    off = SampleSettings(**{**on.__dict__, "lora_scale": 0.0})
    px = [np.asarray(generate(pipe, "a red circle, lpstyle", 7, s, lora=lora), dtype=np.int16)
          for s, lora in ((on, True), (on, False), (off, True))]
    assert np.abs(px[0] - px[1]).mean() > 1 and (px[1] == px[2]).all()


def test_a_v_prediction_zero_snr_single_file_trains_as_such(tmp_path, example_processed,
                                                          monkeypatch):
    """NoobAI-XL v-pred's kind of file: an SGM-layout SDXL with the v_pred and ztsnr marker
    tensors. model.prediction_type / noise_schedule auto read them: the training targets are
    velocities on a schedule whose last step is pure noise, the run is healthy, the WebUI file
    says v-parameterization and zero terminal SNR, and sampling starts at the last timestep
    with rescaled guidance."""
    from lorapipe.diffusion.families.unet import ZTSNR_GUIDANCE_RESCALE
    from lorapipe.diffusion.models import load_base
    from lorapipe.diffusion.sampling import SampleSettings, generate

    pipe = build_tiny_sdxl()
    pipe.save_pretrained(tmp_path / "sdxl-config")  # an epsilon config: the marks decide
    write_single_file(pipe, tmp_path / "vpred.safetensors", marks=("v_pred", "ztsnr"))
    base = load_base("vpred.safetensors", "sdxl-config", root=tmp_path)
    config = base.pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr,
            config.timestep_spacing) == ("v_prediction", True, "trailing")
    # set explicitly, the keys override the marks
    plain = load_base("vpred.safetensors", "sdxl-config", root=tmp_path,
                      prediction_type="epsilon", noise_schedule="default").pipe.scheduler
    assert (plain.config.prediction_type, plain.config.rescale_betas_zero_snr) == (
        "epsilon", False)

    objective = base.family.objective(base.pipe)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = torch.tensor([999, 999])
    torch.testing.assert_close(objective.noisy(x0, eps, last), eps)  # zero SNR: pure noise
    torch.testing.assert_close(objective.target(x0, eps, last), -x0)  # v at zero SNR

    cache = encode_dataset(base.pipe, example_processed, batch_size=8)
    save_cache(cache, tmp_path / "cache", str(tmp_path / "vpred.safetensors"))
    files = {"model__base": str(tmp_path / "vpred.safetensors"),
             "model__config": str(tmp_path / "sdxl-config")}
    result = train_in(tmp_path, tmp_path / "cache", train__max_steps=60,
                      train__learning_rate=5e-3, train__validation__every=20,
                      health_report=tmp_path / "health.md", **files)
    health = json.loads((tmp_path / "dvclive/metrics.json").read_text())["health"]
    assert health["status"] == "healthy", health
    assert result.summary["fixed_loss_end"] < result.summary["fixed_loss_start"]
    with safe_open(str(tmp_path / "lora" / WEBUI_FILE), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"],
            meta["modelspec.prediction_type"]) == ("True", "True", "v")

    sampler = base.family.sampler("euler_a", base.pipe.scheduler)
    sampler.set_timesteps(4)
    assert sampler.timesteps[0] == 999  # trailing: the first step from pure noise
    base.pipe.scheduler = sampler
    base.pipe.set_progress_bar_config(disable=True)
    base.pipe.load_lora_weights(str(tmp_path / "lora"))
    s = SampleSettings(steps=3, guidance_scale=5.0, negative_prompt="", width=64, height=64,
                       lora_scale=1.0)
    image = np.asarray(generate(base.pipe, "a red circle, lpstyle", 3, s, lora=True))

    def direct(rescale):
        return np.asarray(base.pipe("a red circle, lpstyle", num_inference_steps=3, width=64,
                                    height=64, guidance_scale=5.0, guidance_rescale=rescale,
                                    generator=torch.Generator("cpu").manual_seed(3)).images[0])

    assert (image == direct(ZTSNR_GUIDANCE_RESCALE)).all()
    assert (image != direct(0.0)).any()


def test_zero_snr_holds_on_a_base_whose_scheduler_has_no_switch_for_it():
    """SD 1.x/2.x folders come with PNDM, which has no rescale_betas_zero_snr and would drop
    it: the schedule is rebuilt as Euler, so the objective trains at zero terminal SNR; a base
    left as it is keeps its own scheduler object."""
    from diffusers import PNDMScheduler

    from lorapipe.diffusion.families import sd
    from lorapipe.diffusion.objectives import DDPM

    pipe = sd.build_tiny_sd()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    sd.FAMILY.set_schedule(pipe, "v_prediction", "zero_terminal_snr", set())
    assert pipe.scheduler.config.rescale_betas_zero_snr
    assert DDPM.from_pipeline(pipe).scheduler.alphas_cumprod[-1] == 0
    untouched = pipe.scheduler
    sd.FAMILY.set_schedule(pipe, "auto", "auto", set())
    assert pipe.scheduler is untouched
