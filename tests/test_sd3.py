"""SD3 / SD3.5 on the builtin tiny SD3 (SD3.5-medium-shaped): its shape and the conditioning
its pipeline computes, the objective's fixed shift, training, the diffusers file loaded back
as users load it, the kohya (networks.lora_sd3) file applied the way ComfyUI applies it and
converted by diffusers' own single-file converter, its names against the real SD3.5 large and
medium transformers built without weights, and Stability's single files."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import SD3, WEBUI_FILE, make_params, run_dirs, train_in
from lorapipe.diffusion import families
from lorapipe.diffusion.families import sd3
from lorapipe.diffusion.families.sd3 import (
    SD35_LARGE_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    build_tiny_sd3,
)
from lorapipe.diffusion.objectives import FlowMatching, FlowSettings
from stages import sample as sample_stage

# the q/k norms and the patch embedding: the MMDiT's tensors that are not Linear layers
_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q",
          "attn.norm_added_k": "context_block.attn.ln_k",
          "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}


def mmdit_checkpoint(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer's tensors in Stability's reference layout (what
    sd3.5_large.safetensors holds), through the family's module table: q, k and v fused, the
    swapped modulations swapped back. diffusers' converter turning it back into exactly
    the diffusers tensors is what proves the table (test below)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = tensor
            continue
        if module == "pos_embed.proj":
            out[f"x_embedder.proj.{kind}"] = tensor
            continue
        block, _, rest = module.removeprefix("transformer_blocks.").partition(".")
        if rest in _NORMS:
            out[f"joint_blocks.{block}.{_NORMS[rest]}.{kind}"] = tensor
            continue
        original, part, parts, swapped = sd3.mmdit_module(module, num_layers)
        if swapped:
            first, second = tensor.chunk(2, dim=0)
            tensor = torch.cat([second, first], dim=0)
        fused.setdefault(f"{original}.{kind}", {})[part] = tensor
    for key, members in fused.items():
        out[key] = torch.cat([members[i] for i in sorted(members)], dim=0)
    return out


def _meta_transformer(config: dict) -> SD3Transformer2DModel:
    with torch.device("meta"):
        return SD3Transformer2DModel(**config)


def _probe(transformer, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = transformer.config
    x = torch.randn(2, 16, 8, 8, generator=gen)
    kw = dict(encoder_hidden_states=torch.randn(2, 9, c.joint_attention_dim, generator=gen),
              pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=gen),
              timestep=torch.tensor([300.0, 800.0]))
    transformer.eval()
    with torch.no_grad():
        return transformer(hidden_states=x, **kw).sample


def test_tiny_sd3_is_sd35_medium_shaped_and_encodes_as_its_pipeline(example_cache_sd3):
    from lorapipe.diffusion.cache import load_cache

    pipe = build_tiny_sd3()
    t = pipe.transformer.config
    assert (t.num_layers, tuple(t.dual_attention_layers), t.qk_norm, t.patch_size) == (
        2, (0,), "rms_norm", 2)
    assert t.caption_projection_dim == t.num_attention_heads * t.attention_head_dim
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    cache = load_cache(example_cache_sd3)
    assert cache.meta["family"] == "sd3"
    everything = torch.cat([t.flatten() for t in cache.latents.buckets.values()])
    assert abs(everything.mean().item()) < 0.1 and 0.8 < everything.std().item() < 1.2
    n = len(cache.files)
    # 77 CLIP tokens then 64 T5 tokens (the builtin's T5 length), T5's width
    assert cache.cond["text_states"].shape == (n, 77 + 64, 96)
    assert cache.cond["pooled"].shape == (n, 32 + 48)
    embeds, _, pooled, _ = pipe.encode_prompt(cache.captions[:2], None, None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=64)
    torch.testing.assert_close(cache.cond["text_states"][:2], embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.cond["pooled"][:2], pooled, atol=1e-5, rtol=0)


def test_noise_levels_take_the_bases_fixed_shift():
    """train.flow.resolution_shift on SD3 is its scheduler's fixed shift 3 (Flux's depends on
    the token count): the default sigmoid draw is then SD3's logit-normal + shift 3."""
    settings = FlowSettings(timestep_sampling="sigmoid", logit_mean=0.0, logit_std=1.0,
                            sigmoid_scale=1.0, shift=1.0, resolution_shift=True,
                            weighting="none", guidance=1.0)
    objective = FlowMatching(build_tiny_sd3().scheduler, settings)
    for shape in ((4096, 16, 8, 8), (4096, 16, 64, 64)):  # the same at every size
        sigmas = objective.sample_timesteps(4096, torch.Generator().manual_seed(0), shape)
        u = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
        torch.testing.assert_close(sigmas, 3 * u / (1 + 2 * u))
    assert sigmas.median().item() == pytest.approx(0.75, abs=0.02)  # 3 x 0.5 / (1 + 1)


