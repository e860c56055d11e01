"""lora.method (DoRA, LoHa, LoKr), LoCon and the optimizers: each trains healthy, exports
files its clients load with the trained output (diffusers or peft, and LyCORIS's own modules
for the WebUI file), survives a kill with the same bytes, and the params checks and the
health advice know them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_lora import unet_output

from conftest import REPO, SAME_DATA_DIR, WEBUI_FILE, make_params, train_in
from lorapipe.core import adapters, compat, health, optimizers
from lorapipe.core.params import ParamsError
from lorapipe.diffusion import compat as image_compat
from lorapipe.diffusion import families, lora

SD = families.by_name("sd")
# short runs that still pass health's 50 steps and 5% fall; every method learns in them
HEALTHY = {"train__max_steps": 60, "train__validation__every": 20,
           "train__learning_rate": 5e-3}
METHODS = {"dora": {"lora__method": "dora"},
           "loha": {"lora__method": "loha", "lora__text_encoder": True},
           # alpha != rank: LoKr's full factors carry peft's scale (2) into the WebUI file
           "lokr": {"lora__method": "lokr", "lora__lokr_factor": 4, "lora__alpha": 8},
           "locon": {"lora__conv_rank": 4, "lora__conv_alpha": 2}}


@pytest.fixture(scope="module", params=sorted(METHODS))
def method_run(request, tmp_path_factory, example_cache):
    root = tmp_path_factory.mktemp(f"method-{request.param}")
    result = train_in(root, example_cache, health_report=root / "health.md",
                      **HEALTHY, **METHODS[request.param])
    return request.param, root, result


def test_each_method_trains_healthy_and_says_where_it_loads(method_run):
    name, root, result = method_run
    assert result.summary["health"]["status"] == "healthy", result.summary
    params = make_params(root, **HEALTHY, **METHODS[name], **SAME_DATA_DIR)
    expected = image_compat.rows(image_compat.from_params(params, REPO))
    found = image_compat.rows(image_compat.from_files(root / "lora", "sd", WEBUI_FILE))
    assert compat.disagreements(expected, found) == []
    status = {r.client: r.status for r in found}
    assert status == {"lora": {}, "dora": {"diffusers": "ok", "ComfyUI": "caveat",
                                           "A1111/Forge": "no", "kohya": "caveat"},
                      "loha": {"diffusers": "caveat", "ComfyUI": "ok", "A1111/Forge": "ok",
                               "kohya": "caveat"},
                      "lokr": {"diffusers": "caveat", "ComfyUI": "ok", "A1111/Forge": "ok",
                               "kohya": "caveat"},
                      "locon": {"diffusers": "ok", "ComfyUI": "ok", "A1111/Forge": "ok",
                                "kohya": "ok"}}[name]


def test_each_method_reloads_with_the_trained_output(method_run):
    """diffusers' load_lora_weights (LoRA, DoRA) or peft's PeftModel (LoHa, LoKr) on a fresh
    base, and the sample stage's loader, give the trained UNet's output."""
    name, root, result = method_run
    trained = unet_output(result.models["unet"])
    base = unet_output(SD.build_builtin().unet)
    assert (trained - base).abs().max() > 1e-3
    pipe = SD.build_builtin()
    if name in ("loha", "lokr"):
        assert not (root / "lora" / lora.DIFFUSERS_FILE).exists()
        peft_unet = PeftModel.from_pretrained(pipe.unet, str(root / "lora" / "unet"))
        torch.testing.assert_close(unet_output(peft_unet), trained, rtol=1e-5, atol=1e-6)
        pipe = SD.build_builtin()
    else:
        pipe.load_lora_weights(str(root / "lora"))
        torch.testing.assert_close(unet_output(pipe.unet), trained, rtol=1e-5, atol=1e-6)
        pipe = SD.build_builtin()
    lora.load_into(pipe, str(root / "lora"))
    torch.testing.assert_close(unet_output(pipe.unet), trained, rtol=1e-5, atol=1e-6)
    pipe.disable_lora()  # the sample stage's base image: the switch reaches every method
    torch.testing.assert_close(unet_output(pipe.unet), base, rtol=0, atol=0)


def test_each_webui_file_rebuilds_the_trained_output_in_lycoris(method_run):
    """LyCORIS's own modules (what kohya's lycoris.kohya and the WebUI loaders follow),
    built from the WebUI file's tensors, compute what the trained UNet computes: LoHa's and
    LoKr's names and scale (LoKr's full factors), DoRA's output-axis dora_scale, LoCon's
    per-module alpha."""
    from lycoris.kohya import get_module, make_module

    name, root, result = method_run
    weights = load_file(str(root / "lora" / WEBUI_FILE))
    kinds = {k.split(".", 1)[1] for k in weights}
    assert kinds >= {"dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
                     "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                     "lokr": {"lokr_w1", "alpha"},
                     "locon": {"lora_down.weight", "lora_up.weight", "alpha"}}[name]
    pipe = SD.build_builtin()
    unet = pipe.unet
    modules = {f"lora_unet_{n}".replace(".", "_"): m for n, m in unet.named_modules()}
    modules.update({"lora_te_" + lora.portable_text_name(n).replace(".", "_"): m
                    for n, m in pipe.text_encoder.named_modules()})
    names = sorted({k.split(".")[0] for k in weights})
    assert set(names) <= set(modules)
    if name == "locon":
        assert "lora_unet_down_blocks_0_resnets_0_conv1" in names
        assert weights["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 2
        assert weights["lora_unet_down_blocks_0_resnets_0_conv_shortcut.alpha"].item() == 4 \
            if "lora_unet_down_blocks_0_resnets_0_conv_shortcut" in names else True
    for module_name in names:
        kind, tensors = get_module(weights, module_name)
        module = make_module(kind, tensors, module_name, modules[module_name])
        module.multiplier = 1.0
        module.apply_to()
    torch.testing.assert_close(unet_output(unet), unet_output(result.models["unet"]),
                               rtol=1e-4, atol=1e-5)
    if "text_encoder" in result.models:  # LoHa's text-encoder part, under lora_te_ names
        assert any(n.startswith("lora_te_") for n in names)
        ids = torch.arange(1, 20)[None]
        trained = result.models["text_encoder"].eval()
        with torch.no_grad():
            torch.testing.assert_close(pipe.text_encoder.eval()(ids)[0], trained(ids)[0],
                                       rtol=1e-4, atol=1e-5)


def test_lora_init_continues_each_method_exactly(method_run):
    """lora.init from the run's folder (every method) and from its WebUI file (LoHa, LoKr:
    LyCORIS's names and scale mapped back) starts from the trained output."""
    name, root, result = method_run
    params = make_params(root, **HEALTHY, **METHODS[name], **SAME_DATA_DIR)
    trained = unet_output(result.models["unet"])
    sources = [root / "lora"] + ([root / "lora" / WEBUI_FILE] if name in ("loha", "lokr")
                                 else [])
    for source in sources:
        pipe = SD.build_builtin()
        models = {"unet": pipe.unet, **({"text_encoder": pipe.text_encoder}
                                        if params.lora.text_encoder else {})}
        configs = lora.configs_for(params.lora, SD, models)
        lora.attach(models, configs, SD)
        assert lora.load_init(models, str(source), configs, SD) == []
        torch.testing.assert_close(unet_output(pipe.unet), trained, rtol=1e-5, atol=1e-6)
        if params.lora.text_encoder:  # the text encoder's part came back too
            state = adapters.adapter_state({"text_encoder": pipe.text_encoder})
            for key, value in adapters.adapter_state(
                    {"text_encoder": result.models["text_encoder"]}).items():
                torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method_run", ["dora"], indirect=True)
