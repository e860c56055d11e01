"""One way to map a function over many files on all cores, with a progress bar."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """Cores this process may use (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """0 means one worker per usable core."""
    return workers if workers > 0 else cpu_count()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_init(parent: int) -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool (one message, no traceback
    from every worker), and die with their parent: a killed stage leaves no worker behind to
    print BrokenPipeError tracebacks when it tries to send its result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:  # no such call in the standard library; prctl(2) via libc
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def map_progress(
    fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str
) -> list[R]:
    """[fn(x) for x in items], in order, on `workers` processes (0 = all cores).

    `fn` must be a top-level function (or a functools.partial of one) so it can be sent to
    worker processes. With one worker it runs in this process: no pool start-up, and
    exceptions keep their traceback.
    """
    n = min(resolve_workers(workers), max(1, len(items)))
    bar = tqdm(total=len(items), desc=desc, unit="img", dynamic_ncols=True)
    results: list[R] = []
    with bar:
        if n == 1:
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        # Small chunks keep all workers busy to the end; large ones cut IPC. ~4 per worker.
        chunksize = max(1, len(items) // (n * 4))
        with multiprocessing.get_context().Pool(n, _worker_init, (os.getpid(),)) as pool:
            for result in pool.imap(fn, items, chunksize=chunksize):
                results.append(result)
                bar.update()
    return results
