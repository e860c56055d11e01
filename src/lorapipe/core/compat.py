"""Where a trained adapter will load: the report both tasks write (reports/compatibility.md,
at the params stage, from params alone) and check again against the saved files at the end
of train. The rules are each task's (lorapipe.diffusion.compat, lorapipe.llm.compat), each
from a client's own loader, named in a comment beside it. Light: no torch."""

from __future__ import annotations

from dataclasses import dataclass

MARKS = {"ok": "✔", "no": "✘", "caveat": "⚠"}


@dataclass(frozen=True)
class Row:
    """One client: ok, no or caveat, why, and what to do."""

    client: str
    status: str
    reason: str
    remedy: str = ""


def render(title: str, facts: list[tuple[str, str]], rows: list[Row]) -> str:
    """The report: what was (or will be) trained, then one table row per client."""
    lines = [f"# Where this adapter loads: {title}", ""]
    lines += [f"- {name}: {value}" for name, value in facts]
    lines += ["", "| client | | why | what to do |", "|---|---|---|---|"]
    lines += [f"| {r.client} | {MARKS[r.status]} | {r.reason} | {r.remedy or '-'} |"
              for r in rows]
    lines += ["", "✔ loads as trained; ⚠ loads, read the note; ✘ does not load. Written by the "
              "params stage before training; the train stage checks it against the saved files."]
    return "\n".join(lines) + "\n"


def report(rules, params, root) -> tuple[str, list[Row]]:
    """reports/compatibility.md for these params and its rows; rules: a task's compat
    module (from_params, facts, rows); root: params.yaml's folder, for model.base."""
    adapter = rules.from_params(params, root)
    rows = rules.rows(adapter)
    return render(f"{adapter.method} on {params.model.base}", rules.facts(adapter), rows), rows


def line(rows: list[Row], stage: str = "train") -> str:
    """The one line the params stage prints, and train at its start."""
    return (f"{stage}: loads in: " + ", ".join(f"{r.client} {MARKS[r.status]}" for r in rows)
            + " (reports/compatibility.md)")


def disagreements(expected: list[Row], found: list[Row]) -> list[str]:
    """Clients whose status from the saved files differs from the params-time one."""
    before = {r.client: r.status for r in expected}
    return [f"{r.client}: {MARKS[before.get(r.client, 'no')]} before training, "
            f"{MARKS[r.status]} from the saved files ({r.reason})"
            for r in found if before.get(r.client) != r.status]


def checked(expected: list[Row], found: list[Row]) -> str:
    """The line train prints after saving: the saved files against the params-time report."""
    wrong = disagreements(expected, found)
    if not wrong:
        return "train: compatibility: the saved files load as reports/compatibility.md says"
    return ("train: warning: the saved files do not load as reports/compatibility.md says: "
            + "; ".join(wrong))