def test_a_dora_webui_file_is_refused_as_lora_init_not_continued_wrong(method_run):
    from lorapipe.core.errors import LorapipeError

    name, root, _ = method_run
    params = make_params(root, **HEALTHY, **METHODS[name], **SAME_DATA_DIR)
    unet = SD.build_builtin().unet
    configs = lora.configs_for(params.lora, SD, {"unet": unet})
    lora.attach({"unet": unet}, configs, SD)
    with pytest.raises(LorapipeError, match="holds no DoRA magnitudes.*models/lora folder"):
        lora.load_init({"unet": unet}, str(root / "lora" / WEBUI_FILE), configs, SD)


def test_a_webui_metadata_names_the_network_lycoris_reads(method_run):
    from safetensors import safe_open

    name, root, _ = method_run
    with safe_open(str(root / "lora" / WEBUI_FILE), "pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    if name == "locon":
        assert meta["ss_network_module"] == "networks.lora"
        assert args["conv_dim"] == "4" and args["conv_alpha"] == "2"
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == {"dora": "lora", "loha": "loha", "lokr": "lokr"}[name]


# -- the real architectures' names, on the meta device --------------------------------------


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
@pytest.mark.parametrize("method", ["dora", "loha", "lokr", "locon"])
def test_webui_names_and_shapes_fit_the_real_unet(family_name, method):
    """Every WebUI module of each method on SD 1.5's and SDXL 1.0's real UNets (built on the
    meta device from their configs) names a module of the original checkpoint layout, and
    the update its tensors rebuild (as the WebUI loaders rebuild it) has that module's
    weight shape."""
    from diffusers import UNet2DConditionModel

    from lorapipe.diffusion.families.sd import SD_1_5_UNET
    from lorapipe.diffusion.families.sdxl import SDXL_1_0_UNET

    family = families.by_name(family_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD_1_5_UNET if family_name == "sd"
                                       else SDXL_1_0_UNET))
    # the WebUI name of every Linear and Conv2d (SDXL: its SGM name, proven against
    # diffusers' own converter in test_sdxl) -> its weight's shape
    weights = {family.webui_module(n, unet.config): tuple(m.weight.shape)
               for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    shape = adapters.Shape(method="lora" if method == "locon" else method, rank=8, alpha=8,
                           conv_rank=4 if method == "locon" else 0, targets="kohya",
                           lokr_factor=8)
    configs = lora.configs_for(shape, family, {"unet": unet})
    lora.attach({"unet": unet}, configs, family)
    tensors = lora.to_kohya(adapters.adapter_state({"unet": unet}), configs, family, unet.config)
    modules = {}
    for key, tensor in tensors.items():
        module, kind = key.removeprefix("lora_unet_").split(".", 1)
        modules.setdefault(module, {})[kind] = tensor
    assert len(modules) > 100
    for module, parts in modules.items():
        assert module in weights, module
        out, rest = weights[module][0], weights[module][1:]
        assert _rebuilt_shape(parts) == (out, int(torch.Size(rest).numel())), (module, parts)
        if "dora_scale" in parts:
            assert tuple(parts["dora_scale"].shape) == (out, *[1] * len(rest))
    if method == "locon":  # the 3x3 convolutions of the resnets are there, at conv rank 4
        convs = [m for m, p in modules.items() if p["lora_down.weight"].dim() == 4
                 and tuple(p["lora_down.weight"].shape[2:]) == (3, 3)]
        assert convs and all(modules[m]["lora_down.weight"].shape[0] == 4 for m in convs)


def _rebuilt_shape(parts: dict) -> tuple[int, int]:
    """(out, in x kernel) of the update a WebUI loader rebuilds from one module's tensors."""
    if "lora_up.weight" in parts:
        return parts["lora_up.weight"].shape[0], int(parts["lora_down.weight"][0].numel())
    if "hada_w1_a" in parts:
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]
    w1 = parts.get("lokr_w1")
    w1 = w1.shape if w1 is not None else (parts["lokr_w1_a"].shape[0],
                                          parts["lokr_w1_b"].shape[1])
    w2 = parts.get("lokr_w2")
    w2 = (w2.shape[0], int(w2[0].numel())) if w2 is not None else (
        parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1])
    return w1[0] * w2[0], w1[1] * w2[1]


