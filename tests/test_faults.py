"""Faults a real user meets: a stage killed or interrupted mid-way, a full disk, a restrictive
or permissive umask. Each runs the real stage in a subprocess."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_params, tree_digest, write_csv
from lorapipe.core import outputs

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """60 noisy 1024 px JPEGs and the usable.csv validate would write: preprocess takes a
    few seconds on them, long enough to be interrupted."""
    root = tmp_path_factory.mktemp("photos")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        pixels = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"p{i:02d}.jpg", quality=90)
        rows.append([f"p{i:02d}.jpg", f"photo {i}"])
    write_csv(images / "metadata.csv", rows)
    write_csv(root / "usable.csv", rows)
    return root


def _as_from_a_terminal() -> None:
    """Ctrl-C's default action in the stage, as a shell at a terminal starts it: a run of
    the tests in the background (`cmd &` without job control, nohup) hands its children
    SIGINT ignored, and an ignored signal stays ignored across exec, so the stage would
    rightly not see the Ctrl-C at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def preprocess(work: Path, photos: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.preprocess", "--images", str(photos / "images"),
         "--usable", str(photos / "usable.csv"), "--out", "data/processed"],
        cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=_as_from_a_terminal, **popen)


def wait_for_temp_folder(work: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 60
    while True:
        found = list((work / "data").glob(".processed.*.tmp")) if (work / "data").exists() else []
        if found and any(found[0].iterdir()):  # the workers are writing
            return found[0]
        assert proc.poll() is None, "preprocess finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)


def workspace(tmp_path: Path, resolution: int = 256) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    make_params(work, preprocess__resolution=resolution, preprocess__workers=2)
    return work


def test_killed_preprocess_leaves_no_debris_and_no_tracebacks(tmp_path, photos):
    work = workspace(tmp_path)
    proc = preprocess(work, photos)
    debris = wait_for_temp_folder(work, proc)
    os.kill(proc.pid, signal.SIGKILL)  # the stage only, as when DVC or the OOM killer stops it
    _, err = proc.communicate(timeout=60)  # until every worker has closed its end
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert debris.exists() and not (work / "data/processed").exists()

    rerun = preprocess(work, photos)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert not debris.exists()  # the rerun removed what the killed run left
    assert sorted(p.name for p in (work / "data").iterdir()) == ["processed"]


def test_ctrl_c_prints_one_line(tmp_path, photos):
    work = workspace(tmp_path)
    proc = preprocess(work, photos)
    wait_for_temp_folder(work, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: to the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "preprocess: interrupted; outputs were left as they were" in err
    assert "Traceback" not in err, err
    assert not (work / "data/processed").exists()


def _modes(folder: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode))
            for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask, expected", [
    (0o022, {("dir", 0o755), ("file", 0o644)}),  # readable by a WebUI running as another user
    (0o077, {("dir", 0o700), ("file", 0o600)}),  # private when the user asks for it
])
def test_outputs_honour_the_umask(tmp_path, umask, expected, example_cache):
    from conftest import train_in

    old = os.umask(umask)
    try:
        with outputs.atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a.txt").write_text("a")
        outputs.write_text(tmp_path / "folder" / "b.txt", "b")
        assert _modes(tmp_path / "folder") == expected
        train_in(tmp_path, example_cache, train__max_steps=2)  # the real LoRA output
        assert _modes(tmp_path / "lora") == expected
    finally:
        os.umask(old)


# --- a full disk ------------------------------------------------------------------------

def in_small_filesystem(script: str, folder: Path, size_kb: int) -> subprocess.CompletedProcess:
    """Run a shell script with `folder` mounted as a tmpfs of size_kb KiB, in a mount
    namespace of its own (nothing outside sees the mount; it goes when the script ends)."""
    mount = f"mount -t tmpfs -o size={size_kb}k tmpfs '{folder}' && cd '{folder.parent}' && "
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs tmpfs '{folder}'"],
                               capture_output=True)
        if probe.returncode == 0:
            return subprocess.run([*prefix, "sh", "-c", mount + script], env=ENV,
                                  capture_output=True, text=True, timeout=300)
    pytest.skip("this machine cannot mount a small filesystem (no mount namespaces)")


