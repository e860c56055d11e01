"""Model-file checks both tasks' loaders share: no pickles, no folder's own Python code.
Cheap (no weights read, no heavy import), so params.yaml's check runs them in a second."""

from __future__ import annotations

import json
from pathlib import Path

# Checkpoint formats that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def remote_code_problem(path: Path, name: str) -> str | None:
    """Why a model folder would need its own Python code to load (an `auto_map` in its
    config.json or tokenizer_config.json: transformers' trust_remote_code, which asks [y/N]
    in a terminal and then runs the folder's code), or None. lorapipe never runs it."""
    for file in ("config.json", "tokenizer_config.json"):
        try:
            body = json.loads((path / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(body, dict) and "auto_map" in body:
            return (f"{name!r}: its {file} has an auto_map, so loading it would run the "
                    "folder's own Python code (trust_remote_code), which lorapipe never does; "
                    "use a model whose architecture transformers includes (Qwen2/3, Llama, "
                    "Gemma, Mistral, ...), or delete auto_map from that file if the "
                    "architecture is one of those")
    return None