@pytest.fixture(scope="module")
def sd3_trained(tmp_path_factory, example_cache_sd3):
    root = tmp_path_factory.mktemp("sd3")
    result = train_in(root, example_cache_sd3, train__max_steps=40, lora__targets="kohya",
                      lora__text_encoder=True, train__learning_rate=5e-3, **SD3)
    return root, result


def test_sd3_trains_both_clips_and_reports_sd3(sd3_trained):
    root, result = sd3_trained
    s = result.summary
    assert s["model"]["family"] == "sd3" and s["fixed_loss_end"] < s["fixed_loss_start"]
    assert {"transformer", "text_encoder", "text_encoder_2"} <= set(result.models)
    assert "text_encoder_3" not in result.models  # T5 never gets a LoRA
    assert (root / "logs/train.log").read_text().startswith("train: sd3 base builtin:tiny-sd3;")


def test_sd3_lora_loads_back_in_the_sd3_pipeline(sd3_trained):
    """The diffusers file, loaded with StableDiffusion3Pipeline.load_lora_weights, computes
    exactly the trained model; the two CLIPs get theirs."""
    root, result = sd3_trained
    trained = _probe(result.models["transformer"])
    pipe = build_tiny_sd3()
    assert not torch.allclose(_probe(pipe.transformer), trained)
    pipe.load_lora_weights(str(root / "lora"))
    assert torch.equal(_probe(pipe.transformer), trained)
    for name in ("text_encoder", "text_encoder_2"):
        assert any("lora" in n for n, _ in getattr(pipe, name).named_parameters()), name


def test_continuing_reads_the_diffusers_file_and_names_the_webui_one(tmp_path, sd3_trained,
                                                                    example_cache_sd3):
    """lora.init from the diffusers file continues the trained model; the kohya file, which
    diffusers cannot read for SD3, is refused with what to use."""
    from lorapipe.core.errors import LorapipeError

    root, result = sd3_trained
    a, b = run_dirs(tmp_path, "a", "b")
    common = dict(lora__targets="kohya", lora__text_encoder=True, train__max_steps=1,
                  train__learning_rate=1e-12, **SD3)
    cont = train_in(a, example_cache_sd3, lora__init=str(root / "lora"),
                    **common)
    torch.testing.assert_close(_probe(cont.models["transformer"]),
                               _probe(result.models["transformer"]), rtol=1e-4, atol=1e-5)
    with pytest.raises(LorapipeError, match="is a kohya/WebUI file, which diffusers cannot"):
        train_in(b, example_cache_sd3,
                 lora__init=str(root / "lora" / WEBUI_FILE), **common)


def test_the_reference_layout_table_is_diffusers_converters_inverse():
    """On the real SD3.5 large and medium transformers (meta device) and the tiny one:
    diffusers' own single-file converter turns mmdit_checkpoint's layout back into exactly
    the diffusers tensors, so the module table the WebUI export uses names Stability's
    modules."""
    tiny = build_tiny_sd3().transformer
    real = tiny.state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers(
        mmdit_checkpoint(real, tiny.config.num_layers))
    assert back.keys() == real.keys() and all(torch.equal(back[k], real[k]) for k in real)
    for config in (SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER):
        state = _meta_transformer(config).state_dict()
        back = convert_sd3_transformer_checkpoint_to_diffusers(
            mmdit_checkpoint(state, config["num_layers"]))
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


def test_the_webui_file_applied_as_comfyui_does_is_the_trained_model(sd3_trained):
    """ComfyUI adds up @ down * alpha / rank of each lora_unet_<MMDiT module> to that
    reference weight: done here on the tiny base's reference layout, then converted with
    diffusers' converter, the transformer computes what training left."""
    root, result = sd3_trained
    base = build_tiny_sd3().transformer
    checkpoint = mmdit_checkpoint(base.state_dict(), base.config.num_layers)
    tensors = load_file(root / "lora" / WEBUI_FILE)
    modules = {k.split(".")[0] for k in tensors if k.startswith("lora_unet_")}
    by_name = {k.removesuffix(".weight").replace(".", "_"): k for k in checkpoint
               if k.endswith(".weight")}
    assert modules <= {f"lora_unet_{n}" for n in by_name}
    for module in modules:
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        alpha = tensors[f"{module}.alpha"].item()
        key = by_name[module.removeprefix("lora_unet_")]
        checkpoint[key] = checkpoint[key] + up @ down * (alpha / down.shape[0])
    merged = SD3Transformer2DModel(**base.config)
    merged.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(checkpoint))
    torch.testing.assert_close(_probe(merged), _probe(result.models["transformer"]),
                               atol=2e-5, rtol=1e-4)
    # the last block's text-side modulation and the final one are stored swapped
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1" in modules
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in tensors)


