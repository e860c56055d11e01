"""Training checkpoints: save, verify and find, so a killed run resumes where it stopped.

A checkpoint is accelerate's save_state (optimizer, LR scheduler, RNG states; the LoRA is
saved by our hook instead of the whole base), extra files (the best LoRA so far, the sample
images logged so far) and train_state.json: step, logged history, run name, the fingerprint
of everything that decides the result, and the SHA-256 of every other file. train_state.json
is written last, so a checkpoint is trusted only when it exists and every file still has its
recorded digest; a damaged newest checkpoint falls back to the one before (the newest two are
kept), or to a fresh start, and the run says which.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from lorapipe.core import outputs

STATE_FILE = "train_state.json"
KEEP = 2  # checkpoints kept: the newest, and one to fall back to if it is damaged


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(params, cache_file: Path) -> str:
    """Everything that decides the trained bytes: model, lora and train params, the cache,
    and the content of lora.init (a path alone could point at a changed file)."""
    parts = {
        "model": asdict(params.model),
        "lora": asdict(params.lora),
        "train": asdict(params.train),
        "cache": file_digest(cache_file),
    }
    init = Path(params.lora.init) if params.lora.init else None
    if init is not None and init.is_file():
        parts["init"] = file_digest(init)
    elif init is not None and init.is_dir():
        parts["init"] = {p.name: file_digest(p) for p in sorted(init.glob("*.safetensors"))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def save(accelerator, folder: Path, step: int, state: dict,
         tensors: dict[str, dict | None] | None = None,
         files: dict[str, Path] | None = None) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest KEEP.
    `tensors` are extra safetensors files (name -> state dict; None = absent); `files` are
    copied in (name in the checkpoint -> source path)."""
    final = Path(folder) / f"step_{step:07d}"
    with outputs.atomic_dir(final) as tmp:
        try:
            accelerator.save_state(str(tmp))
        except RuntimeError as exc:  # torch's writer names no file; say where, for the user
            exc.filename = str(final)
            raise
        for name, values in (tensors or {}).items():
            if values is not None:
                save_file(values, str(tmp / name))
        for name, source in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        digests = {p.relative_to(tmp).as_posix(): file_digest(p)
                   for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "files": digests}))
    for old in sorted(Path(folder).glob("step_*"))[:-KEEP]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def _state(path: Path) -> dict | None:
    """A checkpoint's train_state.json, or None when it is missing or unreadable."""
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def damage(path: Path, state: dict | None = None) -> str | None:
    """What is wrong with checkpoint `path` (whose train_state.json is `state`, when already
    read), or None when every file has its recorded digest."""
    state = state if state is not None else _state(path)
    if state is None:
        return f"{STATE_FILE} is missing or unreadable (the run was killed while saving?)"
    recorded = state.get("files")
    if not isinstance(recorded, dict):
        return "it records no file digests (made by an older lorapipe)"
    for name, digest in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_digest(file) != digest:
            return f"{name} is damaged (its content differs from when it was saved: truncated?)"
    return None


def find(folder: Path, fp: str) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint made with fingerprint `fp`, and a note on each one
    passed over (damaged, or made with other params or data)."""
    notes = []
    for path in sorted(Path(folder).glob("step_*"), reverse=True):
        state = _state(path)
        if state is not None and state.get("fingerprint") != fp:
            notes.append(f"ignoring {path}: made with other params or data")
            continue
        problem = damage(path, state)
        if problem:
            notes.append(f"ignoring {path}: {problem}")
            continue
        return path, notes
    return None, notes


def read_tensors(path: Path, name: str) -> dict | None:
    file = path / name
    return load_file(str(file)) if file.exists() else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def run_names(folder: Path) -> set[str]:
    """The TensorBoard run names of the checkpoints in `folder` (runs that may resume)."""
    states = (_state(path) for path in Path(folder).glob("step_*"))
    return {state["run_name"] for state in states if state and "run_name" in state}


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
