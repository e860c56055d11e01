"""Concurrent CPU runs share the cores: every train process registers, the automatic thread
count is the cores divided by the live runs, a killed run stops counting."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO, SAME_DATA_DIR, as_user, hold_registration, make_params
from lorapipe.core import threads


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


def test_a_registry_another_user_made_first_is_refused(tmp_path, shared_tmp, other_user):
    """The attacker makes the victim's predictable registry folder first, with a FIFO (which
    hung train), symlinks named after the next pids to a victim's file (which truncated it)
    and files it holds locked (which set the victim's share: "1 thread, shared by 20000
    runs"). The victim counts itself alone, says why, hangs on nothing, truncates nothing."""
    folder = shared_tmp / f"lorapipe-runs-{os.geteuid()}"
    victim_file = tmp_path / "victims-file.txt"
    victim_file.write_text("precious\n")
    last = int(open("/proc/sys/kernel/ns_last_pid").read())
    attacker = as_user(other_user, f"""
folder = {str(folder)!r}
os.mkdir(folder, 0o777); os.chmod(folder, 0o777)
os.mkfifo(os.path.join(folder, "1"))
for pid in range({last}, {last} + 3000):
    os.symlink({str(victim_file)!r}, os.path.join(folder, str(pid)))
held = []
for pid in range(2, 40):
    f = open(os.path.join(folder, str(pid)), "w"); fcntl.flock(f, fcntl.LOCK_EX); held.append(f)
print("ready", flush=True)
time.sleep(120)""")
    try:
        assert attacker.stdout.readline().strip() == "ready", attacker.communicate()
        env = {**os.environ, "TMPDIR": str(shared_tmp), "PYTHONPATH": str(REPO / "src")}
        env.pop("LORAPIPE_RUNS_DIR", None)
        env.pop("XDG_RUNTIME_DIR", None)
        victim = subprocess.run(
            [sys.executable, "-c", "from lorapipe.core import threads; print(threads.register()); "
             "print(*threads.share(0, cores=8), sep='|')"], env=env, capture_output=True, text=True,
            timeout=60)
    finally:
        attacker.kill()
        attacker.communicate()
    assert victim.returncode == 0, victim.stderr
    refused, share = victim.stdout.splitlines()
    assert f"belongs to uid {other_user[0]}" in refused
    assert share.startswith("8|automatic: 8 cores shared by 1 lorapipe run; other runs not "
                            "counted:"), share
    assert victim_file.read_text() == "precious\n"