@pytest.mark.parametrize("config", [SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER],
                         ids=["sd3.5-large", "sd3.5-medium"])
@pytest.mark.parametrize("preset", ["attn", "kohya"])
def test_webui_names_are_the_real_sd35_modules(config, preset):
    """The real transformer without weights: every module of the kohya file is a Linear of
    the reference MMDiT (the layout diffusers' converter reads, above) with its shapes; q, k
    and v in one module each."""
    transformer = _meta_transformer(config)
    suffixes = sd3.FAMILY.targets(preset)["transformer"]
    rank, gen, state = 4, torch.Generator().manual_seed(0), {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") \
                and any(name.endswith("." + s) for s in suffixes):
            state[name] = (torch.randn(rank, module.in_features, generator=gen),
                           torch.randn(module.out_features, rank, generator=gen))
    tensors = sd3.FAMILY.to_webui(state, float(rank), transformer.config)
    shapes = {k.removesuffix(".weight").replace(".", "_"): tuple(v.shape)
              for k, v in mmdit_checkpoint(transformer.state_dict(),
                                           config["num_layers"]).items()
              if k.endswith(".weight")}
    modules = {k.removeprefix("lora_unet_").split(".")[0] for k in tensors}
    assert modules <= set(shapes)
    for module in modules:
        down = tensors[f"lora_unet_{module}.lora_down.weight"]
        up = tensors[f"lora_unet_{module}.lora_up.weight"]
        assert (up.shape[0], down.shape[1]) == shapes[module], module
        assert tensors[f"lora_unet_{module}.alpha"].item() / down.shape[0] == 1.0
    layers, dual = config["num_layers"], len(config["dual_attention_layers"])
    # per block: x qkv + proj, context qkv (+ proj but in the last), MMDiT-X's attn2 qkv + proj
    attn = 4 * layers - 1 + 2 * dual
    # kohya: + both MLPs (fc1, fc2; none on the last block's text side) and modulations
    expected = attn if preset == "attn" else attn + 2 * layers + 2 * (layers - 1) + 2 * layers
    assert len(modules) == expected


def test_a_stability_single_file_trains_and_samples(tmp_path, example_processed, monkeypatch):
    """What users have: sd3.5_medium.safetensors, the MMDiT in Stability's layout (ComfyUI's
    model.diffusion_model. prefix), with model.config naming a diffusers SD3 folder for the
    text encoders and VAE: detected as SD3, loaded to the same weights, trained, sampled."""
    from lorapipe.diffusion.cache import encode_dataset, save_cache
    from lorapipe.diffusion.models import load_pipeline

    pipe = build_tiny_sd3()
    pipe.save_pretrained(tmp_path / "sd3-config")
    checkpoint = mmdit_checkpoint(pipe.transformer.state_dict(), 2)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in checkpoint.items()},
              str(tmp_path / "sd3.5_tiny.safetensors"))
    assert families.detect(tmp_path / "sd3.5_tiny.safetensors", "x") is sd3.FAMILY
    base = {"model__base": str(tmp_path / "sd3.5_tiny.safetensors"),
            "model__config": str(tmp_path / "sd3-config")}
    loaded = load_pipeline(base["model__base"], base["model__config"])
    want, got = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(Exception, match="set model.config to a diffusers SD3"):
        load_pipeline(base["model__base"])
    save_cache(encode_dataset(loaded, example_processed, batch_size=8), tmp_path / "cache",
               base["model__base"])
    result = train_in(tmp_path, tmp_path / "cache", train__max_steps=4, **base)
    assert result.summary["model"]["family"] == "sd3"
    with safe_open(str(tmp_path / "lora" / WEBUI_FILE), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_network_module"]) == ("sd3",
                                                                          "networks.lora_sd3")
    assert meta["modelspec.architecture"] == "stable-diffusion-3.5-medium/lora"
    assert "modelspec.prediction_type" not in meta

    make_params(tmp_path, sample__steps=2, sample__images_per_prompt=1, **base)
    monkeypatch.chdir(tmp_path)
    assert sample_stage.main(["--lora", "lora", "--out", "samples", "--logs", "slogs"]) == 0
    assert (tmp_path / "samples/grid.png").exists()
