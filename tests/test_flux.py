"""Flux.1 on the builtin tiny Flux: its shape and cache, the flow-matching objective, dev and
schnell bases (folders and Black Forest Labs' single files), training, both exports read
back the ways users load them, and kohya's Flux names against the real FLUX.1-dev
transformer built without weights."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import FLUX, WEBUI_FILE, make_params, train_in
from lorapipe.core.errors import LorapipeError
from lorapipe.diffusion import families
from lorapipe.diffusion.families import flux
from lorapipe.diffusion.families.flux import (
    FLUX_1_DEV_TRANSFORMER,
    TINY_FLUX_SCALING,
    TINY_FLUX_SHIFT,
    build_tiny_flux,
)
from lorapipe.diffusion.objectives import FlowMatching, FlowSettings, diffusion_loss

FLOW = FlowSettings(timestep_sampling="uniform", logit_mean=0.0, logit_std=1.0,
                    sigmoid_scale=1.0, shift=1.0, resolution_shift=False, weighting="none",
                    guidance=1.0)


def test_tiny_flux_is_flux_shaped_and_its_cache_is_centred(example_cache_flux):
    from lorapipe.diffusion.cache import load_cache

    pipe = build_tiny_flux()
    t = pipe.transformer.config
    assert (t.num_layers, t.num_single_layers, t.guidance_embeds, t.in_channels) == (2, 4, True,
                                                                                    64)
    assert sum(t.axes_dims_rope) == t.attention_head_dim  # RoPE over the whole head
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and not vae.use_quant_conv
    assert (vae.shift_factor, vae.scaling_factor) == (TINY_FLUX_SHIFT, TINY_FLUX_SCALING)
    # the T5 tokenizer is a Unigram (SentencePiece) model: whole words, then characters
    tok = pipe.tokenizer_2
    assert tok.convert_ids_to_tokens(tok("a red circle, lpstyle").input_ids) == [
        "▁a", "▁red", "▁circle", ",", "▁lpstyle", "</s>"]
    assert tok.backend_tokenizer.model.__class__.__name__ == "Unigram"
    cache = load_cache(example_cache_flux)
    assert cache.meta["family"] == "flux"
    assert cache.meta["shift_factor"] == TINY_FLUX_SHIFT
    # the measured statistics keep the latents centred at unit variance
    everything = torch.cat([t.flatten() for t in cache.latents.buckets.values()])
    assert abs(everything.mean().item()) < 0.05 and 0.9 < everything.std().item() < 1.1
    n = len(cache.files)
    assert cache.cond["text_states"].shape == (n, 64, 32)  # T5's sequence, 64 tokens here
    assert cache.cond["pooled"].shape == (n, 32)  # CLIP's pooled embedding
    # the same conditioning FluxPipeline computes for sampling
    embeds, pooled, _ = pipe.encode_prompt(cache.captions[:2], None, max_sequence_length=64)
    assert torch.allclose(embeds, cache.cond["text_states"][:2], atol=1e-6)
    assert torch.allclose(pooled, cache.cond["pooled"][:2], atol=1e-6)


def test_flow_matching_noises_and_targets_as_rectified_flow():
    sched = build_tiny_flux().scheduler
    obj = FlowMatching(sched, FLOW)
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    noisy = obj.noisy(x0, eps, sigma)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], eps[2])
    assert torch.allclose(noisy[1], 0.75 * x0[1] + 0.25 * eps[1])
    assert torch.equal(obj.target(x0, eps, sigma), eps - x0)
    assert torch.allclose(obj.fixed_timesteps(300, 2), torch.tensor([0.3, 0.3]))
    # the loss is the MSE of the prediction against eps - x0 at the drawn sigma
    gen = torch.Generator().manual_seed(0)
    loss = diffusion_loss(lambda x, s: torch.zeros_like(x), obj, x0, gen)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen)
    assert loss.item() == pytest.approx((noise - x0).pow(2).mean().item(), rel=1e-6)


def _sigmas(shape=(1, 16, 8, 8), **settings):
    obj = FlowMatching(build_tiny_flux().scheduler, FlowSettings(**{**vars(FLOW), **settings}))
    return obj.sample_timesteps(20000, torch.Generator().manual_seed(0), shape)


def test_timestep_sampling_and_shifts():
    uniform = _sigmas()
    assert 0 < uniform.min() and uniform.max() < 1 and uniform.mean() == pytest.approx(0.5,
                                                                                       abs=0.01)
    # logit-normal: sigmoid of N(mean, std); its median is sigmoid(mean)
    ln = _sigmas(timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5)
    assert ln.median() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)
    wide = _sigmas(timestep_sampling="sigmoid", sigmoid_scale=3.0)
    narrow = _sigmas(timestep_sampling="sigmoid", sigmoid_scale=0.5)
    assert wide.std() > 2 * narrow.std()
    # the static shift, as FlowMatchEulerDiscreteScheduler shifts: s*u / (1 + (s-1)*u)
    shifted = _sigmas(shift=3.0)
    assert torch.allclose(shifted, 3 * uniform / (1 + 2 * uniform))
    # Flux's resolution shift: more tokens (a larger image), noisier training
    small = _sigmas(resolution_shift=True, shape=(1, 16, 8, 8))
    large = _sigmas(resolution_shift=True, shape=(1, 16, 128, 128))  # 1024 px: 4096 tokens
    assert small.mean() < large.mean()
    mu = 1.15  # calculate_shift at max_image_seq_len
    assert torch.allclose(large, math.exp(mu) / (math.exp(mu) + (1 / uniform - 1)))
    # SD3's weightings through diffusers' helper; none = a plain mean
    obj = FlowMatching(build_tiny_flux().scheduler, FlowSettings(**{**vars(FLOW),
                                                                    "weighting": "cosmap"}))
    w = obj.weights(torch.tensor([0.5]), 0.0)
    assert w.item() == pytest.approx(2 / (math.pi * 0.5))
    assert FlowMatching(None, FLOW).weights(torch.tensor([0.5]), 0.0) is None


def test_params_refuse_ddpm_notions_for_flux(tmp_path):
    from lorapipe.core.params import ParamsError

    with pytest.raises(ParamsError) as err:
        make_params(tmp_path, train__noise_offset=0.05, train__min_snr_gamma=5, **FLUX)
    text = str(err.value)
    assert "train.noise_offset is 0.05 but Flux.1 bases are trained by flow matching" in text
    assert "train.flow.timestep_sampling" in text and "train.flow.weighting" in text
    with pytest.raises(ParamsError, match="both shift the noise levels"):
        make_params(tmp_path, train__flow__shift=3.0, **FLUX)
    make_params(tmp_path, train__noise_offset=0.05)  # SD takes it


@pytest.fixture(scope="module")
def flux_trained(tmp_path_factory, example_cache_flux):
    root = tmp_path_factory.mktemp("flux")
    result = train_in(root, example_cache_flux, train__max_steps=40, lora__targets="kohya",
                      lora__text_encoder=True, **FLUX)
    return root, result


def test_flux_trains_both_and_reports_flux(flux_trained):
    root, result = flux_trained
    s = result.summary
    assert s["model"]["family"] == "flux" and s["fixed_loss_end"] < s["fixed_loss_start"]
    counts = result.models["transformer"], result.models["text_encoder"]
    assert all(any(p.requires_grad for p in m.parameters()) for m in counts)
    assert "text_encoder_2" not in result.models  # T5 never gets a LoRA


def _probe(transformer, seed=0):
    """The transformer's output on fixed inputs, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    c = transformer.config
    x = torch.randn(2, 16, 64, generator=gen)
    kw = dict(encoder_hidden_states=torch.randn(2, 7, c.joint_attention_dim, generator=gen),
              pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=gen),
              timestep=torch.tensor([0.3, 0.8]), img_ids=torch.zeros(16, 3),
              txt_ids=torch.zeros(7, 3), guidance=torch.ones(2))
    transformer.eval()
    with torch.no_grad():
        return transformer(hidden_states=x, **kw).sample


