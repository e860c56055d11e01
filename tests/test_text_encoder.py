"""Text-encoder LoRA, the lora.targets presets and caption handling: the text-encoder LoRA
learns, reloads exactly in diffusers, exports the names WebUI loaders map for the real text
encoders, continues (or refuses to drop) a text-encoder part; captions change per step,
deterministically."""

from __future__ import annotations

import csv
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import SDXL, WEBUI_FILE, train_in
from lorapipe.core import adapters
from lorapipe.core.errors import LorapipeError
from lorapipe.core.params import ParamsError
from lorapipe.diffusion import captions, families, lora
from lorapipe.diffusion.cache import load_cache
from lorapipe.diffusion.sampling import SampleSettings, generate
from lorapipe.tasks import load_params

STEPS = 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory, example_cache):
    """The same 100 steps with and without the text-encoder LoRA."""
    out = {}
    for name, te in (("unet", False), ("te", True)):
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, train_in(root, example_cache, lora__text_encoder=te,
                                    train__max_steps=STEPS, train__validation__every=25))
    return out


def lr_series(root, name: str) -> list[float]:
    with open(root / f"dvclive/plots/metrics/lr/{name}.tsv", encoding="utf-8") as f:
        return [float(r[name]) for r in csv.DictReader(f, delimiter="\t")]


def test_text_encoder_lora_learns_faster_than_unet_only(runs, example_cache):
    (unet_root, unet_only), (te_root, te) = runs["unet"], runs["te"]
    # the same data, seed and steps: the text-encoder LoRA lowers both fixed-noise losses more
    assert te.summary["loss"]["train"] < unet_only.summary["loss"]["train"]
    assert te.summary["loss"]["val"] < unet_only.summary["loss"]["val"]
    # its weights moved from their zero start, and the conditioning it gives changed
    encoder = te.models["text_encoder"]
    ups = [v for k, v in adapters.peft_state(encoder).items() if "lora_B" in k]
    assert len(ups) == 8 and all(v.abs().max() > 0 for v in ups)
    ids = load_cache(example_cache).tokens["text_encoder"][:4]
    sd = families.by_name("sd")
    with torch.no_grad():
        trained = sd.encode_tokens({"text_encoder": encoder.eval()}, {"text_encoder": ids})
        with _off(encoder):
            base = sd.encode_tokens({"text_encoder": encoder}, {"text_encoder": ids})
    assert (trained["text_states"] - base["text_states"]).abs().max() > 1e-3
    # kohya's learning-rate names, each group at its own rate
    assert set(lr_series(te_root, "textencoder")) == {5e-4}
    assert set(lr_series(te_root, "unet")) == {1e-3}
    assert not (unet_root / "dvclive/plots/metrics/lr/textencoder.tsv").exists()
    # the first lines say where the LoRA sits and how text is encoded
    log = (te_root / "logs/train.log").read_text()
    assert ("lora.targets preset attn: 40 modules (32 unet, 8 text_encoder); text encoder lr "
            "0.0005; text encoded per step from the cached token ids") in log
    assert "preset attn: 32 modules (32 unet)" in (unet_root / "logs/train.log").read_text()


