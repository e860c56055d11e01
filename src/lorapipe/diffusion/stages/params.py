"""params, image task: where the adapter these params train will load
(reports/compatibility.md), from params alone. Light: the params stage imports no torch."""

from __future__ import annotations

from pathlib import Path

from lorapipe.core import compat as core_compat
from lorapipe.diffusion import compat


def report(params, root: Path) -> tuple[str, list[core_compat.Row]]:
    """The report's text and its rows (root: params.yaml's folder, for model.base)."""
    adapter = compat.from_params(params, root)
    rows = compat.rows(adapter)
    title = f"{adapter.method} on {params.model.base}"
    return core_compat.render(title, compat.facts(adapter), rows), rows
