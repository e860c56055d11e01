"""Checkpoints: a SIGKILLed train stage, run again, resumes and ends with the same bytes as
an uninterrupted run (sample images logged before the kill included); a checkpoint made with
other params is never resumed; a damaged one is passed over for the one before it; a run
killed before its first checkpoint leaves no half TensorBoard run behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    FLUX,
    MACHINE_CPUS,
    PINNED,
    REPO,
    SAME_DATA_DIR,
    SDXL,
    hold_registration,
    make_params,
    train_in,
)

STEPS = 60
EVERY = 20
FILES = ("lora/pytorch_lora_weights.safetensors", "lora/lorapipe.safetensors",
         "dvclive/plots/metrics/loss/current.tsv", "dvclive/plots/metrics/loss/train/fixed.tsv")


def start(root: Path, cache: Path, cores: list[int] | None = None, **env) -> subprocess.Popen:
    """The train stage in root (cores: the CPUs it may run on, else the test's)."""
    # a run registry of the run's own (unless given): alone there, every run of this file
    # takes the same automatic thread count whatever else runs on the machine, so their
    # bytes compare (lorapipe.core.threads)
    env.setdefault("LORAPIPE_RUNS_DIR", str(root.parent / f"runs-{root.name}"))
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--cache", str(cache), "--out", "lora",
         "--live", "dvclive", "--logs", "logs", "--checkpoints", "ckpt", "--health", "health.md"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a kill reaches launched workers too
        preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
    )


def run_to_end(root: Path, cache: Path, cores: list[int] | None = None, **env) -> str:
    proc = start(root, cache, cores, **env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def kill_after_checkpoint(root: Path, cache: Path, step: int = EVERY) -> None:
    proc = start(root, cache)
    deadline = time.time() + 120
    while not (root / "ckpt" / f"step_{step:07d}").exists():
        assert proc.poll() is None, "finished before the first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "lora").exists()  # nothing final was written


def setup(root: Path, **overrides) -> Path:
    root.mkdir()
    settings = {"train__max_steps": STEPS, "train__checkpoint_every": EVERY,
                "train__validation__every": EVERY, "train__sample_every": 0, **SAME_DATA_DIR,
                **overrides}
    make_params(root, **settings)
    return root


def images(root: Path) -> dict[str, bytes]:
    folder = root / "dvclive/plots/images/samples"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


SAMPLES = {"train__sample_every": EVERY, "train__sample_steps": 2}  # images at 0, 20, 40, 60


@pytest.fixture(scope="module")
def straight(tmp_path_factory, example_cache) -> Path:
    """The uninterrupted run the others are compared with."""
    root = setup(tmp_path_factory.mktemp("straight") / "run", **SAMPLES)
    run_to_end(root, example_cache)
    return root


def test_killed_run_resumes_to_the_same_bytes(tmp_path, example_cache, straight):
    assert not (straight / "ckpt").exists() or not any((straight / "ckpt").iterdir())
    assert list(images(straight)) == [f"step_{s:06d}.png" for s in (0, 20, 40, 60)]

    killed = setup(tmp_path / "killed", **SAMPLES)
    kill_after_checkpoint(killed, example_cache)
    # resumed where the automatic thread count would differ, which moves the last bits: on
    # all the machine's cores when the test worker has a share of them (the suite's xdist
    # workers: conftest), else while another run shares the CPU (half the count); the run
    # keeps the count its checkpoint recorded
    if PINNED is not None and len(PINNED) < len(MACHINE_CPUS):
        out = run_to_end(killed, example_cache, cores=MACHINE_CPUS)
    else:
        runs = tmp_path / "runs"
        other = hold_registration(runs)
        try:
            out = run_to_end(killed, example_cache, LORAPIPE_RUNS_DIR=str(runs))
        finally:
            other.kill()
            other.wait()
    assert re.search(r"resumed from \S+ at step (20|40)", out), out
    assert re.search(r"CPU threads? per process \(as when this run started: its checkpoint "
                     r"says\)", out) or len(MACHINE_CPUS) == 1, out
    for name in FILES:
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
    assert images(killed) == images(straight)  # the images logged before the kill, too

    # a checkpoint left by a run with another seed is passed over, not resumed
    other = setup(tmp_path / "other", train__seed=1, **SAMPLES)
    kill_after_checkpoint(other, example_cache)
    make_params(other, **{"train__max_steps": STEPS, "train__checkpoint_every": EVERY,
                          "train__validation__every": EVERY, **SAME_DATA_DIR,
                          **SAMPLES})  # straight's params
    out = run_to_end(other, example_cache)
    assert "made with other params or data" in out and "resumed from" not in out
    for name in FILES[:2]:
        assert (other / name).read_bytes() == (straight / name).read_bytes(), name


def test_two_process_sdxl_bucketed_run_resumes_to_the_same_result(tmp_path,
                                                                    bucketed_cache_sdxl):
    """The same under `accelerate launch` with 2 CPU processes (gloo), for an SDXL base (its
    pooled embedding and time ids sharded with the latents) on aspect-ratio buckets (the
    bucketed batch order is resumed too), with text-encoder LoRAs and caption changes (their
    weights, optimizer state and caption draws resume too)."""
    cache = bucketed_cache_sdxl
    # both text encoders' LoRAs too, on the kohya preset, with captions changed per step
    settings = {"train__num_processes": 2, "train__batch_size": 2, "lora__targets": "kohya",
                "lora__text_encoder": True, "train__captions": {
                    "shuffle": True, "keep_tokens": 1, "dropout": 0.2, "tag_dropout": 0.2},
                **SDXL}
    straight = setup(tmp_path / "straight", **settings)
    run_to_end(straight, cache)
    killed = setup(tmp_path / "killed", **settings)
    kill_after_checkpoint(killed, cache)
    out = run_to_end(killed, cache)
    assert "train: sdxl base builtin:tiny-sdxl" in out and "train: 3 buckets" in out, out
    assert "(192 unet, 6 text_encoder, 12 text_encoder_2)" in out, out
    assert re.search(r"resumed from \S+ at step (20|40)", out), out
    for name in FILES:
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name


def test_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, example_cache, straight):
    damaged = setup(tmp_path / "damaged", **SAMPLES)
    kill_after_checkpoint(damaged, example_cache, step=2 * EVERY)  # steps 20 and 40 kept
    newest = damaged / "ckpt" / f"step_{2 * EVERY:07d}"
    optimizer = newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # truncated
    out = run_to_end(damaged, example_cache)
    assert f"ignoring ckpt/step_{2 * EVERY:07d}: optimizer.bin is damaged" in out, out
    assert f"resumed from ckpt/step_{EVERY:07d} at step {EVERY}" in out, out
    for name in FILES:
        assert (damaged / name).read_bytes() == (straight / name).read_bytes(), name

    # every checkpoint damaged: a fresh start, said so, and still the same result
    fresh = setup(tmp_path / "fresh", **SAMPLES)
    kill_after_checkpoint(fresh, example_cache, step=2 * EVERY)
    for ckpt in (fresh / "ckpt").iterdir():
        (ckpt / "lora.safetensors").write_bytes(b"")
    out = run_to_end(fresh, example_cache)
    assert "no usable checkpoint: starting from step 0" in out and "resumed" not in out, out
    for name in FILES[:2]:
        assert (fresh / name).read_bytes() == (straight / name).read_bytes(), name