# -- params checks and advice ---------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"lora__method": "loha", "lora__dropout": 0.1}, "lora.dropout is LoRA's input dropout"),
    ({"task_type": "llm", "model__base": "builtin:tiny-llm", "lora__method": "lokr",
      "lora__rslora": True}, "lora.rslora scales a LoRA or DoRA update"),
    ({"task_type": "llm", "model__base": "builtin:tiny-llm", "lora__method": "dora",
      "lora__init_weights": "pissa"}, "lora.init_weights pissa starts a plain LoRA"),
    ({"lora__rslora": True}, "lora.rslora is for task_type llm"),
    ({"model__base": "builtin:tiny-flux", "lora__conv_rank": 4},
     "Flux.1's transformer has none; set lora.conv_rank to 0"),
    ({"task_type": "llm", "model__base": "builtin:tiny-llm", "lora__conv_rank": 4},
     "lora.conv_rank is for task_type sd"),
    ({"train__optimizer": "prodigy", "train__learning_rate": 1e-4},
     "train.learning_rate is 0.0001 with train.optimizer prodigy: Prodigy estimates"),
    ({"train__optimizer": "schedulefree", "train__lr_scheduler": "cosine"},
     "schedule-free AdamW replaces the schedule"),
    ({"train__schedulefree__warmup_steps": 10}, "train.schedulefree.warmup_steps is for"),
    ({"train__adafactor__warmup_init": True}, "warmup_init warms up Adafactor's relative step"),
    ({"train__optimizer": "adafactor", "train__adafactor__relative_step": True,
      "train__lr_scheduler": "cosine"}, "relative_step is Adafactor's own schedule"),
    ({"task_type": "llm", "model__base": "builtin:tiny-llm", "lora__init_weights": "olora",
      "lora__init": "."}, "lora.init continues an existing LoRA, which lora.init_weights olora"),
    ({"train__optimizer": "adamw9bit"}, "did you mean adamw8bit"),
])
def test_params_refuse_what_a_method_or_optimizer_cannot_do(tmp_path, overrides, message):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make_params(tmp_path, **overrides)