def test_flux_lora_loads_back_in_the_flux_pipeline(flux_trained):
    """The diffusers file, loaded as users load it, computes exactly the trained model."""
    root, result = flux_trained
    trained = _probe(result.models["transformer"])
    pipe = build_tiny_flux()
    assert not torch.allclose(_probe(pipe.transformer), trained)
    pipe.load_lora_weights(str(root / "lora"))
    assert torch.equal(_probe(pipe.transformer), trained)  # the same adapter, the same ops
    assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters())  # CLIP-L's too


def test_continue_a_flux_lora_and_sample_it_beside_the_base(tmp_path, flux_trained,
                                                            example_cache_flux):
    """lora.init continues the diffusers file exactly; FluxPipeline samples the base and the
    LoRA from the same seed, and LoRA scale 0 is the base."""
    from lorapipe.diffusion.sampling import SampleSettings, generate

    root, result = flux_trained
    cont = train_in(tmp_path, example_cache_flux, lora__targets="kohya",
                    lora__text_encoder=True, lora__init=str(root / "lora"),
                    train__max_steps=1, train__learning_rate=1e-12, **FLUX)
    torch.testing.assert_close(_probe(cont.models["transformer"]),
                               _probe(result.models["transformer"]), rtol=1e-4, atol=1e-5)
    pipe = build_tiny_flux()
    pipe.load_lora_weights(str(root / "lora"))
    pipe.set_progress_bar_config(disable=True)
    family = families.of_pipeline(pipe)
    pipe.scheduler = family.sampler("euler_a", pipe.scheduler)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"

    def image(lora, scale=1.0):
        s = SampleSettings(steps=3, guidance_scale=3.5, negative_prompt="", width=64,
                           height=64, lora_scale=scale)
        return torch.tensor(list(generate(pipe, "a red circle, lpstyle", 7, s, lora,
                                          family).getdata()))

    base, lora = image(False), image(True)
    assert torch.equal(base, image(False)) and not torch.equal(base, lora)
    assert torch.equal(image(True, 0.0), base)


