"""A throwaway git + DVC copy of this repository for the pipeline benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def clone(prefix: str) -> Path:
    """A clone of the committed HEAD in a temporary folder (its own DVC cache)."""
    root = Path(tempfile.mkdtemp(prefix=prefix)) / "repo"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True)
    return root


def env(**extra: str) -> dict[str, str]:
    """This Python's folder first on PATH (the stages run `python -m ...`), no analytics."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", **extra}


def timed(root: Path, *cmd: str, **extra: str) -> tuple[float, str]:
    """(seconds, output) of one command in `root`; raises with its output if it fails."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env(**extra), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return seconds, out.stdout + out.stderr
