"""Loss health: the verdict on constructed curves (every class, and noisy healthy curves that
must not be flagged), on real short runs of the builtin model, and early stopping."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, run_dirs, same_weights, train_in
from lorapipe.core.evaluation import holdout
from lorapipe.core.health import RunFacts, diagnose, diverged_advice, to_markdown
from lorapipe.core.training import Diverged
from lorapipe.tasks import load_params

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


def test_raw_step_loss_spread_is_not_an_explosion():
    """With 1-2 steps per epoch the step loss is one draw of random timesteps: over 3,000
    steps its extremes are far more than 2x apart while the model learns steadily."""
    rng = np.random.default_rng(3)
    current = [(s, float(0.55 * rng.lognormal(0.0, 0.45))) for s in range(1, 3001)]
    low = min(v for _, v in current[:1500])
    assert max(v for _, v in current[1500:]) > 2 * low  # what the old rule called diverged
    steps = list(range(0, 3001, 250))
    fixed = list(zip(steps, np.linspace(1.0, 0.6, len(steps)).tolist(), strict=True))
    assert diagnose(fixed, [], current, FACTS, T).status == "healthy"


def test_smoothed_step_loss_explosion_is_diverged():
    """Between evaluations the smoothed step loss still catches a real blow-up."""
    current = [(s, 0.5 if s < 200 else 0.5 + (s - 200) * 0.02) for s in range(1, 301)]
    fixed = [(0, 1.0), (100, 0.9), (200, 0.85)]
    v = diagnose(fixed, [], current, FACTS, T)
    assert v.status == "diverged" and "averaged over 50 steps" in v.headline


def test_advice_names_only_changes_from_the_run():
    """Clipping was already 1.0 and a warm-up already set: do not suggest them."""
    done = RunFacts(learning_rate=1e-3, batch_size=4, rank=8, images=40, grad_accum=1,
                    max_grad_norm=1.0, lr_scheduler="cosine", lr_warmup_steps=100)
    advice = " ".join(diverged_advice(done))
    assert "max_grad_norm" not in advice and "warm-up" not in advice
    assert "batch_size" not in advice and "0.001 -> 0.0005" in advice
    bare = RunFacts(learning_rate=1e-3, batch_size=1, rank=8, images=40, max_grad_norm=0.0,
                    lr_scheduler="constant", lr_warmup_steps=0, mixed_precision="fp16")
    advice = " ".join(diverged_advice(bare))
    assert "train.max_grad_norm: 1.0 (now 0)" in advice
    assert "constant_with_warmup" in advice and "bf16" in advice and "(now 1 x 1)" in advice


def test_each_verdict_ends_with_the_run_to_try_next():
    """The exact `dvc exp run -S ...`, computed from this run's params (FACTS: lr 2e-4,
    batch 2, rank 16, no warm-up)."""
    v = verdict(falling(1.0, 0.8)[:8] + [1.2, 1.9, 2.5, 4.0, 9.0])
    assert v.command == ("dvc exp run -S train.learning_rate=0.0001 -S train.lr_scheduler="
                         "constant_with_warmup -S train.lr_warmup_steps=50")
    assert v.command in to_markdown(v, "run-x")
    zigzag = [1.0, 0.95, 0.97, 0.9, 0.93, 0.88, 0.9, 0.86, 0.87, 0.84, 0.85, 0.83, 0.82]
    assert verdict(zigzag).command == \
        "dvc exp run -S train.learning_rate=0.0001 -S train.batch_size=4"
    flat = [1.0, 0.999, 0.998, 1.0, 0.997, 0.998, 0.997, 0.997, 0.996, 0.996, 0.995, 0.995,
            0.995]
    assert verdict(flat).command == "dvc exp run -S train.learning_rate=0.0004"
    val = [1.0, 0.95, 0.9, 0.86, 0.84, 0.83, 0.84, 0.86, 0.88, 0.9, 0.93, 0.95, 0.98]
    assert verdict(falling(1.0, 0.5), val).command == \
        "dvc exp run -S train.max_steps=125 -S lora.rank=8"
    healthy = verdict(falling(jitter=0.001))
    assert healthy.command is None and "Try next" not in to_markdown(healthy, "run-x")


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


OVERFIT_TRAIN = falling(1.0, 0.5)
OVERFIT_VAL = [1.0, 0.95, 0.9, 0.86, 0.84, 0.83, 0.84, 0.86, 0.88, 0.9, 0.93, 0.95, 0.98]


def banded(rising: set[int]) -> dict[int, list]:
    """Validation per timestep: the bands in `rising` turn up after step 125 as the whole
    validation loss does, the others keep falling."""
    return {t: curve(OVERFIT_VAL if t in rising else falling(1.0, 0.8))
            for t in (100, 300, 500, 700, 900)}


@pytest.mark.parametrize("rising, reading, remedy", [
    ({100, 300}, "validation rising at t <= 300 only (t=100, t=300): fine detail",
     "low-noise detail is memorised first"),
    ({700, 900}, "validation rising at t >= 700 only (t=700, t=900): composition and colour",
     "vary the framing and composition"),
    ({100, 300, 500, 700, 900}, "validation rising at every noise level", None),
])
def test_overfitting_says_which_band_moved_and_advises_from_it(rising, reading, remedy):
    v = diagnose(curve(OVERFIT_TRAIN), curve(OVERFIT_VAL), noisy_average(), FACTS, T,
                 val_bands=banded(rising))
    assert v.status == "overfitting"
    assert any(e.startswith(reading) for e in v.evidence), v.evidence
    if remedy:
        assert remedy in v.advice[1]  # right after "stop earlier"
    else:
        assert not any("memorised first" in a or "framing" in a for a in v.advice)
    md = to_markdown(v, "run-x")
    assert "## Where in the schedule" in md and "| 100 |" in md


def test_the_report_states_the_gain_against_the_base_and_the_best():
    v = verdict(OVERFIT_TRAIN, OVERFIT_VAL)
    md = to_markdown(v, "run-x")
    # validation 1.0 -> best 0.83 at step 125 -> 0.98 at the end
    assert ("the LoRA lowers the held-out loss by 2% against the base (step 300); the best "
            "was 17% at step 125") in md
    assert "the LoRA lowers the fixed training loss by 50% against the base" in md
    assert v.numbers["gain_val_best"] == pytest.approx(0.17)


def test_not_learning_reads_the_gain_over_the_base():
    # after lora.init the first evaluation is not the base: the logged gains say how far
    # below the base the LoRA is, and a LoRA already 20% below it is learning
    flat = [0.8] * len(STEPS)
    gains = curve([0.2] * len(STEPS))
    assert verdict(flat).status == "not_learning"
    v = diagnose(curve(flat), [], noisy_average(), FACTS, T, train_gain=gains)
    assert v.status == "healthy" and "lowers the fixed training loss by 20%" in \
        to_markdown(v, "run-x")


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


def test_tiny_learning_rate_is_not_learning(tmp_path, example_cache):
    train_in(tmp_path, example_cache, train__learning_rate=1e-6, train__max_steps=60,
             train__validation__every=20, health_report=tmp_path / "health.md")
    assert health_of(tmp_path)["status"] == "not_learning"
    report = (tmp_path / "health.md").read_text()
    assert "raise train.learning_rate" in report
    assert report.rstrip().endswith("dvc exp run -S train.learning_rate=0.0001\n```")


@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory, example_cache):
    """The example cache cut to its first 2 and 3 images: datasets of 1-2 steps per epoch."""
    from lorapipe.diffusion.cache import load_cache, save_cache

    full = load_cache(example_cache)
    meta = {k: v for k, v in full.meta.items() if k != "base"}
    out = {}
    for n in (2, 3):
        folder = tmp_path_factory.mktemp(f"cache{n}")
        part = full.subset(n)
        part.meta = meta
        save_cache(part, folder, "builtin:tiny-sd")
        out[n] = folder
    return out


@pytest.mark.parametrize("images, steps, batch, lr", [
    (2, 600, 1, 5e-3),  # 1 training image: the step loss is one image at one timestep
    (3, 800, 2, 2e-3),  # a long run at 1 step per epoch
])
def test_tiny_dataset_and_long_runs_are_healthy(tmp_path, tiny_caches, images, steps,
                                                batch, lr):
    """Both runs learn (fixed losses fall), and their raw step loss later rises above 2x its
    lowest value, which the old rule on loss/average called diverged."""
    result = train_in(tmp_path, tiny_caches[images], train__max_steps=steps,
                      train__batch_size=batch, train__learning_rate=lr,
                      train__validation__every=steps // 6)
    health = health_of(tmp_path)
    assert health["status"] == "healthy", health
    assert result.summary["fixed_loss_end"] < 0.8 * result.summary["fixed_loss_start"]
    average = []
    with open(tmp_path / "dvclive/plots/metrics/loss/average.tsv") as f:
        next(f)
        average = [float(line.split()[1]) for line in f]
    low = average.index(min(average))
    assert max(average[low:]) > 2 * min(average)  # the spread that fooled the old rule


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
    assert same_weights(a / "lora", b / "lora")


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
    # the saved LoRA is exactly the best step's: a run of the same seed stopped there by
    # train.max_steps trained the same weights
    [best] = run_dirs(tmp_path, "best")
    train_in(best, example_cache, train__learning_rate=0.05, train__max_steps=stop["best_step"],
             train__validation__every=10)
    saved = load_file(tmp_path / "lora/pytorch_lora_weights.safetensors")
    reference = load_file(best / "lora/pytorch_lora_weights.safetensors")
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    # and the WebUI file says which step it holds
    with safe_open(tmp_path / "lora/lorapipe.safetensors", "pt") as f:
        assert f.metadata()["ss_steps"] == str(stop["best_step"])