def test_advice_speaks_each_optimizers_language():
    prodigy = health.RunFacts(1.0, 4, 4, 16, optimizer="prodigy", d_coef=1.0)
    [remedy, *_] = health.diverged_remedies(prodigy)
    assert "lower train.prodigy.d_coef (1 -> 0.5)" in remedy.text
    assert remedy.changes == {"train.prodigy.d_coef": "0.5"}
    assert "learning_rate" not in remedy.changes
    adafactor = health.RunFacts(1e-3, 4, 4, 16, optimizer="adafactor", relative_step=True)
    assert "relative_step false" in health.step_size(adafactor, 0.5).text
    adamw = health.RunFacts(1e-3, 4, 4, 16)
    assert health.step_size(adamw, 2).changes == {"train.learning_rate": "0.002"}


def test_a_schedule_free_run_evaluates_samples_and_saves_its_averaged_weights(
        tmp_path, example_cache):
    """Every evaluation (early stopping's best state with it), every sample grid and the
    export happen with schedule-free's eval-mode weights, training steps with its others."""
    from accelerate.state import AcceleratorState, GradientState

    from lorapipe.core.training import Paths
    from lorapipe.tasks import stage

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    params = make_params(tmp_path, train__optimizer="schedulefree", train__max_steps=12,
                         train__validation__every=4, train__sample_every=6,
                         train__sample_steps=2, train__checkpoint_every=0, **SAME_DATA_DIR)
    recipe = stage(params, "train").recipe_class()(params, Paths(
        example_cache, tmp_path / "lora", tmp_path / "dvclive", tmp_path / "logs",
        tmp_path / "ckpt", None))
    recipe.setup()
    inner, seen = recipe.optimizer.optimizer, []

    def watch(what, call):
        def watched(*args):
            seen.append((what, inner.param_groups[0]["train_mode"]))
            return call(*args)
        return watched

    recipe.evaluate = watch("evaluate", recipe.evaluate)
    recipe.samples = watch("samples", recipe.samples)
    recipe.export = watch("export", recipe.export)
    recipe.loss_step = watch("step", recipe.loss_step)
    recipe.finish(recipe.train())
    assert {w for w, _ in seen} == {"evaluate", "samples", "export", "step"}
    assert all(mode == (what == "step") for what, mode in seen), seen


