"""Loss health: the verdict on constructed curves (every class, and noisy healthy curves that
must not be flagged), on real short runs of the builtin model, and early stopping."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_dirs, train_in
from lorapipe.evaluation import holdout
from lorapipe.health import RunFacts, diagnose, to_markdown
from lorapipe.params import load_params
from lorapipe.training import Diverged

T = load_params(REPO / "params.yaml").health
FACTS = RunFacts(learning_rate=2e-4, batch_size=2, rank=16, images=40)
STEPS = list(range(0, 301, 25))


def curve(values) -> list[tuple[int, float]]:
    return list(zip(STEPS, values, strict=False))


def falling(start=1.0, end=0.7, jitter=0.0, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(start, end, len(STEPS))
    return [float(v) for v in base * (1 + jitter * rng.standard_normal(len(STEPS)))]


def noisy_average(level=0.9, noise=0.1, seed=1):
    rng = np.random.default_rng(seed)
    return [(s, float(level * (1 + noise * rng.standard_normal()))) for s in range(1, 301)]


def verdict(train, val=None, avg=None):
    return diagnose(curve(train), curve(val) if val else [], avg or noisy_average(), FACTS, T)


def test_healthy_even_with_noisy_curves():
    for seed in range(5):  # tiny wiggles in the fixed loss, 10% noise in the step average
        v = verdict(falling(jitter=0.001, seed=seed), falling(1.02, 0.75, 0.001, seed + 9),
                    noisy_average(noise=0.1, seed=seed))
        assert v.status == "healthy", (seed, v)


def test_settled_is_healthy():
    v = verdict(falling(1.0, 0.7)[:7] + [0.7] * 6)
    assert v.status == "healthy"


def test_diverged_on_non_finite():
    train = falling()
    train[5] = math.nan
    v = verdict(train)
    assert v.status == "diverged" and "step 125" in v.headline
    assert any("train.learning_rate" in a for a in v.advice)


def test_diverged_on_explosion():
    v = verdict(falling(1.0, 0.8)[:8] + [1.2, 1.9, 2.5, 4.0, 9.0])
    assert v.status == "diverged" and "exploded" in v.headline
    assert "2e-4 -> 0.0001" in " ".join(v.advice).replace("0.0002", "2e-4")


def test_unstable_on_repeated_rises():
    zigzag = [1.0, 0.95, 0.97, 0.9, 0.93, 0.88, 0.9, 0.86, 0.87, 0.84, 0.85, 0.83, 0.82]
    v = verdict(zigzag)
    assert v.status == "unstable"
    assert any("batch_size to at least 4" in a for a in v.advice)  # batch 2 here


def test_not_learning():
    v = verdict([1.0, 0.999, 0.998, 1.0, 0.997, 0.998, 0.997, 0.997, 0.996, 0.996, 0.995,
                 0.995, 0.995])
    assert v.status == "not_learning"
    assert any("raise train.learning_rate" in a for a in v.advice)
    # too early to tell: not flagged before health.min_steps
    assert diagnose([(0, 1.0), (25, 0.999)], [], [], FACTS, T).status == "healthy"


def test_overfitting_records_the_best_step():
    train = falling(1.0, 0.5)
    val = [1.0, 0.95, 0.9, 0.86, 0.84, 0.83, 0.84, 0.86, 0.88, 0.9, 0.93, 0.95, 0.98]
    v = verdict(train, val)
    assert v.status == "overfitting" and v.best_step == 125
    assert any("best validation loss was at step 125" in a for a in v.advice)
    assert any("lora.rank (16 -> 8)" in a for a in v.advice)
    md = to_markdown(v, "run-x")
    assert md.startswith("# Training health: overfitting") and "step 125" in md


def test_validation_settling_is_not_overfitting():
    val = falling(1.0, 0.8)[:9] + [0.8, 0.801, 0.8, 0.802]  # within overfit_margin
    assert verdict(falling(1.0, 0.6), val).status == "healthy"


def test_holdout_is_deterministic_by_name():
    files = [f"img{i:02d}.png" for i in range(20)]
    train, val = holdout(files, 0.2)
    assert len(val) == 4 and sorted(train + val) == list(range(20))
    shuffled = list(reversed(files))
    _, val2 = holdout(shuffled, 0.2)
    assert sorted(shuffled[i] for i in val2) == sorted(files[i] for i in val)
    assert holdout(files, 0.0) == (list(range(20)), [])
    assert len(holdout(files[:2], 0.01)[1]) == 1  # at least one image


# --- real runs on the builtin model -----------------------------------------------------

def health_of(root) -> dict:
    return json.loads((root / "dvclive/metrics.json").read_text())["health"]


def test_defaults_are_healthy(tmp_path, example_cache, capsys):
    train_in(tmp_path, example_cache, train__max_steps=150, train__validation__every=25,
             health_report=tmp_path / "health.md")
    assert health_of(tmp_path)["status"] == "healthy"
    assert (tmp_path / "health.md").read_text().startswith("# Training health: healthy")
    assert "train: health: healthy" in capsys.readouterr().out


def test_zero_learning_rate_is_not_learning(tmp_path, example_cache):
    train_in(tmp_path, example_cache, train__learning_rate=0.0, train__max_steps=60,
             train__validation__every=20, health_report=tmp_path / "health.md")
    assert health_of(tmp_path)["status"] == "not_learning"
    assert "raise train.learning_rate" in (tmp_path / "health.md").read_text()


def test_huge_learning_rate_is_diverged(tmp_path, example_cache):
    with pytest.raises(Diverged):
        train_in(tmp_path, example_cache, train__learning_rate=1e4, train__max_steps=60,
                 health_report=tmp_path / "health.md")
    assert health_of(tmp_path)["status"] == "diverged"
    assert (tmp_path / "health.md").read_text().startswith("# Training health: diverged")


def test_turning_evaluation_up_does_not_change_training(tmp_path, example_cache):
    a, b = run_dirs(tmp_path, "a", "b")
    train_in(a, example_cache, train__max_steps=12, train__validation__every=1)
    train_in(b, example_cache, train__max_steps=12, train__validation__every=100)
    name = "lora/pytorch_lora_weights.safetensors"
    assert (a / name).read_bytes() == (b / name).read_bytes()


def test_early_stop_keeps_the_best_lora(tmp_path, example_cache, capsys):
    # a high learning rate overshoots after a few evaluations, so validation stops improving
    result = train_in(tmp_path, example_cache, train__learning_rate=0.05, train__max_steps=300,
                      train__validation__every=10, train__early_stop__patience=2)
    summary = result.summary
    stop = summary["early_stop"]
    assert stop["stopped"] and stop["saved_step"] == stop["best_step"]
    assert summary["steps"] == stop["best_step"] + 2 * 10  # two evaluations without a new best
    assert f"saved the LoRA of step {stop['best_step']}" in capsys.readouterr().out
    # the saved LoRA is the best step's: its validation loss equals the best one logged
    val = {}
    with open(tmp_path / "dvclive/plots/metrics/loss/validation/step_average.tsv") as f:
        next(f)
        for line in f:
            step, value = line.split()
            val[int(step)] = float(value)
    assert min(val, key=val.get) == stop["best_step"]
    saved = load_file(tmp_path / "lora/pytorch_lora_weights.safetensors")
    trained = {k: v for k, v in result.unet.state_dict().items() if "lora_" in k}
    assert len(saved) == len(trained)
    assert all(torch.isfinite(t).all() for t in saved.values())
