"""What every stage entry point shares: clean error exits instead of tracebacks."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from lorapipe.core import warm
from lorapipe.core.errors import LorapipeError

EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130
# How torch's C++ writer reports a failed write (torch.save, accelerate's save_state): it
# loses the errno, so these messages are all there is to recognise a full disk by.
_TORCH_WRITE_ERRORS = ("iostream error", "PytorchStreamWriter failed", "unexpected pos")
_FULL = ("StorageFull", "No space left on device", "QuotaExceeded", "Disk quota exceeded")


def run_stage(name: str, main: Callable[[list[str] | None], int | None],
              warm_start: bool = False) -> None:
    """Run a stage's main(); a LorapipeError, Ctrl-C or a full disk prints one message and
    exits non-zero, without a traceback. warm_start: a torch stage, run in a child of the
    warm server (lorapipe.core.warm) when one can be reached, which skips its imports."""
    if warm_start and warm.enabled():
        code = warm.run_warm(f"stages.{name}")
        if code is not None:
            sys.exit(code)
    try:
        code = main(None)
    except LorapipeError as exc:
        _exit(f"{name}: error: {exc}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _exit(f"{name}: interrupted; outputs were left as they were", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - a full disk, whichever library met it; else re-raised
        message = write_failure(exc)
        if message is None:
            raise
        _exit(f"{name}: error: {message}", EXIT_BAD_INPUT)
    sys.exit(code or 0)


def _exit(message: str, code: int) -> None:
    # A second Ctrl-C while we print and exit must not print a traceback either.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def write_failure(exc: BaseException) -> str | None:
    """A one-line explanation when `exc` is a full disk (or quota), else None."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = exc.filename or os.getcwd()
        cause = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is used up"
    elif isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_ERRORS):
        where = getattr(exc, "filename", None) or os.getcwd()
        cause = (f"torch could not write a file ({str(exc).splitlines()[0][:80]}), which is "
                 "how it reports a full disk")
    elif type(exc).__name__ == "SafetensorError" and any(m in str(exc) for m in _FULL):
        # safetensors' Rust writer: "Error while serializing: IoError(Os { code: 28, kind:
        # StorageFull, ... })", no errno and no file name
        where, cause = os.getcwd(), "the disk is full"
    else:
        return None
    where = os.path.abspath(where)
    return (f"{cause} while writing {where} ({_free(where)}). Nothing was corrupted: every "
            "output is written to a temporary name and renamed into place only when complete, "
            "so the previous outputs are intact and the half-written ones were removed. Free "
            "some space and run again")


def _free(where: str) -> str:
    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB there"
