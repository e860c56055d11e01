"""Loading a base: a builtin tiny model (its family builds it), a local diffusers folder, or a
single .safetensors file, as the family's diffusers pipeline, returned with its family.

Everything loads offline (lorapipe/__init__ sets the Hugging Face offline switches before
any HF library is imported). Pickle checkpoints are refused (lorapipe.core.params says why and
what to do): loading one runs arbitrary code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.core.params import BUILTIN_PREFIX
from lorapipe.diffusion import families
from lorapipe.diffusion.model_files import source_problem


@dataclass(frozen=True)
class Base:
    """A loaded base and its family (detected once, from model.base, before loading)."""

    pipe: object  # the family's diffusers pipeline, on the CPU
    family: families.Family

def load_pipeline(base: str, config: str = "", root: Path | None = None):
    """The pipeline of load_base."""
    return load_base(base, config, root).pipe


def load_base(base: str, config: str = "", root: Path | None = None,
              prediction_type: str = "auto", noise_schedule: str = "auto") -> Base:
    """The base model named by model.base (and model.config for single files), with its
    family, its scheduler set to model.prediction_type and model.noise_schedule ("auto": as
    the base says)."""
    path = (root or Path.cwd()) / base
    if not base.startswith(BUILTIN_PREFIX):
        if not path.exists():
            raise LorapipeError(f"model.base: {base!r} does not exist")
        problem = source_problem(path, base)
        if problem:
            raise LorapipeError(f"model.base: {problem}")
    family = families.detect(path, base)
    pipe = _load(family, path, base, config, root)
    marks = (families.single_file_keys(path, base)
             if path.is_file() and not base.startswith(BUILTIN_PREFIX) else set())
    family = family.specialize(pipe)
    family.set_schedule(pipe, prediction_type, noise_schedule, marks)
    return Base(pipe, family)


def _load(family: families.Family, path: Path, base: str, config: str, root: Path | None):
    if base.startswith(BUILTIN_PREFIX):
        return family.build_builtin()
    cls = family.pipeline_class
    kwargs = {"local_files_only": True, **family.load_kwargs}
    if path.is_dir():
        try:
            return cls.from_pretrained(path, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LorapipeError(
                f"model.base: cannot load diffusers folder {base!r}: {exc}") from None
    config_dir = (root or Path.cwd()) / config if config else None
    if config_dir is not None:
        kwargs["config"] = str(config_dir)
    try:
        pipe = family.load_single_file(path, config_dir, families.single_file_keys(path, base))
        if pipe is not None:
            return pipe
        return cls.from_single_file(str(path), **kwargs)
    except LorapipeError:
        raise
    except Exception as exc:  # diffusers raises many types for a file it cannot map
        hint = "" if config else (
            "; offline, diffusers needs the model's configs: set model.config to a diffusers "
            f"folder of the same architecture (e.g. a saved {family.example} pipeline)"
        )
        raise LorapipeError(
            f"model.base: {base!r} is not a {family.title} checkpoint diffusers can load "
            f"({type(exc).__name__}: {exc}){hint}"
        ) from None


def training_scheduler(pipe):
    """The noise scheduler the base's DDPM family trains it with (its objective's)."""
    return families.of_pipeline(pipe).objective(pipe).scheduler
