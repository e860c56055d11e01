"""The package's shape: the shared core imports no task, nothing imports in a circle (imports
inside functions included), and the stages hand over to the task registry without deciding
anything by task_type themselves."""

from __future__ import annotations

from test_dvc_yaml import PACKAGE, _exists, _file, _imports, named_imports

from conftest import REPO


def module_name(path) -> str:
    """src/lorapipe/core/x.py -> lorapipe.core.x; a package's __init__.py -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, set[str]]:
    """Every module of lorapipe -> the lorapipe modules it imports (anywhere in the file),
    with the packages an import runs (importing a.b.c runs a/__init__ and a/b/__init__)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        graph[name] = {m for m in _imports(path) if m != name and _file(m).exists()}
    return graph


def test_the_core_imports_no_task():
    graph = modules()
    core = {name: deps for name, deps in graph.items() if name.startswith("lorapipe.core")}
    assert len(core) > 10
    tasks = ("lorapipe.diffusion", "lorapipe.llm", "lorapipe.tasks")
    wrong = {name: sorted(d for d in deps if d.startswith(tasks)) for name, deps in core.items()}
    assert not {name: deps for name, deps in wrong.items() if deps}


def named(path) -> set[str]:
    """The lorapipe modules a file names in its imports (anywhere in it), and for an import
    of a module the packages above it, except the file's own packages (running those is
    how Python imports this file, not a dependency of it)."""
    me = module_name(path)
    found = named_imports(path)
    out = set()
    for module in found:
        pieces = module.split(".")
        out |= {".".join(pieces[:i]) for i in range(2, len(pieces) + 1)}
        out.add(module)
    return {m for m in out if _exists(m) and m != me and not (me.startswith(m + ".")
                                                                and m not in found)}


def test_no_import_cycle():
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = named(path)
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_stages_do_not_branch_on_the_task():
    for stage in (REPO / "stages").glob("*.py"):
        text = stage.read_text()
        assert "task_type ==" not in text and '"llm"' not in text and '"sd"' not in text, stage
