"""The training loop: learning, logging (dvclive + TensorBoard read back), determinism,
the NaN guard, schedules and options."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_dirs, train_in
from lorapipe.core.training import Diverged, Plan
from lorapipe.diffusion.objectives import DDPM, diffusion_loss


def tsv(root, name) -> list[tuple[int, float]]:
    with open(root / "dvclive/plots/metrics" / f"{name}.tsv", encoding="utf-8") as f:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in
                csv.DictReader(f, delimiter="\t")]


def test_training_lowers_the_fixed_noise_loss(tmp_path, example_cache):
    result = train_in(tmp_path, example_cache, train__max_steps=120,
                      train__validation__every=40)
    s = result.summary
    assert s["fixed_loss_end"] < 0.85 * s["fixed_loss_start"], s
    fixed = [v for _, v in tsv(tmp_path, "loss/train/fixed")]
    assert len(fixed) == 4 and fixed[-1] < fixed[0]
    assert s["health"]["status"] == "healthy"
    assert s["trainable_params"] == 9984 and s["steps"] == 120


def test_logs_one_set_of_names_in_dvclive_and_tensorboard(tmp_path, example_cache, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    train_in(tmp_path, example_cache, train__max_steps=12)
    run_dir = tmp_path / "logs/tensorboard/my-exp"  # named after the DVC experiment
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "loss/epoch_average", "lr/unet", "loss/train/fixed",
            "loss/validation/step_average", "loss/validation/step_divergence"} <= tags
    for name in ("loss/current", "loss/average", "lr/unet", "loss/epoch_average"):
        board = [(e.step, e.value) for e in events.Scalars(name)]
        live = tsv(tmp_path, name)
        assert [s for s, _ in board] == [s for s, _ in live]
        assert [v for _, v in board] == pytest.approx([v for _, v in live], rel=1e-6)
    # 16 training images (4 held out) / batch 4 = 4 steps per epoch: averages at 4, 8, 12
    assert [s for s, _ in tsv(tmp_path, "loss/epoch_average")] == [4, 8, 12]
    current = [v for _, v in tsv(tmp_path, "loss/current")]
    average = [v for _, v in tsv(tmp_path, "loss/average")]
    assert average[6] == pytest.approx(sum(current[3:7]) / 4)  # moving mean over one epoch
    train_fixed = dict(tsv(tmp_path, "loss/train/fixed"))
    validation = dict(tsv(tmp_path, "loss/validation/step_average"))
    divergence = dict(tsv(tmp_path, "loss/validation/step_divergence"))
    assert sorted(validation) == [0, 10, 12] == sorted(train_fixed)
    assert divergence[10] == pytest.approx(validation[10] - train_fixed[10])
    metrics = json.loads((tmp_path / "dvclive/metrics.json").read_text())
    for key in ("final_average_loss", "min_average_loss", "steps", "trainable_params"):
        assert key in metrics
    # wall times stay out of the files DVC hashes; TensorBoard has them
    assert not {"wall_time_s", "steps_per_s"} & set(metrics)
    assert {"summary/wall_time_s", "summary/steps_per_s"} <= tags
    # TensorBoard's Custom Scalars tab: training and validation fixed losses in one chart
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    [config] = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    # (tags are regular expressions: anchored, or the per-timestep curves would join in)
    assert ["^loss/train/fixed$", "^loss/validation/step_average$",
            "^loss/validation/best$"] in charts.values()
    # the HParams tab: this run's params and verdict, and the metrics to compare by
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lora.rank"].number_value == 4
    assert start.hparams["health.status"].string_value == "healthy"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {
        "loss/train/fixed", "loss/validation/step_average"}
    # the verdict is logged at the run's last step, not at 0
    assert [e.step for e in events.Tensors("health/text_summary")] == [12]
    params = (tmp_path / "dvclive/params.yaml").read_text()
    assert "lora.rank: 4" in params
    log = (tmp_path / "logs/train.log").read_text()
    assert "global batch 4" in log and "step 12/12 loss" in log


def test_same_seed_same_bytes(tmp_path, example_cache):
    a, b = run_dirs(tmp_path, "a", "b")
    train_in(a, example_cache, lora__dropout=0.1, train__max_steps=8)
    train_in(b, example_cache, lora__dropout=0.1, train__max_steps=8)
    for name in ("pytorch_lora_weights.safetensors", "lorapipe.safetensors"):
        assert (a / "lora" / name).read_bytes() == (b / "lora" / name).read_bytes()
    [c] = run_dirs(tmp_path, "c")
    train_in(c, example_cache, lora__dropout=0.1, train__max_steps=8, train__seed=7)
    name = "pytorch_lora_weights.safetensors"
    assert (c / "lora" / name).read_bytes() != (a / "lora" / name).read_bytes()


def test_nan_guard_stops_keeps_last_good_lora(tmp_path, family_run):
    cache, family = family_run
    with pytest.raises(Diverged) as exc:
        train_in(tmp_path, cache, train__learning_rate=1e12, train__max_grad_norm=0.0,
                 train__max_steps=30, **family)
    message = str(exc.value)
    assert "non-finite at step" in message and "lr 1.00e+12" in message
    assert "lower train.learning_rate" in message
    metrics = json.loads((tmp_path / "dvclive/metrics.json").read_text())
    assert metrics["health"]["status"] == "diverged"
    assert metrics["verdict_numbers"]["step"] == exc.value.step
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "lora/pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_warmup_and_cosine_schedule(tmp_path, example_cache):
    train_in(tmp_path, example_cache, train__lr_scheduler="cosine", train__lr_warmup_steps=5,
             train__max_steps=20, train__learning_rate=1e-3)
    lrs = [v for _, v in tsv(tmp_path, "lr/unet")]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-3)  # linear warm-up, then the peak
    assert all(x <= y for x, y in zip(lrs[:6], lrs[1:6], strict=False))
    assert all(x >= y for x, y in zip(lrs[5:], lrs[6:], strict=False)) and lrs[-1] < 1e-4


def test_grad_accum_and_epochs(tmp_path, example_cache, capsys):
    result = train_in(tmp_path, example_cache, train__batch_size=2, train__grad_accum=3,
                      train__max_steps=0, train__epochs=2)
    # 16 training images / (2 x 3) per step -> 3 steps per epoch (rounded up), 2 epochs -> 6
    assert result.summary["steps"] == 6
    assert "global batch 6" in capsys.readouterr().out


def denoiser(result):
    """The run's denoiser (the UNet, Flux's transformer): its first trained component."""
    return next(iter(result.models.values()))


def test_bf16_keeps_lora_weights_fp32(tmp_path, family_run):
    cache, family = family_run
    result = train_in(tmp_path, cache, train__mixed_precision="bf16", train__max_steps=4,
                      **family)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.summary["loss"].values())
    lora_params = [p for n, p in denoiser(result).named_parameters() if "lora_" in n]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)
    base = [p for n, p in denoiser(result).named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in base)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, family_run):
    cache, family = family_run
    a, b = run_dirs(tmp_path, "a", "b")
    ra = train_in(a, cache, train__max_steps=4, **family)
    rb = train_in(b, cache, train__max_steps=4, train__gradient_checkpointing=True, **family)
    for (na, pa), (_, pb) in zip(denoiser(ra).named_parameters(),
                                 denoiser(rb).named_parameters(),
                                 strict=True):
        if "lora_" in na:
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_fp16_on_cpu_is_refused(tmp_path, example_cache):
    from lorapipe.core.errors import LorapipeError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LorapipeError, match="fp16 needs a CUDA GPU"):
        train_in(tmp_path, example_cache, train__mixed_precision="fp16")


# --- the loss itself --------------------------------------------------------------------

class _Echo(torch.nn.Module):
    """A stand-in UNet whose prediction is its input, to check the loss arithmetic."""

    def forward(self, x, t, **conditioning):
        return type("Out", (), {"sample": x * 0.5})()


def _scheduler(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def _loss(**kw):
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    ts = kw.pop("timesteps", torch.tensor([10, 200, 600, 990]))
    sched = kw.pop("scheduler", _scheduler())
    gen = torch.Generator().manual_seed(1)
    echo = _Echo()
    return diffusion_loss(lambda x, t: echo(x, t).sample, DDPM(sched), latents, gen,
                          timesteps=ts, **kw), latents


def test_min_snr_weighting():
    plain, _ = _loss()
    assert _loss(min_snr_gamma=1e9)[0] == pytest.approx(plain.item())  # gamma above all SNRs
    assert _loss(min_snr_gamma=1.0)[0] < plain  # low-noise steps weighted down


def test_noise_offset_changes_the_noise():
    assert _loss(noise_offset=0.1)[0] != pytest.approx(_loss()[0].item())


def test_v_prediction_target():
    sched = _scheduler("v_prediction")
    loss, latents = _loss(scheduler=sched)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=gen)
    ts = torch.tensor([10, 200, 600, 990])
    noisy = sched.add_noise(latents, noise, ts)
    expected = torch.nn.functional.mse_loss(noisy * 0.5, sched.get_velocity(latents, noise, ts))
    assert loss.item() == pytest.approx(expected.item())


def test_plan_visits_every_image_once_per_epoch():
    plan = Plan(images=10, batch_size=3, grad_accum=1, max_steps=20)
    seen = torch.cat([plan.batch_indices(m, seed=5) for m in range(10)])  # 30 = 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert seen[:10].tolist() != seen[10:20].tolist()  # reshuffled each epoch


def test_params_logged_flat_including_number_lists(tmp_path):
    from conftest import make_params
    from lorapipe.core.training import flat_params

    flat = flat_params(make_params(tmp_path, train__devices=[1, 2],
                                   lora__targets=["to_q", "to_v"]))
    assert flat["train.devices"] == "1,2" and flat["lora.targets"] == "to_q,to_v"
    assert flat_params(make_params(tmp_path))["lora.targets"] == "attn"  # a preset
