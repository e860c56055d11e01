"""Checkpoints: a SIGKILLed train stage, run again, resumes and ends with the same bytes as
an uninterrupted run; a checkpoint made with other params is never resumed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, make_params

STEPS = 60
EVERY = 20
FILES = ("lora/pytorch_lora_weights.safetensors", "lora/lora_webui.safetensors",
         "dvclive/plots/metrics/loss/current.tsv", "dvclive/plots/metrics/loss/train/fixed.tsv")


def start(root: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--cache", str(cache), "--out", "lora",
         "--live", "dvclive", "--logs", "logs", "--checkpoints", "ckpt", "--health", "health.md"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a kill reaches launched workers too
    )


def run_to_end(root: Path, cache: Path) -> str:
    proc = start(root, cache)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def kill_after_checkpoint(root: Path, cache: Path) -> None:
    proc = start(root, cache)
    deadline = time.time() + 120
    while not (root / "ckpt" / f"step_{EVERY:07d}").exists():
        assert proc.poll() is None, "finished before the first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "lora").exists()  # nothing final was written


def setup(root: Path, **overrides) -> Path:
    root.mkdir()
    make_params(root, train__max_steps=STEPS, train__checkpoint_every=EVERY,
                train__validation__every=EVERY, train__sample_every=0, **overrides)
    return root


def test_killed_run_resumes_to_the_same_bytes(tmp_path, example_cache):
    straight = setup(tmp_path / "straight")
    run_to_end(straight, example_cache)
    assert not (straight / "ckpt").exists() or not any((straight / "ckpt").iterdir())

    killed = setup(tmp_path / "killed")
    kill_after_checkpoint(killed, example_cache)
    out = run_to_end(killed, example_cache)
    assert re.search(r"resumed from \S+ at step (20|40)", out), out
    for name in FILES:
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name

    # a checkpoint left by a run with another seed is passed over, not resumed
    other = setup(tmp_path / "other", train__seed=1)
    kill_after_checkpoint(other, example_cache)
    make_params(other, train__max_steps=STEPS, train__checkpoint_every=EVERY,
                train__validation__every=EVERY, train__sample_every=0)  # the straight run's
    out = run_to_end(other, example_cache)
    assert "made with other params or data" in out and "resumed from" not in out
    for name in FILES[:2]:
        assert (other / name).read_bytes() == (straight / name).read_bytes(), name


def test_two_process_run_resumes_to_the_same_result(tmp_path, example_cache):
    """The same under `accelerate launch` with 2 CPU processes (gloo)."""
    straight = setup(tmp_path / "straight", train__num_processes=2, train__batch_size=2)
    run_to_end(straight, example_cache)
    killed = setup(tmp_path / "killed", train__num_processes=2, train__batch_size=2)
    kill_after_checkpoint(killed, example_cache)
    out = run_to_end(killed, example_cache)
    assert re.search(r"resumed from \S+ at step (20|40)", out), out
    for name in FILES:
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
