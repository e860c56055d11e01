"""The image task's base-model checks, beside its loader (lorapipe.diffusion.models): a
diffusers folder or a single .safetensors file, never a pickle; no weights read."""

from __future__ import annotations

from pathlib import Path

from lorapipe.core.model_files import PICKLE_SUFFIXES, remote_code_problem


def source_problem(path: Path, name: str) -> str | None:
    """Why an existing path cannot be an image base model, or None."""
    if path.is_dir():
        if (path / "config.json").exists() and not (path / "model_index.json").exists():
            return (f"{name!r} is a Hugging Face model folder (config.json), not a diffusers "
                    "pipeline (model_index.json); for a language model set task_type: llm")
        if not (path / "model_index.json").exists():
            return (f"{name!r} is a folder but not a diffusers model (no model_index.json) "
                    "nor a Hugging Face language model (no config.json); give a diffusers "
                    "folder (save_pretrained), a .safetensors file or, with task_type llm, a "
                    "Hugging Face model folder")
        # a diffusers folder's components (text_encoder/, tokenizer/, ...) are loaded by
        # transformers, which would ask to run any code their configs name
        for part in sorted(p for p in path.iterdir() if p.is_dir()):
            if problem := remote_code_problem(part, f"{name}/{part.name}"):
                return problem
        return None
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return (f"{name!r} is a pickle checkpoint ({suffix}), which can run code when loaded; "
                "lorapipe loads only .safetensors. Convert it once where you trust the file, "
                "e.g. `StableDiffusionPipeline.from_single_file(path).save_pretrained(dir)`, "
                "and set model.base to dir")
    if suffix != ".safetensors":
        return f"{name!r} is not a .safetensors checkpoint or a diffusers folder"
    return None