def test_flux_webui_file_is_the_trained_update_on_bfl_weights(flux_trained):
    """What ComfyUI and Forge do with the kohya file: add up @ down * alpha / rank to the BFL
    weight of that name. For every fused projection that is exactly the trained modules'
    updates stacked in BFL's order (diffusers' own reader of these files assumes Flux's real
    3072 width, so the tiny model's file is checked here this way, and the real width's
    through that reader below)."""
    root, result = flux_trained
    transformer = result.models["transformer"]
    scale = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            scale[name] = (b @ a * module.scaling["default"]).detach()
    tensors = load_file(root / "lora" / WEBUI_FILE)
    expected: dict[str, dict[int, torch.Tensor]] = {}
    for name, delta in scale.items():
        bfl, part, parts = flux.bfl_module(name)
        expected.setdefault(bfl, {})[part] = delta
    assert {f"lora_unet_{k.replace('.', '_')}" for k in expected} == {
        k.split(".")[0] for k in tensors if k.startswith("lora_unet_")}
    for bfl, members in expected.items():
        key = f"lora_unet_{bfl.replace('.', '_')}"
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        delta = up @ down * (tensors[f"{key}.alpha"].item() / down.shape[0])
        sizes = flux.part_sizes(bfl, transformer.config) if len(members) > 1 else [
            delta.shape[0]]
        rows = torch.split(delta, sizes, dim=0)
        for part, want in members.items():
            assert torch.allclose(rows[part], want, atol=1e-7), (bfl, part)


def test_flux_webui_metadata_says_flux(flux_trained):
    root, _ = flux_trained
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.implementation"] == flux.BFL_IMPLEMENTATION
    assert "modelspec.prediction_type" not in meta
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
    assert not any("transformer_blocks" in k for k in keys)  # BFL names only