def test_run_killed_before_its_first_checkpoint_leaves_no_partial_tensorboard_run(
        tmp_path, example_cache):
    root = setup(tmp_path / "run")
    proc = start(root, example_cache, DVC_EXP_NAME="killed-exp")
    deadline = time.time() + 120
    while not (root / "dvclive/plots/metrics/loss/current.tsv").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "ckpt").exists() or not any((root / "ckpt").iterdir())
    assert (root / "logs/tensorboard/killed-exp").exists()  # what the kill left

    run_to_end(root, example_cache, DVC_EXP_NAME="next-exp")
    runs = sorted(p.name for p in (root / "logs/tensorboard").iterdir())
    assert runs == ["next-exp"]  # the killed run's half is gone, the finished run is whole
    assert not any(p.name.startswith(".") for p in (root / "logs/tensorboard/next-exp").iterdir())
    assert json.loads((root / "dvclive/metrics.json").read_text())["steps"] == STEPS


def test_two_process_flux_run_resumes_to_the_same_bytes_and_matches_one_process(
        tmp_path, example_cache_flux):
    """Flux.1 (flow matching, packed latents, the guidance input) under `accelerate launch`
    with 2 CPU processes: killed after a checkpoint and resumed, it ends in the same bytes
    as the run that was not; and it trains as one process does at the same global batch.
    With CLIP-L's LoRA and caption dropout, the dropped captions take the empty caption's
    conditioning, through T5, per step."""
    cache = example_cache_flux
    short = {"train__max_steps": 20, "train__checkpoint_every": 10,
             "train__validation__every": 10, "lora__text_encoder": True,
             "train__captions": {"shuffle": False, "keep_tokens": 0, "dropout": 0.3,
                                 "tag_dropout": 0.0}, **FLUX}
    two = {"train__num_processes": 2, "train__batch_size": 2, **short}
    straight = setup(tmp_path / "straight", **two)
    run_to_end(straight, cache)
    killed = setup(tmp_path / "killed", **two)
    kill_after_checkpoint(killed, cache, step=10)
    out = run_to_end(killed, cache)
    assert "train: flux base builtin:tiny-flux" in out and "launching 2 processes" in out, out
    assert re.search(r"resumed from \S+ at step 10", out), out
    for name in FILES:
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name

    # one process, the same global batch (in this process: no second launch)
    single = tmp_path / "single"
    single.mkdir()
    train_in(single, cache, train__batch_size=4, **short)

    def losses(root):
        rows = (root / FILES[2]).read_text().splitlines()[1:]
        return [float(r.split("\t")[-1]) for r in rows]

    assert losses(straight) == pytest.approx(losses(single), abs=1e-5)
    a, b = (load_file(r / FILES[0]) for r in (straight, single))
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-5)