@pytest.mark.parametrize("method_run", ["loha"], indirect=True)
def test_the_sample_stage_loads_peft_folders_and_names_their_run(method_run, tmp_path):
    from argparse import Namespace

    from lorapipe.diffusion.stages import sample

    name, root, _ = method_run
    [trained_run] = [p.name for p in (root / "logs/tensorboard").iterdir()]
    assert lora.training_run(root / "lora") == trained_run  # read from unet/'s file
    params = make_params(root, **HEALTHY, **METHODS[name], **SAME_DATA_DIR, sample__steps=2,
                         sample__prompts=["a red circle, lpstyle"], sample__images_per_prompt=1)
    out = tmp_path / "samples"
    assert sample.run(params, Namespace(lora=str(root / "lora"), out=str(out),
                                        logs=str(tmp_path / "logs"))) == 0
    [base] = out.glob("*_base.png")
    with_lora = out / base.name.replace("_base", "")
    assert base.read_bytes() != with_lora.read_bytes()  # the LoHa (and its text part) loaded


def test_schedule_free_evaluates_with_its_averaged_weights():
    from schedulefree import AdamWScheduleFree

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamWScheduleFree([weight], lr=0.1)
    optimizer.train()
    for _ in range(3):
        (weight ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    training = weight.detach().clone()
    with optimizers.eval_weights(optimizer):
        averaged = weight.detach().clone()
    assert not torch.equal(averaged, training)  # y (train) and x (eval) differ
    assert torch.equal(weight.detach(), training)  # and training goes on with y
    optimizer.eval()
    assert torch.equal(weight.detach(), averaged)  # what its own eval() gives


def test_adamw8bit_keeps_large_states_in_8_bits():
    p = make_params_train(optimizer="adamw8bit")
    big, small = torch.nn.Parameter(torch.randn(64, 32, 3, 3)), torch.nn.Parameter(
        torch.randn(32, 64))
    optimizer = optimizers.build(p, [{"params": [big, small], "lr": 1e-3}])
    (big.sum() + small.sum()).backward()
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32


def make_params_train(**train):
    from ruamel.yaml import YAML

    from lorapipe.tasks import parse_params

    raw = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    raw["data"]["dir"] = str(REPO / "data" / "example")
    raw["train"].update(train)
    return parse_params(raw, REPO).train


# -- optimizers: logged rates, and a killed run resumes to the same bytes -------------------
STEPS, EVERY = 24, 12
PAIRS = {  # each optimizer with one of the methods: every pair's loop is the shared one
    "prodigy": {"train__optimizer": "prodigy", "train__learning_rate": 1.0,
                "lora__method": "loha"},
    # LoCon's 64-rank 3x3 downs (18,432 values) pass bitsandbytes' 4,096-value threshold,
    # so part of this state really is 8-bit (smaller tensors keep 32-bit state)
    "adamw8bit": {"train__optimizer": "adamw8bit", "lora__conv_rank": 64,
                  "lora__conv_alpha": 64},
    "schedulefree": {"train__optimizer": "schedulefree", "lora__method": "dora",
                     "train__schedulefree__warmup_steps": 5},
    "adafactor": {"train__optimizer": "adafactor", "train__adafactor__relative_step": True,
                  "lora__method": "lokr"},
}
FILES = ("dvclive/plots/metrics/loss/current.tsv", "dvclive/plots/metrics/lr/unet.tsv",
         "dvclive/plots/metrics/loss/train/fixed.tsv")


def _start(root):
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--cache", str(root.parent / "cache"), "--out",
         "lora", "--live", "dvclive", "--logs", "logs", "--checkpoints", "ckpt", "--health",
         "health.md"], cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _lora_files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "lora").rglob("*")) if p.is_file()}


