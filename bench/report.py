"""What every benchmark does at the end: write its JSON result and print a table."""

from __future__ import annotations

import json
import re
from pathlib import Path


def table(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> None:
    """Print rows under a title; columns are (header, row key, format spec such as '>8.2f');
    the spec's width also sets the header's."""
    print(f"\n{title}")
    widths = [max(len(h), int(re.match(r"[<>^]?(\d*)", spec).group(1) or 0))
              for h, _, spec in columns]
    aligns = ["<" if spec.startswith("<") else ">" for _, _, spec in columns]
    print(" ".join(f"{h:{a}{w}}" for (h, _, _), a, w in zip(columns, aligns, widths,
                                                             strict=True)))
    for row in rows:
        cells = [format(row[key], spec) if key in row else "-" for _, key, spec in columns]
        print(" ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True)))


def write(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
