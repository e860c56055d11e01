"""Sampling: schedulers, seeds, LoRA scale, the grid, the sample stage and training-time
images (read back from TensorBoard and dvclive)."""

from __future__ import annotations

import json

import numpy as np
import psutil
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_params, run_dirs, same_weights, train_in
from lorapipe.diffusion.families.sd import build_tiny_sd
from lorapipe.diffusion.sampling import (
    LABEL_H,
    SCHEDULERS,
    SampleSettings,
    generate,
    grid,
    make_scheduler,
)
from stages import sample as sample_stage

SETTINGS = SampleSettings(steps=4, guidance_scale=7.5, negative_prompt="", width=64,
                          height=64, lora_scale=1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, example_cache):
    root = tmp_path_factory.mktemp("sampled")
    train_in(root, example_cache, train__max_steps=40, train__learning_rate=5e-3)
    return root


@pytest.fixture(scope="module")
def pipe(trained):
    p = build_tiny_sd()
    p.set_progress_bar_config(disable=True)
    p.load_lora_weights(str(trained / "lora"))
    return p


def px(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


EXPECTED = {"ddim": ("DDIMScheduler", {}),
            "euler": ("EulerDiscreteScheduler", {}),
            "euler_a": ("EulerAncestralDiscreteScheduler", {}),
            "dpm++_2m": ("DPMSolverMultistepScheduler",
                         {"algorithm_type": "dpmsolver++", "solver_order": 2})}


def test_every_sampler_name_is_its_scheduler_and_they_differ(pipe):
    assert set(EXPECTED) == set(SCHEDULERS)
    images = {}
    for name in SCHEDULERS:
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        cls, config = EXPECTED[name]
        assert type(pipe.scheduler).__name__ == cls, name
        assert {k: pipe.scheduler.config[k] for k in config} == config, name
        # the base model's noise schedule is kept
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"
        image = generate(pipe, "a red circle, lpstyle", 1, SETTINGS, lora=True)
        assert image.size == (64, 64) and image.mode == "RGB"
        images[name] = px(image)
    for a in SCHEDULERS:  # each sampler gives its own image for the same seed and prompt
        for b in SCHEDULERS:
            if a < b:
                assert np.abs(images[a] - images[b]).mean() > 0.5, (a, b)


def test_seeds_and_lora_scale(pipe):
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    a = generate(pipe, "a red circle", 5, SETTINGS, lora=True)
    assert (px(a) == px(generate(pipe, "a red circle", 5, SETTINGS, lora=True))).all()
    assert (px(a) != px(generate(pipe, "a red circle", 6, SETTINGS, lora=True))).any()
    base = generate(pipe, "a red circle", 5, SETTINGS, lora=False)
    assert np.abs(px(a) - px(base)).mean() > 1  # the LoRA changes the image
    off = SampleSettings(**{**SETTINGS.__dict__, "lora_scale": 0.0})
    assert (px(generate(pipe, "a red circle", 5, off, lora=True)) == px(base)).all()
    # disabling the LoRA for a base image leaves it enabled afterwards
    assert (px(generate(pipe, "a red circle", 5, SETTINGS, lora=True)) == px(a)).all()


def test_no_memory_growth_over_many_prompts(pipe):
    proc = psutil.Process()
    for i in range(5):
        generate(pipe, f"prompt {i}", i, SETTINGS, lora=True)
    start = proc.memory_info().rss
    for i in range(20):  # a leak of 1.5 MiB an image (one 64 px grid's worth) would show
        generate(pipe, f"a shape number {i}, lpstyle", i, SETTINGS, lora=True)
    assert proc.memory_info().rss - start < 30 * 2**20


def test_grid_puts_base_beside_lora():
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    image = grid([("p0", [(1, red, blue), (2, red, blue)]), ("p1", [(1, blue, red)])])
    cell, labels = 128, 2 * LABEL_H  # 64 px images are enlarged to 128 px cells
    assert image.size == (4 * cell, 2 * (cell + labels))
    a = np.asarray(image)
    assert tuple(a[labels + 60, 60]) == (255, 0, 0)  # row 0: base (red) first
    assert tuple(a[labels + 60, cell + 60]) == (0, 0, 255)  # then the LoRA (blue)
    assert tuple(a[cell + 2 * labels + 60, 60]) == (0, 0, 255)  # row 1


def test_grid_labels_are_readable_and_stay_in_their_cells():
    red = Image.new("RGB", (64, 64), "red")
    long_seed = 10**25  # "base seed 10000000000000000000000000" is wider than a 128 px cell
    image = grid([("a very long prompt, " * 12, [(long_seed, red, red), (long_seed, red, red)])])
    band = np.asarray(image.convert("L"))[LABEL_H:2 * LABEL_H] < 128  # the seed labels' ink
    for boundary in (128, 256, 384):  # nothing drawn across a cell boundary
        assert not band[:, boundary - 3:boundary + 1].any(), boundary
    rows = np.flatnonzero(band[:, :124].any(axis=1))
    assert rows.max() - rows.min() + 1 >= 10  # letters ~10 px tall, not Pillow's tiny default
    prompt = np.asarray(image.convert("L"))[:LABEL_H] < 128
    assert not prompt[:, -3:].any()  # the long prompt is cut before the edge


def test_sample_stage_writes_images_grid_and_logs(trained, workspace, monkeypatch, capsys):
    ws = workspace(data__dir=str(trained))
    make_params(ws, sample__prompts=["a red circle, lpstyle", "a blue star"],
                sample__images_per_prompt=2, sample__seed=10, sample__steps=3,
                sample__scheduler="dpm++_2m")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    assert sample_stage.main(["--lora", str(trained / "lora"), "--out", "samples",
                              "--logs", "logs/sample"]) == 0
    out = ws / "samples"
    names = sorted(p.name for p in out.glob("prompt*.png"))
    assert names == ["prompt00_seed10.png", "prompt00_seed10_base.png", "prompt00_seed11.png",
                     "prompt00_seed11_base.png", "prompt01_seed10.png",
                     "prompt01_seed10_base.png", "prompt01_seed11.png",
                     "prompt01_seed11_base.png"]
    assert json.loads((out / "prompts.json").read_text())["prompt01"] == "a blue star"
    assert Image.open(out / "grid.png").size == (4 * 128, 2 * (128 + 2 * LABEL_H))
    assert (out / "dvclive/plots/images/grid.png").exists()
    from lorapipe.diffusion.lora import training_run

    trained_run = training_run(trained / "lora")  # the sample run is named after it
    assert (trained / "logs/tensorboard" / trained_run).is_dir()
    events = EventAccumulator(str(ws / "logs/sample" / trained_run / "exp-a"))
    events.Reload()
    assert events.Tags()["images"] == ["samples/grid"]
    assert "dpm++_2m, 3 steps" in capsys.readouterr().out


def test_training_logs_sample_grids_without_changing_the_training(tmp_path, example_cache):
    a, b = run_dirs(tmp_path, "a", "b")
    train_in(a, example_cache, train__max_steps=10, train__sample_every=5,
             train__sample_steps=2)
    train_in(b, example_cache, train__max_steps=10, train__sample_every=0)
    events = EventAccumulator(str(next((a / "logs/tensorboard").iterdir())))
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [0, 5, 10]
    images = sorted(p.name for p in (a / "dvclive/plots/images/samples").iterdir())
    assert images == ["step_000000.png", "step_000005.png", "step_000010.png"]
    assert same_weights(a / "lora", b / "lora")