def resumed_like_straight(tmp_path, cache, overrides: dict) -> str:
    """A straight run and one SIGKILLed after its first checkpoint and resumed: the same
    LoRA bytes and curves. Returns the straight run's output."""
    (tmp_path / "cache").symlink_to(cache)
    settings = {"train__max_steps": STEPS, "train__checkpoint_every": EVERY,
                "train__validation__every": EVERY, "train__sample_every": 0,
                "train__cpu_threads": 1, **SAME_DATA_DIR, **overrides}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for root in (straight, killed):
        root.mkdir()
        make_params(root, **settings)
    out, _ = _start(straight).communicate(timeout=300)
    assert "train: health:" in out, out
    proc, deadline = _start(killed), time.time() + 120
    while not (killed / "ckpt" / f"step_{EVERY:07d}").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed, _ = _start(killed).communicate(timeout=300)
    assert "resumed from" in resumed, resumed
    assert "train: compatibility: the saved files load as" in resumed, resumed
    assert _lora_files(killed) == _lora_files(straight)
    for file in FILES:
        assert (killed / file).read_bytes() == (straight / file).read_bytes(), file
    return out


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_each_optimizer_resumes_to_the_same_bytes(tmp_path, example_cache, name):
    out = resumed_like_straight(tmp_path, example_cache, PAIRS[name])
    straight = tmp_path / "straight"
    # the first lines say which optimizer and where the file will load
    assert f"; optimizer {name}" in out and "train: loads in: diffusers" in out, out
    from safetensors import safe_open

    with safe_open(str(straight / "lora" / WEBUI_FILE), "pt") as f:
        assert f.metadata()["ss_optimizer"] == {
            "prodigy": "prodigyopt.Prodigy", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
            "schedulefree": "schedulefree.AdamWScheduleFree",
            "adafactor": "transformers.optimization.Adafactor"}[name]
    rates = [float(line.split("\t")[-1]) for line in
             (straight / FILES[1]).read_text().splitlines()[1:]]
    if name == "prodigy":  # the logged rate is d x lr, d its own estimate (logged too)
        d = [float(line.split("\t")[-1]) for line in (
            straight / "dvclive/plots/metrics/optimizer/prodigy_d.tsv").read_text(
            ).splitlines()[1:]]
        assert rates[0] == pytest.approx(d[0]) and rates[-1] == pytest.approx(d[-2])
        assert d[-1] > d[0]  # it grew its step size from the tiny initial 1e-6
    if name == "schedulefree":  # its own warm-up, then the constant rate
        assert rates[:5] == pytest.approx([1e-3 * (k + 1) / 5 for k in range(5)])
        assert rates[-1] == pytest.approx(1e-3)
    if name == "adafactor":  # its relative step, min(1e-2, 1/sqrt(step)), not learning_rate
        assert rates == pytest.approx([1e-2] * STEPS)