def test_full_disk_is_one_line_and_keeps_the_previous_output(tmp_path, photos):
    work = workspace(tmp_path, resolution=64)
    (work / "data").mkdir()
    py = sys.executable
    stage = (f"'{py}' -m stages.preprocess --images '{photos / 'images'}' "
             f"--usable '{photos / 'usable.csv'}' --out data/processed")
    script = f"""
        {stage} > /dev/null 2>&1 || exit 9
        sha256sum data/processed/* > before.txt
        # fill the disk but 100 KiB, then ask for images 64 times the size
        head -c $(( $(df -k --output=avail data | tail -1) * 1024 - 102400 )) /dev/zero \\
            > data/filler 2>/dev/null
        sed -i 's/resolution: 64/resolution: 512/' params.yaml
        {stage}
        echo "exit $?"
        sha256sum data/processed/* > after.txt
        cmp before.txt after.txt && echo "previous output intact"
        ls -a data
    """
    result = in_small_filesystem(script, work / "data", size_kb=8192)
    out, err = result.stdout, result.stderr
    assert "exit 1" in out, (out, err)
    assert "preprocess: error: the disk is full while writing" in err, err
    assert "Nothing was corrupted" in err and "MiB free" in err
    assert "Traceback" not in err, err
    assert "previous output intact" in out
    assert ".processed." not in out  # no half-written folder left behind


def test_full_disk_during_training(tmp_path, example_cache):
    """The train stage's writes (checkpoints through torch.save, dvclive, the LoRA) on a disk
    that fills up: one message, no traceback."""
    work = tmp_path / "work"
    work.mkdir()
    make_params(work, train__max_steps=60, train__checkpoint_every=5,
                train__validation__every=20, train__sample_every=0)
    (work / "out").mkdir()
    script = (f"'{sys.executable}' -m stages.train --cache '{example_cache}' --out out/lora "
              "--live out/dvclive --logs out/logs --checkpoints out/ckpt "
              "--health out/health.md; echo \"exit $?\"")
    result = in_small_filesystem(script, work / "out", size_kb=160)
    out, err = result.stdout, result.stderr
    assert "exit 1" in out, (out, err)
    assert "train: error:" in err and ("full disk" in err or "disk is full" in err), err
    assert f"while writing {work / 'out'}" in err and "MiB free of 0.2 MiB there" in err
    assert "Traceback" not in err, err


def test_damaged_checkpoint_digest_is_found(tmp_path):
    """A checkpoint file changed after saving is named, not trusted."""
    from lorapipe.core import checkpoints

    folder = tmp_path / "step_0000010"
    folder.mkdir()
    (folder / "optimizer.bin").write_bytes(b"x" * 100)
    digest = checkpoints.file_digest(folder / "optimizer.bin")
    (folder / checkpoints.STATE_FILE).write_text(
        f'{{"step": 10, "files": {{"optimizer.bin": "{digest}"}}}}')
    assert checkpoints.damage(folder) is None
    (folder / "optimizer.bin").write_bytes(b"x" * 50)  # truncated
    assert "optimizer.bin is damaged" in checkpoints.damage(folder)
    (folder / "optimizer.bin").unlink()
    assert "optimizer.bin is missing" in checkpoints.damage(folder)
    assert tree_digest(folder)  # the check never repairs or deletes anything


def test_full_disk_while_safetensors_writes_is_one_line(tmp_path, example_processed):
    """The encode cache is written by safetensors' own (Rust) writer, whose full-disk error
    is a SafetensorError with no errno: one message all the same, no traceback."""
    work = tmp_path / "work"
    work.mkdir()
    make_params(work)
    (work / "out").mkdir()
    script = (f"LORAPIPE_WARM=0 '{sys.executable}' -m stages.encode --images "
              f"'{example_processed}' --out out/cache; echo \"exit $?\"")
    result = in_small_filesystem(script, work / "out", size_kb=64)
    out, err = result.stdout, result.stderr
    assert "exit 1" in out, (out, err)
    assert "encode: error: the disk is full while writing" in err, err
    assert "Traceback" not in err and "SafetensorError" not in err, err
