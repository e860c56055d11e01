"""The LLM task's base-model checks, beside its loader (lorapipe.llm.models): a Hugging Face
save_pretrained folder with safetensors weights and no code of its own; no weights read."""

from __future__ import annotations

from pathlib import Path

from lorapipe.core.model_files import PICKLE_SUFFIXES, remote_code_problem


def is_model_folder(path: Path) -> bool:
    """A transformers model folder (config.json) rather than a diffusers one."""
    return path.is_dir() and (path / "config.json").exists() \
        and not (path / "model_index.json").exists()


def llm_source_problem(path: Path, name: str) -> str | None:
    """Why a path cannot be an LLM base, or None."""
    if not path.is_dir() or not (path / "config.json").exists():
        return (f"{name!r} is not a Hugging Face model folder (config.json and *.safetensors, "
                "as save_pretrained writes)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            return (f"{name!r} holds only pickle weights ({', '.join(pickles[:3])}), which can "
                    "run code when loaded; lorapipe loads only .safetensors. Convert once "
                    "where you trust the files: `AutoModelForCausalLM.from_pretrained(dir)"
                    ".save_pretrained(dir2)` writes safetensors; set model.base to dir2")
        return f"{name!r} holds no .safetensors weights"
    return remote_code_problem(path, name)
