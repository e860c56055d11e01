"""Per-user folders that no other local user can have made, entered or changed.

The warm server's socket and the CPU-thread registry live in folders with predictable names
(`$TMPDIR/lorapipe-warm-<uid>`): on a shared machine another user can create that name
first (as a folder, or as a symlink to one of theirs) and wait. `mkdir(exist_ok=True)`
accepts either. Here a folder is used only when, checked with lstat after creating it, it is
a real folder (not a symlink), owned by this user, with no access for group or others, in a
parent that others cannot rename it out of (not writable by others, or sticky like /tmp).
$XDG_RUNTIME_DIR (systemd's per-user /run/user/<uid>, 0700) comes first where it is set.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeFolder(Exception):
    """The folder cannot be trusted; the message says why and what to do."""


def user_folder(name: str) -> Path:
    """The per-user folder called `name`: in $XDG_RUNTIME_DIR where it is set and is a
    folder (already the user's alone), else `name-<uid>` in the shared temporary folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / name
    return Path(tempfile.gettempdir()) / f"{name}-{os.geteuid()}"


def private_folder(path: Path) -> Path:
    """Create `path` (0700) if it is missing and return it once it is proven private; else
    UnsafeFolder naming what is wrong."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafeFolder(f"cannot create {path}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
        parent = os.stat(path.parent)
    except OSError as exc:
        raise UnsafeFolder(f"cannot inspect {path}: {exc.strerror}") from None
    me = os.geteuid()
    fix = f"remove it (rm -r '{path}') or point TMPDIR or XDG_RUNTIME_DIR elsewhere"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeFolder(f"{path} is a symlink, which anyone could have made; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFolder(f"{path} is not a folder; {fix}")
    if st.st_uid != me:
        raise UnsafeFolder(f"{path} belongs to uid {st.st_uid}, not to you (uid {me}): "
                           f"another user made it first; {fix}")
    if st.st_mode & 0o077:
        raise UnsafeFolder(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o},"
                           f" not 700); {fix}")
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        raise UnsafeFolder(f"{path.parent} is writable by every user and not sticky, so "
                           f"another user could replace {path.name}; point TMPDIR or "
                           "XDG_RUNTIME_DIR elsewhere")
    return path


def open_private_file(path: Path, flags: int) -> int:
    """os.open of a regular file in a private folder: never through a symlink, never a
    FIFO or device (which would block or read forever), created 0600."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFolder(f"{path} is not a regular file")
    return fd
