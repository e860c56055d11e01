"""The task registry: task_type -> the package that does the work of each stage.

A task is a package with a light `rules` module (its part of the params check, imported for
every check) and a `stages` package with one module per stage (validate, preprocess, encode,
train, sample), each imported only when that stage runs that task: a stage's code deps in
dvc.yaml are its own modules of each task, not the whole task. The stages call
`load_params` and `stage` and nothing task-specific; the core (lorapipe.core) imports no
task, so this module sits beside it, not inside it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from lorapipe.core import params as core_params
from lorapipe.diffusion import rules as diffusion_rules
from lorapipe.diffusion.model_files import source_problem
from lorapipe.llm import rules as llm_rules
from lorapipe.llm.model_files import is_model_folder, llm_source_problem

PACKAGES = {"sd": "lorapipe.diffusion", "llm": "lorapipe.llm"}  # task_type -> package
RULES = {rules.name: rules for rules in (diffusion_rules.RULES, llm_rules.RULES)}
assert tuple(RULES) == core_params.TASKS == tuple(PACKAGES)


def model_source_problem(path: Path, name: str) -> str | None:
    """Why an existing path cannot be a base model of either task, or None: a transformers
    model folder is checked as an LLM base, anything else as an image base."""
    if is_model_folder(path):
        return llm_source_problem(path, name)
    return source_problem(path, name)


CHECKER = core_params.Checker(RULES, model_source_problem)


def load_params(path: str | Path = "params.yaml") -> core_params.Params:
    """Read and check params.yaml with every task's rules."""
    return core_params.load_params(path, CHECKER)


def parse_params(raw: object, root: Path, source: str = "params.yaml") -> core_params.Params:
    return core_params.parse_params(raw, root, CHECKER, source)


def stage(params, name: str) -> ModuleType:
    """Stage `name`'s module of params.task_type's task (lorapipe.<task>.stages.<name>).
    tests/test_dvc_yaml.py follows this call into both tasks' modules of each stage."""
    return importlib.import_module(f"{PACKAGES[params.task_type]}.stages.{name}")
