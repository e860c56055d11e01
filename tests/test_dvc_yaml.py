"""dvc.yaml against the code: each stage lists exactly the lorapipe modules it imports (so an
edit reruns the stages it affects, and only those), and every interpolated path is quoted."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "lorapipe"


def named_imports(path) -> set[str]:
    """The lorapipe modules a file's import statements name, anywhere in it (top level or
    inside functions): `from lorapipe.x import y` names lorapipe.x.y where y is a module,
    else lorapipe.x."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorapipe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("lorapipe"):
            subs = {f"{node.module}.{a.name}" for a in node.names
                    if _exists(f"{node.module}.{a.name}")}
            found |= subs or {node.module}
    return found


def _imports(path) -> set[str]:
    """The lorapipe modules a file imports anywhere, with the packages that hold them
    (importing lorapipe.diffusion.families.sd runs families/__init__)."""
    return {".".join(m.split(".")[:i]) for m in named_imports(path)
            for i in range(1, m.count(".") + 2)}


def _exists(module: str) -> bool:
    parts = module.split(".")[1:]
    return (PACKAGE.joinpath(*parts).with_suffix(".py").exists()
            or (PACKAGE.joinpath(*parts) / "__init__.py").exists())


def _file(module: str):
    folder = PACKAGE.joinpath(*module.split(".")[1:])
    return folder / "__init__.py" if (folder / "__init__.py").exists() \
        else folder.with_suffix(".py")


def import_closure(stage_file) -> set[str]:
    """Every file of the package that `python -m stages.<name>` can import, as dvc.yaml
    writes the paths. A stage that hands over through the task registry
    (lorapipe.tasks.stage(params, name)) imports that stage's module of every task."""
    todo, seen = list(_imports(stage_file)), set()
    if "lorapipe.tasks" in todo:
        from lorapipe.tasks import PACKAGES

        handed = [f"{package}.stages.{stage_file.stem}" for package in PACKAGES.values()]
        todo += [".".join(m.split(".")[:i]) for m in handed if _exists(m) for i in (2, 3, 4)]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imports(_file(module))
    return {_file(m).relative_to(REPO).as_posix() for m in seen}


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_its_import_closure(name):
    stage_file = REPO / "stages" / f"{name}.py"
    deps = [d for d in STAGES[name]["deps"] if isinstance(d, str)]
    listed = {d for d in deps if d.startswith("src/")}
    assert f"stages/{name}.py" in deps
    assert listed == import_closure(stage_file), (
        f"dvc.yaml stage {name}: missing {sorted(import_closure(stage_file) - listed)}, "
        f"not imported {sorted(listed - import_closure(stage_file))}")


def test_the_closure_follows_imports_inside_functions():
    """train imports training only inside main(); training pulls in the rest."""
    closure = import_closure(REPO / "stages" / "train.py")
    assert {"src/lorapipe/core/training.py", "src/lorapipe/core/health.py",
            "src/lorapipe/__init__.py"} <= closure
    assert "src/lorapipe/diffusion/metadata.py" not in closure


def test_interpolated_paths_are_quoted_in_commands():
    """`data.dir: data/my photos` must stay one argument."""
    for name, stage in STAGES.items():
        unquoted = re.findall(r'(?<!")\$\{[^}]+\}(?!")', stage["cmd"])
        assert not unquoted, f"stage {name}: {unquoted} unquoted in its cmd"


def test_the_data_stages_start_without_torch():
    """params, validate and preprocess import everything they use and never torch (about a
    second of each stage's start-up; python -X importtime, bench/overhead.py)."""
    import subprocess
    import sys

    code = ("import sys, stages.params, stages.validate, stages.preprocess; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'dvclive') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
