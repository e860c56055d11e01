"""Concurrent CPU runs share the cores: every train process registers, the automatic thread
count is the cores divided by the live runs, a killed run stops counting."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO, SAME_DATA_DIR, hold_registration, make_params
from lorapipe import threads


def test_live_runs_count_registered_processes_until_they_die(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    monkeypatch.setenv("LORAPIPE_RUNS_DIR", str(folder))
    assert threads.live_runs() == 0
    a, b = hold_registration(folder), hold_registration(folder)
    try:
        assert threads.live_runs() == 2
        assert threads.share(0, cores=8) == (4, "automatic: 8 cores shared by 2 lorapipe runs")
        os.kill(a.pid, signal.SIGKILL)  # a killed run releases its lock with its life
        a.wait()
        assert threads.live_runs() == 1 and not (folder / str(a.pid)).exists()
        assert threads.share(0, cores=8) == (8, "automatic: 8 cores shared by 1 lorapipe run")
        assert threads.share(0, cores=1, runs=3)[0] == 1  # never fewer than one
        assert threads.share(3, cores=8) == (3, "train.cpu_threads 3")
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait()


def test_registering_twice_in_one_process_is_once(tmp_path, monkeypatch):
    """Stage mains run in one process (the tests, bench/overhead.py) register once; a second
    lock on the same file would wait for the first forever."""
    monkeypatch.setenv("LORAPIPE_RUNS_DIR", str(tmp_path))
    monkeypatch.setattr(threads, "_held", [])
    threads.register()
    threads.register()
    assert threads.live_runs() == 1
    for f in threads._held:
        f.close()


def test_the_train_stage_takes_its_share(tmp_path, example_cache):
    """Beside another registered run it takes half the cores, alone all of them; the line
    says which and why."""
    cores = len(os.sched_getaffinity(0))
    folder = tmp_path / "runs"
    root = tmp_path / "run"
    root.mkdir()
    make_params(root, train__max_steps=2, train__validation__every=2, train__sample_every=0,
                train__checkpoint_every=0, **SAME_DATA_DIR)

    def train() -> str:
        out = subprocess.run(
            [sys.executable, "-m", "stages.train", "--cache", str(example_cache), "--out",
             "lora", "--live", "dvclive", "--logs", "logs", "--checkpoints", "ckpt",
             "--health", "health.md"], cwd=root, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "LORAPIPE_RUNS_DIR": str(folder)})
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    other = hold_registration(folder)
    try:
        out = train()
    finally:
        other.kill()
        other.wait()
    share = max(1, cores // 2)
    assert re.search(rf"; {share} CPU threads? per process \(automatic: {cores} cores shared "
                     r"by 2 lorapipe runs\)", out), out
    time.sleep(0.1)
    assert f"; {cores} CPU thread" in train()  # alone again: every core
    assert not any(folder.iterdir()) or threads.live_runs(folder) == 0
