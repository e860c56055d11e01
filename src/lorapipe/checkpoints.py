"""Training checkpoints: save and find, so a killed run resumes where it stopped.

A checkpoint is accelerate's save_state (optimizer, LR scheduler, RNG states; the LoRA is
saved by our hook instead of the whole UNet) plus train_state.json (step, logged history,
run name) and the fingerprint of everything that decides the result. A checkpoint whose
fingerprint differs from the current run's was made with other params or data and is never
resumed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from lorapipe import outputs

STATE_FILE = "train_state.json"


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
         tensors: dict[str, dict | None] | None = None) -> Path:
    """Write checkpoint `step` atomically, then drop older ones (only the newest is kept).
    `tensors` are extra safetensors files (name -> state dict; None = absent)."""
    final = Path(folder) / f"step_{step:07d}"
    with outputs.atomic_dir(final) as tmp:
        accelerator.save_state(str(tmp))
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}))
        for name, values in (tensors or {}).items():
            if values is not None:
                save_file(values, str(tmp / name))
    for old in Path(folder).glob("step_*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def find(folder: Path, fp: str) -> tuple[Path | None, list[str]]:
    """The newest checkpoint made with fingerprint `fp`, and notes on those passed over."""
    notes = []
    best, best_step = None, -1
    for path in sorted(Path(folder).glob("step_*")):
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            notes.append(f"ignoring {path}: incomplete checkpoint")
            continue
        if state.get("fingerprint") != fp:
            notes.append(f"ignoring {path}: made with other params or data")
        elif state["step"] > best_step:
            best, best_step = path, state["step"]
    return best, notes


def read_tensors(path: Path, name: str) -> dict | None:
    file = path / name
    return load_file(str(file)) if file.exists() else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def clear(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