class _off:
    """peft layers switched off for a `with` block (transformers' disable_adapters)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.disable_adapters()

    def __exit__(self, *exc):
        self.model.enable_adapters()


def test_webui_metadata_of_a_text_encoder_lora(runs):
    root, _ = runs["te"]
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert sum(k.startswith("lora_te_text_model_encoder_layers_") for k in keys) == 8 * 3
    assert meta["ss_text_encoder_lr"] == "0.0005" and meta["ss_unet_lr"] == "0.001"
    assert meta["ss_network_train_unet_only"] == "False"
    # `attn` in kohya's network_args: what its default network would add, excluded
    assert json.loads(meta["ss_network_args"]) == {
        "exclude_patterns": "['.*(proj_in|proj_out|ff[._]net|mlp[._]fc).*']"}
    assert meta["ss_shuffle_caption"] == "False" and meta["ss_caption_dropout_rate"] == "0.0"
    unet_root, _ = runs["unet"]
    with safe_open(str(unet_root / "lora" / WEBUI_FILE), "pt") as f:
        unet_meta = f.metadata()
    assert unet_meta["ss_network_train_unet_only"] == "True"
    assert unet_meta["ss_text_encoder_lr"] == "0"


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def kohya_run(request, tmp_path_factory):
    """Text-encoder LoRA on the kohya preset, with every caption option on."""
    family = request.param
    cache = request.getfixturevalue("example_cache" if family == "sd" else "example_cache_sdxl")
    root = tmp_path_factory.mktemp(f"kohya-{family}")
    result = train_in(
        root, cache, lora__targets="kohya", lora__text_encoder=True, lora__alpha=8,
        train__max_steps=15, train__learning_rate=5e-3, train__text_encoder_lr=5e-3,
        train__captions={"shuffle": True, "keep_tokens": 1, "dropout": 0.2,
                         "tag_dropout": 0.2},
        **(SDXL if family == "sdxl" else {}))
    return families.by_name(family), cache, root, result


def conditioning(family, encoders: dict, ids: dict) -> dict:
    for encoder in encoders.values():
        encoder.eval()
    with torch.no_grad():
        return family.encode_tokens(encoders, ids)


@pytest.mark.parametrize("source", ["folder", "webui"])
def test_kohya_preset_lora_reloads_exactly_in_diffusers(kohya_run, source):
    """Both files, loaded by the family's pipeline as users load them, give the trained
    text conditioning and the trained UNet output (1x1-conv proj_in of SD 1.x included)."""
    from test_lora import unet_output as sd_unet_output
    from test_sdxl import unet_output as sdxl_unet_output

    family, cache, root, result = kohya_run
    ids = {k: v[:4] for k, v in load_cache(cache).tokens.items()}
    trained = conditioning(family, {n: result.models[n] for n in family.text_encoders}, ids)
    pipe = family.build_builtin()
    base = conditioning(family, family.encoders_of(pipe), ids)
    assert (trained["text_states"] - base["text_states"]).abs().max() > 1e-3

    pipe.load_lora_weights(str(root / "lora" / (WEBUI_FILE if source == "webui" else "")))
    loaded = conditioning(family, family.encoders_of(pipe), ids)
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-5, atol=1e-6)
    unet_output = sd_unet_output if family.name == "sd" else sdxl_unet_output
    torch.testing.assert_close(unet_output(pipe.unet), unet_output(result.models["unet"]),
                               rtol=1e-5, atol=1e-6)
    if source == "folder":  # the sample stage's switches reach the text encoders too
        plain = family.build_builtin()
        # loading a LoRA freezes the base weights, and torch's CPU linear on a permuted
        # input takes another kernel (other rounding, 6e-7) when the weight needs no grad:
        # the plain pipeline is frozen the same way so that the images compare exactly
        for component in plain.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        for each in (pipe, plain):
            each.set_progress_bar_config(disable=True)
        s = SampleSettings(steps=2, guidance_scale=7.5, negative_prompt="", width=64,
                           height=64, lora_scale=1.0)
        prompt = "a red circle, lpstyle"
        base = np.asarray(generate(plain, prompt, 1, s, lora=True))
        assert np.array_equal(np.asarray(generate(pipe, prompt, 1, s, lora=False)), base)
        assert np.array_equal(np.asarray(generate(
            pipe, prompt, 1, dataclasses.replace(s, lora_scale=0.0), lora=True)), base)
        assert not np.array_equal(np.asarray(generate(pipe, prompt, 1, s, lora=True)), base)


def test_kohya_preset_run_says_what_it_trains(kohya_run):
    family, _, root, _ = kohya_run
    log = (root / "logs/train.log").read_text()
    modules = {"sd": "60 modules (48 unet, 12 text_encoder)",
               "sdxl": "210 modules (192 unet, 6 text_encoder, 12 text_encoder_2)"}[family.name]
    assert (f"lora.targets preset kohya: {modules}; text encoder lr 0.005; captions: shuffled "
            "tags (first 1 kept), tag dropout 0.2, caption dropout 0.2, tokenized and encoded "
            "per step") in log, log
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert json.loads(meta["ss_network_args"]) == {}  # kohya's default network
    assert meta["ss_shuffle_caption"] == "True" and meta["ss_keep_tokens"] == "1"
    assert meta["ss_caption_dropout_rate"] == "0.2"
    assert meta["ss_caption_tag_dropout_rate"] == "0.2"
    prefixes = {"sd": {"lora_te", "lora_unet"},
                "sdxl": {"lora_te1", "lora_te2", "lora_unet"}}[family.name]
    assert {k.split("_text_model")[0].split("_down_blocks")[0].split("_up_blocks")[0]
            .split("_mid_block")[0].split("_input_blocks")[0].split("_output_blocks")[0]
            .split("_middle_block")[0] for k in keys} == prefixes
    # SDXL reads the penultimate layer of its first encoder: its last layer gets no LoRA
    if family.name == "sdxl":
        assert not any(k.startswith("lora_te1_text_model_encoder_layers_1_") for k in keys)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_1_") for k in keys)


# The text encoders' real configs (openai/clip-vit-large-patch14 is SD 1.5's and SDXL's
# first; OpenCLIP ViT-bigG/14 is SDXL's second, as diffusers' text_encoder_2/config.json)
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
          "hidden_act": "quick_gelu"}
CLIP_BIGG = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
             "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
             "hidden_act": "gelu", "projection_dim": 1280}
# how A1111, ComfyUI and kohya name a text-encoder LoRA module: their loaders' tables
CLIP_MODULES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                "mlp_fc1", "mlp_fc2")


@pytest.mark.parametrize("family_name, encoders", [
    ("sd", {"text_encoder": ("lora_te_", CLIP_L, 12)}),
    ("sdxl", {"text_encoder": ("lora_te1_", CLIP_L, 11),  # penultimate layer read
              "text_encoder_2": ("lora_te2_", CLIP_BIGG, 32)}),
])
def test_webui_names_cover_the_real_text_encoders(family_name, encoders):
    """The real encoders built without weights, the kohya preset: every exported name is
    one the WebUI loaders map, for every layer the conditioning uses, with the real
    modules' shapes."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = families.by_name(family_name)
    models, shapes = {}, {}
    with torch.device("meta"):
        for name, (_, config, _) in encoders.items():
            cls = CLIPTextModelWithProjection if "projection_dim" in config else CLIPTextModel
            models[name] = cls(CLIPTextConfig(**config))
    for name, model in models.items():
        for module, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear):
                shapes[(name, lora.portable_text_name(module).replace(".", "_"))] = (
                    layer.out_features, layer.in_features)
    lp = adapters.Shape(targets="kohya", text_encoder=True)
    configs = lora.configs_for(lp, family, {"unet": None, **models})
    del configs["unet"]
    lora.attach(models, configs)
    tensors = lora.to_kohya(adapters.adapter_state(models), configs, family, None)
    for name, (prefix, _, layers) in encoders.items():
        expected = {f"{prefix}text_model_encoder_layers_{i}_{m}"
                    for i in range(layers) for m in CLIP_MODULES}
        exported = {k.split(".")[0] for k in tensors if k.startswith(prefix)}
        assert exported == expected, sorted(exported ^ expected)[:4]
        for key, tensor in tensors.items():
            module, kind = key.split(".", 1)
            if not module.startswith(prefix) or kind == "alpha":
                continue
            out_features, in_features = shapes[(name, module.removeprefix(prefix))]
            assert tensor.shape == ((4, in_features) if kind == "lora_down.weight"
                                    else (out_features, 4)), key


