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
import stat
from pathlib import Path

from lorapipe.core import private

_held: list = []  # this process's open, locked registration file


def registry() -> Path:
    """The per-user folder of registrations ($XDG_RUNTIME_DIR/lorapipe-runs, else
    $TMPDIR/lorapipe-runs-<uid>); LORAPIPE_RUNS_DIR overrides it (tests, or machines whose
    runs do not share one temporary folder)."""
    configured = os.environ.get("LORAPIPE_RUNS_DIR")
    return Path(configured) if configured else private.user_folder("lorapipe-runs")


def register(folder: Path | None = None) -> str | None:
    """Count this process as a running lorapipe train process until it exits. Once per
    process: a second lock on the same file from this process would wait for the first.
    None, or why this process could not register (a folder another user could have made:
    lorapipe.core.private)."""
    if _held:
        return None
    try:
        folder = private.private_folder(folder or registry())
        # held open (and locked) for the process's lifetime
        fd = private.open_private_file(folder / str(os.getpid()), os.O_RDWR)
    except (OSError, private.UnsafeFolder) as exc:
        return str(exc)
    fcntl.flock(fd, fcntl.LOCK_EX)  # our own new file: nobody else holds it
    _held.append(os.fdopen(fd, "rb+", buffering=0))
    return None


def live_runs(folder: Path | None = None) -> int:
    """Registered processes still alive (this one included, if registered); removes the
    files of dead ones. UnsafeFolder when the folder cannot be trusted."""
    folder = folder or registry()
    if not os.path.lexists(folder):
        return 0
    private.private_folder(folder)
    alive = 0
    for path in folder.iterdir():  # this process's own file is locked too: counted alive
        if not path.name.isdigit():
            continue
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue  # nothing a lorapipe run writes: never opened, never counted
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its process holds the lock: alive
            alive += 1
        else:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return alive


def share(configured: int, cores: int | None = None, runs: int | None = None
          ) -> tuple[int, str]:
    """(threads, why) for train.cpu_threads = `configured` (0 = automatic)."""
    if configured:
        return configured, f"train.cpu_threads {configured}"
    cores = cores or len(os.sched_getaffinity(0))
    unsafe = ""
    if runs is None:
        try:
            runs = live_runs()
        except private.UnsafeFolder as exc:
            runs, unsafe = 1, f"; other runs not counted: {exc}"
    runs = max(1, runs)
    return max(1, cores // runs), (f"automatic: {cores} cores shared by {runs} lorapipe "
                                   f"run{'s' if runs > 1 else ''}{unsafe}")