def bfl_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """Black Forest Labs' Flux model (flux/model.py, flux/modules/layers.py): every Linear
    as (out, in), from its hyperparameters, written here independently of diffusers."""
    h = c["num_attention_heads"] * c["attention_head_dim"]
    mlp = 4 * h  # mlp_ratio 4.0
    shapes = {"img_in": (h, c["in_channels"]), "txt_in": (h, c["joint_attention_dim"]),
              "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
              "vector_in.in_layer": (h, c["pooled_projection_dim"]),
              "vector_in.out_layer": (h, h), "final_layer.linear": (c["in_channels"], h),
              "final_layer.adaLN_modulation.1": (2 * h, h)}
    if c["guidance_embeds"]:
        shapes.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    for i in range(c["num_layers"]):
        for s in ("img", "txt"):
            shapes.update({f"double_blocks.{i}.{s}_mod.lin": (6 * h, h),
                           f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                           f"double_blocks.{i}.{s}_attn.proj": (h, h),
                           f"double_blocks.{i}.{s}_mlp.0": (mlp, h),
                           f"double_blocks.{i}.{s}_mlp.2": (h, mlp)})
    for i in range(c["num_single_layers"]):
        shapes.update({f"single_blocks.{i}.linear1": (3 * h + mlp, h),
                       f"single_blocks.{i}.linear2": (h, h + mlp),
                       f"single_blocks.{i}.modulation.lin": (3 * h, h)})
    return shapes


def bfl_checkpoint(c: dict, device="meta") -> dict[str, torch.Tensor]:
    """A BFL checkpoint's tensor names and shapes (weights, biases, the q/k RMSNorm scales)."""
    d = c["attention_head_dim"]
    out = {}
    for name, (o, i) in bfl_shapes(c).items():
        out[f"{name}.weight"] = torch.zeros(o, i, device=device)
        out[f"{name}.bias"] = torch.zeros(o, device=device)
    for i in range(c["num_layers"]):
        for s in ("img", "txt"):
            for n in ("query_norm", "key_norm"):
                out[f"double_blocks.{i}.{s}_attn.norm.{n}.scale"] = torch.zeros(d, device=device)
    for i in range(c["num_single_layers"]):
        for n in ("query_norm", "key_norm"):
            out[f"single_blocks.{i}.norm.{n}.scale"] = torch.zeros(d, device=device)
    return out


def _meta_transformer(config: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def test_bfl_table_is_the_real_flux_dev_transformer():
    """The BFL layout written above, converted by diffusers' own single-file converter, is
    exactly FLUX.1-dev's diffusers transformer, tensor for tensor (so the names checked
    against it below are BFL's)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    converted = convert_flux_transformer_checkpoint_to_diffusers(
        bfl_checkpoint(FLUX_1_DEV_TRANSFORMER))
    real = _meta_transformer(FLUX_1_DEV_TRANSFORMER).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in real.items()}


@pytest.mark.parametrize("preset", ["attn", "kohya"])
def test_webui_names_are_the_real_flux_modules(preset):
    """FLUX.1-dev's transformer built from its config without weights: every tensor of the
    kohya file names a BFL module with matching shapes, and diffusers' own kohya->diffusers
    Flux converter gives back exactly the trained modules' products (probed with a random
    input; any part a fused file adds is zero)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    config = FLUX_1_DEV_TRANSFORMER
    transformer = _meta_transformer(config)
    pattern = flux.FAMILY.targets(preset)["transformer"]
    rank, gen = 4, torch.Generator().manual_seed(0)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(pattern, name):
            state[name] = (torch.randn(rank, module.in_features, generator=gen) * 0.1,
                           torch.randn(module.out_features, rank, generator=gen) * 0.1)
    per_block = {"attn": (8, 3), "kohya": (14, 6)}[preset]
    assert len(state) == 19 * per_block[0] + 38 * per_block[1]
    tensors = flux.FAMILY.to_webui(state, float(rank), transformer.config)

    shapes = {k.replace(".", "_"): v for k, v in bfl_shapes(config).items()}
    modules = {k.removeprefix("lora_unet_").split(".")[0] for k in tensors}
    assert modules <= set(shapes)
    for module in modules:
        out, inp = shapes[module]
        down = tensors[f"lora_unet_{module}.lora_down.weight"]
        up = tensors[f"lora_unet_{module}.lora_up.weight"]
        assert down.shape[1] == inp and up.shape[0] == out and up.shape[1] == down.shape[0]
        # the file's alpha / rank is the trained LoRA's (1 here), so clients scale it alike
        assert tensors[f"lora_unet_{module}.alpha"].item() / down.shape[0] == 1.0
    # kohya's lora_flux wraps linear1 as a whole: qkv and MLP input in one module
    expected = {"attn": 19 * 4 + 38, "kohya": 19 * 10 + 38 * 3}[preset]
    assert len(modules) == expected

    back = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    back = {k.removeprefix("transformer."): v for k, v in back.items()}
    got = {k.removesuffix(".lora_A.weight") for k in back if k.endswith(".lora_A.weight")}
    assert set(state) <= got
    for name in sorted(got):
        a, b = back[f"{name}.lora_A.weight"], back[f"{name}.lora_B.weight"]
        x = torch.randn(a.shape[1], 2, generator=gen)
        if name in state:
            a0, b0 = state[name]
            assert a.shape == a0.shape  # split back to the trained rank, not the fused one
            assert torch.allclose(b @ (a @ x), b0 @ (a0 @ x), atol=1e-5), name
        else:  # the MLP part of an attention-only linear1: nothing was trained there
            assert preset == "attn" and name.endswith("proj_mlp") and not b.any()