def test_kohya_unet_preset_is_every_linear_and_1x1_conv_of_the_transformer_blocks():
    """SD 1.5's real UNet config without weights: the kohya preset wraps exactly the Linear
    and 1x1 Conv2d modules inside its Transformer2DModels (kohya's 192), attn its 128."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    sd15 = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
    sd = families.by_name("sd")
    counts = {}
    for preset in ("attn", "kohya"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**sd15)
        inside = {f"{name}.{sub}" for name, block in unet.named_modules()
                  if isinstance(block, Transformer2DModel)
                  for sub, m in block.named_modules()
                  if isinstance(m, torch.nn.Linear)
                  or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))}
        config = lora.lora_config(adapters.Shape(), sd.targets(preset)["unet"])
        counts[preset] = lora.attach({"unet": unet}, {"unet": config})["unet"]
        wrapped = {k.removeprefix("unet.").rsplit(".", 2)[0]
                   for k in adapters.adapter_state({"unet": unet})}
        assert wrapped <= inside
        if preset == "kohya":
            assert wrapped == inside
    assert counts == {"attn": 128, "kohya": 192}


def test_init_continues_a_text_encoder_lora_or_says_which_key_to_set(runs):
    (te_root, te), (unet_root, _) = runs["te"], runs["unet"]
    sd = families.by_name("sd")
    for source in (te_root / "lora", te_root / "lora" / WEBUI_FILE):
        # text encoder on: every part continues exactly where the run ended
        pipe = sd.build_builtin()
        models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        lp = adapters.Shape(targets="attn", text_encoder=True)
        configs = lora.configs_for(lp, sd, models)
        lora.attach(models, configs)
        assert lora.load_init(models, str(source), configs, sd) == []
        state, trained = adapters.adapter_state(models), adapters.adapter_state(te.models)
        assert set(state) == set(trained) and len(state) == 2 * 40
        for key, value in trained.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=1e-7)
        # text encoder off: a clear error, never a silent drop of half the LoRA
        pipe = sd.build_builtin()
        unet_only = {"unet": pipe.unet}
        configs = lora.configs_for(dataclasses.replace(lp, text_encoder=False), sd,
                                   unet_only)
        lora.attach(unet_only, configs)
        with pytest.raises(LorapipeError, match=r"also holds a text-encoder LoRA \(16 tensors: "
                           r"text_encoder\).*set lora.text_encoder: true"):
            lora.load_init(unet_only, str(source), configs, sd)
    # a UNet-only LoRA continued with the text encoder on: its text-encoder LoRA starts fresh
    pipe = sd.build_builtin()
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    configs = lora.configs_for(lp, sd, models)
    lora.attach(models, configs)
    notes = lora.load_init(models, str(unet_root / "lora"), configs, sd)
    assert notes == [f"lora.init: {unet_root / 'lora'} has no text_encoder LoRA; the "
                     "text_encoder LoRA starts fresh"]
    assert all(v.abs().max() == 0 for k, v in adapters.peft_state(pipe.text_encoder).items()
               if "lora_B" in k)


def settings(**kw):
    base = {"shuffle": False, "keep_tokens": 0, "dropout": 0.0, "tag_dropout": 0.0}
    return SimpleNamespace(**{**base, **kw})


def augmented(caption: str, p, seed: int) -> str:
    return captions.augment(caption, p, torch.Generator().manual_seed(seed))


def test_caption_options_are_kohyas_and_a_pure_function_of_the_seed():
    caption = "lpstyle, 1girl, red hair, smile, outdoors, looking at viewer"
    tags = [t.strip() for t in caption.split(",")]
    p = settings(shuffle=True, keep_tokens=1)
    outs = [augmented(caption, p, seed) for seed in range(20)]
    assert outs == [augmented(caption, p, seed) for seed in range(20)]  # deterministic
    assert len(set(outs)) > 10  # and shuffled
    for out in outs:
        parts = out.split(", ")
        assert parts[0] == "lpstyle" and sorted(parts) == sorted(tags)  # kept first, all there
    assert not captions.active(settings())
    assert augmented(caption, settings(), 0) == ", ".join(tags)  # off: the caption as is
    assert augmented(caption, settings(dropout=1.0), 0) == ""
    assert augmented(caption, settings(tag_dropout=1.0, keep_tokens=2), 0) == "lpstyle, 1girl"
    dropped = [augmented(caption, settings(tag_dropout=0.5, keep_tokens=1), s) for s in range(50)]
    lengths = [len(d.split(", ")) for d in dropped]
    assert min(lengths) >= 1 and 2 < sum(lengths) / len(lengths) < 5  # ~half of 5 tags + 1
    assert all(d.startswith("lpstyle") for d in dropped)


def test_targets_presets_in_params(tmp_path):
    from conftest import make_params

    assert make_params(tmp_path, lora__targets="kohya").lora.targets == "kohya"
    assert make_params(tmp_path, lora__targets=["to_q", "to_v"]).lora.targets == ["to_q", "to_v"]
    with pytest.raises(ParamsError, match=r"lora.targets must be a preset \(attn, kohya, "
                       r"all-linear\) or a list of module names, got 'atn'; did you mean attn\?"):
        make_params(tmp_path, lora__targets="atn")
    with pytest.raises(ParamsError, match=r"lora.targets preset all-linear is not one of "
                       r"task_type sd's: attn, kohya"):
        make_params(tmp_path, lora__targets="all-linear")
    assert load_params().lora.targets == "attn"
