"""params, LLM task: where the adapter these params train will load
(reports/compatibility.md), from params alone, by lorapipe.llm.compat's rules. Light: the
params stage imports no torch."""

from __future__ import annotations

from lorapipe.core import compat as core_compat
from lorapipe.llm import compat


def report(params, root):
    return core_compat.report(compat, params, root)
