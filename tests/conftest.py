"""Shared test helpers: build small datasets (good and bad) in temporary folders."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_csv(path: Path, rows: list[list[str]], header=("file_name", "text")) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def rgb_image(path: Path, size=(96, 80), colour=(200, 60, 40), **save) -> Path:
    Image.new("RGB", size, colour).save(path, **save)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """Name -> sha256 of every file (links not followed), to prove a folder is untouched."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            if p.is_symlink():
                out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
            else:
                out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def dataset(tmp_path):
    """A folder with three good 96x80 images and a metadata.csv; returns its path."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        rgb_image(folder / f"img{i}.png", colour=colour)
        rows.append([f"img{i}.png", f"caption {i}"])
    write_csv(folder / "metadata.csv", rows)
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working folder with the repository's params.yaml, for running stage mains in-process.

    Returns a function that writes params.yaml with overrides {"section.key": value}.
    """
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((REPO / "params.yaml").read_text())

    def set_params(**overrides):
        params = {k: dict(v) for k, v in base.items()}
        for dotted, value in overrides.items():
            section, key = dotted.split("__")
            params[section][key] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return tmp_path

    return set_params


def copy_repo(dest: Path) -> Path:
    """Copy the repository's tracked and unignored files to `dest` (what a clone would hold)."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest
