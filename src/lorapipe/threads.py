"""CPU threads for concurrent runs: the machine's cores shared among the lorapipe train
processes running on it.

torch starts one thread per core in every process, so two CPU runs side by side (a `dvc
queue start -j 2` sweep, a run in a second terminal) ask for twice the cores and both crawl
(measured on 2 cores: 5.4x slower per step than alone). Each train process registers here
when it starts, by holding an exclusive lock on a file named after its pid in a per-user
folder; a process that dies releases its lock with it, so a killed run is never counted.
The share is decided once, after the heavy imports, so runs started together (queue
workers) have all registered by then. No library tracks processes across unrelated
launches (accelerate and torch.distributed know only their own process group).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

_held: list = []  # this process's open, locked registration file


def registry() -> Path:
    """The per-user folder of registrations; LORAPIPE_RUNS_DIR overrides it (tests, or
    machines whose runs do not share one temporary folder)."""
    configured = os.environ.get("LORAPIPE_RUNS_DIR")
    return Path(configured) if configured else (
        Path(tempfile.gettempdir()) / f"lorapipe-runs-{os.getuid()}")


def register(folder: Path | None = None) -> None:
    """Count this process as a running lorapipe train process until it exits. Once per
    process: a second lock on the same file from this process would wait for the first."""
    if _held:
        return
    folder = folder or registry()
    folder.mkdir(mode=0o700, exist_ok=True)
    # held open (and locked) for the process's lifetime, not closed by a with block
    f = open(folder / str(os.getpid()), "w")  # noqa: SIM115
    fcntl.flock(f, fcntl.LOCK_EX)
    _held.append(f)


def live_runs(folder: Path | None = None) -> int:
    """Registered processes still alive (this one included, if registered); removes the
    files of dead ones."""
    folder = folder or registry()
    if not folder.exists():
        return 0
    alive = 0
    for path in folder.iterdir():  # this process's own file is locked too: counted alive
        try:
            with open(path) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its process holds the lock: alive
            alive += 1
        except OSError:  # removed meanwhile
            pass
        else:
            path.unlink(missing_ok=True)
    return alive


def share(configured: int, cores: int | None = None, runs: int | None = None
          ) -> tuple[int, str]:
    """(threads, why) for train.cpu_threads = `configured` (0 = automatic)."""
    if configured:
        return configured, f"train.cpu_threads {configured}"
    cores = cores or len(os.sched_getaffinity(0))
    runs = max(1, live_runs() if runs is None else runs)
    return max(1, cores // runs), (f"automatic: {cores} cores shared by {runs} lorapipe "
                                   f"run{'s' if runs > 1 else ''}")