def _bfl_names_file(path, guidance: bool):
    """A file with the tensor names of a BFL transformer (tiny shapes: only names decide)."""
    c = {**FLUX_1_DEV_TRANSFORMER, "num_attention_heads": 1, "attention_head_dim": 2,
         "in_channels": 4, "joint_attention_dim": 2, "pooled_projection_dim": 2,
         "num_layers": 2, "num_single_layers": 2, "guidance_embeds": guidance}
    tensors = {k: torch.zeros(1) for k in bfl_checkpoint(c, "cpu")}
    save_file(tensors, str(path))
    return path


def test_bfl_single_files_are_told_apart_by_their_tensor_names(tmp_path):
    from lorapipe.diffusion.models import load_base

    dev = _bfl_names_file(tmp_path / "flux1-dev.safetensors", True)
    schnell = _bfl_names_file(tmp_path / "flux1-schnell.safetensors", False)
    for path, variant in ((dev, "dev"), (schnell, "schnell")):
        family = families.detect(path, path.name)
        assert family.name == "flux"
        assert family.single_file_variant(families.single_file_keys(path, path.name)) == variant
    # ComfyUI's full checkpoints prefix the transformer's names
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in load_file(dev).items()},
              str(prefixed))
    assert families.detect(prefixed, prefixed.name).name == "flux"
    # the transformer file alone cannot make a pipeline: model.config must name a folder
    with pytest.raises(LorapipeError, match="set model.config to a diffusers FLUX.1 folder"):
        load_base(str(dev))


def test_dev_and_schnell_folders_train(tmp_path, example_processed):
    """A saved FluxPipeline folder loads as Flux (dev: guidance input; schnell: none, T5 at
    256 tokens where its tokenizer allows), and both train a LoRA."""
    from lorapipe.diffusion.cache import encode_dataset, save_cache
    from lorapipe.diffusion.models import load_base

    for variant, guidance in (("dev", True), ("schnell", False)):
        folder = tmp_path / variant
        pipe = build_tiny_flux(guidance_embeds=guidance)
        pipe.tokenizer_2.model_max_length = 512
        pipe.save_pretrained(folder)
        base = load_base(str(folder))
        assert base.family.name == "flux" and base.family.variant == variant
        assert base.family.t5_tokens == {"dev": 512, "schnell": 256}[variant]
        assert base.family.base_version(base.pipe)["architecture"] == f"flux-1-{variant}"
        # a short T5 length for this test's speed: the folder's tokenizer says 64
        pipe.tokenizer_2.model_max_length = 64
        pipe.save_pretrained(folder)
        cache = encode_dataset(load_base(str(folder)).pipe, example_processed, 8)
        save_cache(cache, tmp_path / f"cache-{variant}", str(folder))
        (tmp_path / f"run-{variant}").mkdir()
        result = train_in(tmp_path / f"run-{variant}", tmp_path / f"cache-{variant}",
                          train__max_steps=6, train__validation__every=3,
                          model__base=str(folder))
        s = result.summary
        assert s["model"]["family"] == "flux" and s["steps"] == 6