def test_a_diverged_loha_run_keeps_its_last_good_peft_folders(tmp_path, example_cache):
    from lorapipe.core.training import Diverged

    with pytest.raises(Diverged):
        train_in(tmp_path, example_cache, lora__method="loha", train__learning_rate=1e12,
                 train__max_grad_norm=0.0, train__max_steps=30)
    saved = load_file(tmp_path / "lora/unet/adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert any("hada_w1_a" in k for k in saved)


def test_two_processes_match_one_with_a_lycoris_method(tmp_path, example_cache):
    from test_distributed import losses, train_stage

    multi, single = tmp_path / "multi", tmp_path / "single"
    common = {"train__max_steps": 8, "train__sample_every": 0, "train__checkpoint_every": 0,
              "train__validation__every": 8, "lora__method": "lokr"}
    for root, n, batch in ((multi, 2, 2), (single, 1, 4)):
        root.mkdir()
        make_params(root, train__num_processes=n, train__batch_size=batch, **common)
        train_stage(root, example_cache, tmp_path / f"trace_{root.name}")
    assert losses(multi) == pytest.approx(losses(single), abs=1e-5)
    a = load_file(multi / "lora/unet/adapter_model.safetensors")
    b = load_file(single / "lora/unet/adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lokr_w1" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


# -- the LLM: every method, rsLoRA, PiSSA and OLoRA ------------------------------------------
LLM_METHODS = {"dora": {"lora__method": "dora"}, "loha": {"lora__method": "loha"},
               "lokr": {"lora__method": "lokr"},
               "rslora": {"lora__rslora": True, "lora__rank": 16, "lora__alpha": 4},
               "pissa": {"lora__init_weights": "pissa"},
               "olora": {"lora__init_weights": "olora"}}


@pytest.fixture(scope="module", params=sorted(LLM_METHODS))
def llm_method_run(request, tmp_path_factory, llm_cache):
    from conftest import LLM

    root = tmp_path_factory.mktemp(f"llm-{request.param}")
    result = train_in(root, llm_cache, root / "health.md", **LLM, train__max_steps=60,
                      train__validation__every=20, **LLM_METHODS[request.param])
    return request.param, root, result


def test_each_llm_method_trains_healthy_and_reloads_in_peft(llm_method_run):
    """peft loads the adapter folder onto a fresh base with the trained logits: PiSSA's and
    OLoRA's converted to a LoRA of twice the rank on the unchanged base, rsLoRA's scale in a
    plain lora_alpha (so llama.cpp's converter, which reads no use_rslora, gets it right)."""
    from lorapipe.llm import compat as llm_compat
    from lorapipe.llm.models import load_llm

    name, root, result = llm_method_run
    assert result.summary["health"]["status"] == "healthy", result.summary
    ids = torch.arange(3, 40)[None]
    trained = result.models["model"].eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    base, _ = load_llm("builtin:tiny-llm")
    with torch.no_grad():
        plain = base.eval()(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-3
    loaded = PeftModel.from_pretrained(base, str(root / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4,
                                   atol=1e-4 if name in ("pissa", "olora") else 1e-5)
    config = json.loads((root / "lora/adapter_config.json").read_text())
    if name in ("pissa", "olora"):
        assert config["r"] == 8 and config["init_lora_weights"] is True
    if name == "rslora":
        assert config["use_rslora"] is False and config["lora_alpha"] == pytest.approx(16)
    params = params_of(root, name)
    trained_facts = llm_compat.from_params(params, REPO)
    found = llm_compat.rows(llm_compat.from_files(root / "lora", trained_facts))
    assert compat.disagreements(llm_compat.rows(trained_facts), found) == []


def test_pissa_samples_show_the_bases_answers_not_its_residuals(tmp_path, llm_cache,
                                                               monkeypatch):
    """With PiSSA the adapter-off model is the residual base (W - B0 A0), not the base: the
    samples' base column comes from the model before the adapter was attached. (The tiny
    LLM answers every prompt alike, base or residual, so the answers are marked here.)"""
    from conftest import LLM
    from lorapipe.llm import training
    from lorapipe.llm.adapter import attach
    from lorapipe.llm.models import load_llm

    ids = torch.arange(3, 30)[None]
    base, _ = load_llm("builtin:tiny-llm")
    torch.manual_seed(0)
    residual = attach(load_llm("builtin:tiny-llm")[0], params_of(tmp_path, "pissa").lora,
                      "builtin:tiny-llm")
    with torch.no_grad(), residual.disable_adapter():
        assert (residual(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-3
    seen = []

    def marked(model, tokenizer, prompts, settings):
        seen.append(any("lora_" in n for n, _ in model.named_parameters()))
        return [{"base_greedy": f"BASE-{i}", "base_sampled": f"BASE-{i}"}
                for i in range(len(prompts))]

    monkeypatch.setattr(training, "base_only", marked)
    train_in(tmp_path, llm_cache, **LLM, lora__init_weights="pissa", train__max_steps=6,
             train__validation__every=3, train__sample_every=3)
    assert seen == [False]  # taken once, from the model without an adapter
    for step in (0, 3, 6):
        markdown = (tmp_path / f"dvclive/samples/step_{step:06d}.md").read_text()
        assert "| greedy | BASE-0 |" in markdown and "| greedy | BASE-1 |" in markdown


def params_of(root, name):
    from conftest import LLM

    return make_params(root, **LLM, train__max_steps=60, train__validation__every=20,
                       **LLM_METHODS[name])


# -- reports/compatibility.md, as the params stage writes it ---------------------------------
def _report(tmp_path, **overrides) -> str:
    from stages.params import main

    make_params(tmp_path, **overrides)
    out = tmp_path / "compatibility.md"
    assert main(["--params", str(tmp_path / "params.yaml"), "--out",
                 str(tmp_path / "params.txt"), "--compat", str(out)]) == 0
    return out.read_text()


def test_the_report_of_a_plain_sd_lora_lists_all_four_image_clients(tmp_path):
    report = _report(tmp_path)
    for client in ("diffusers", "ComfyUI", "A1111/Forge", "kohya"):
        assert f"| {client} | ✔ |" in report, report
    assert "✘" not in report.split("|---|")[-1].split("\n\n")[0]


def test_the_report_of_a_dora_llm_says_vllm_cannot(tmp_path):
    from conftest import LLM

    report = _report(tmp_path, **LLM, lora__method="dora")
    assert ('| vLLM | ✘ | DoRA not supported (vllm/lora/peft_helper.py: "vLLM does not yet '
            'support DoRA.") | use lora.method lora') in report, report
    assert "| llama.cpp/Ollama | ✘ |" in report and "| peft | ✔ |" in report


def test_the_report_of_a_rank_32_lora_names_the_vllm_flag(tmp_path):
    from conftest import LLM

    report = _report(tmp_path, **LLM, lora__rank=32, lora__alpha=32)
    assert "| vLLM | ⚠ |" in report and "rank 32 needs `--max-lora-rank 32`" in report, report


@pytest.mark.parametrize("facts, client, status, words", [
    # images (lorapipe.diffusion.compat): one case per rule
    (image_compat.ImageAdapter("sd", "loha", 4, 0, False, True), "diffusers", "caveat",
     "PeftModel.from_pretrained"),
    (image_compat.ImageAdapter("sd", "dora", 4, 0, False, True), "ComfyUI", "caveat",
     "base weight's row norm"),
    (image_compat.ImageAdapter("sdxl", "dora", 4, 0, False, True), "A1111/Forge", "no",
     "per input column"),
    (image_compat.ImageAdapter("sd", "lokr", 4, 0, False, True), "kohya", "caveat",
     "--network_module lycoris.kohya"),
    (image_compat.ImageAdapter("sd", "lora", 4, 8, False, True), "kohya", "ok",
     "conv_dim=8"),
    (image_compat.ImageAdapter("flux", "loha", 4, 0, False, False), "ComfyUI", "no",
     "fuse q, k and v"),
    (image_compat.ImageAdapter("flux", "lora", 4, 0, False, True), "A1111/Forge", "caveat",
     "Forge"),
    (image_compat.ImageAdapter("flux", "lora", 4, 0, False, True), "kohya", "ok",
     "networks.lora_flux"),
    (image_compat.ImageAdapter("sd3", "lora", 4, 0, False, True), "A1111/Forge", "no",
     "ComfyUI"),
    (image_compat.ImageAdapter("sd3", "lora", 4, 0, False, True), "kohya", "ok",
     "networks.lora_sd3"),
    (image_compat.ImageAdapter("sd3", "dora", 4, 0, False, False), "ComfyUI", "no",
     "fuse q, k and v"),
])
def test_each_image_rule(facts, client, status, words):
    [row] = [r for r in image_compat.rows(facts) if r.client == client]
    assert row.status == status and words in row.reason + row.remedy, row


@pytest.mark.parametrize("facts, client, status, words", [
    (("loha", 4, False, "default"), "vLLM", "no", "LoRA adapters only"),
    (("lora", 24, False, "default"), "vLLM", "caveat", "--max-lora-rank 32"),
    (("lora", 1024, False, "default"), "vLLM", "no", "largest --max-lora-rank (512)"),
    (("lora", 16, False, "default"), "vLLM", "ok", "--enable-lora"),
    (("lokr", 4, False, "default"), "llama.cpp/Ollama", "no", "lora_A/lora_B tensors only"),
    (("lora", 8, True, "default"), "llama.cpp/Ollama", "ok", "bakes rsLoRA's scale"),
    (("loha", 4, False, "default"), "transformers merge", "ok", "merge_and_unload"),
    (("lora", 4, False, "default", ("modules_to_save",)), "vLLM", "no",
     "vLLM only supports modules_to_save being None."),
    (("lora", 4, False, "default", ("bias",)), "llama.cpp/Ollama", "no", "stops at bias"),
])
def test_each_llm_rule(facts, client, status, words):
    from lorapipe.llm import compat as llm_compat

    [row] = [r for r in llm_compat.rows(llm_compat.LlmAdapter(*facts)) if r.client == client]
    assert row.status == status and words in row.reason + row.remedy, row


def test_pissa_is_reported_at_its_exported_rank():
    from lorapipe.llm import compat as llm_compat

    assert llm_compat.exported_rank(16, "pissa") == 32
    assert llm_compat.exported_rank(16, "default") == 16


def test_the_light_family_detection_agrees_with_the_families(tmp_path):
    for family in families.all_families():
        name = family.name
        assert image_compat.family_of(family.builtin, tmp_path) == name
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": family.diffusers_classes[0]}))
        assert image_compat.family_of(str(folder), tmp_path) == name
        assert families.detect(folder, str(folder)).name == name
