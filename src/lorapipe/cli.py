"""What every stage entry point shares: clean error exits instead of tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable

from lorapipe.errors import LorapipeError

EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130


def run_stage(name: str, main: Callable[[list[str] | None], int | None]) -> None:
    """Run a stage's main(); a LorapipeError prints its message and exits non-zero."""
    try:
        code = main(None)
    except LorapipeError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; outputs were left as they were", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
