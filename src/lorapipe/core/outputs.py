"""Atomic output writing: a killed stage leaves either the old file or the new one, never half.

Every write goes to a temporary name in the same folder, is flushed to disk, then renamed
over the target (rename is atomic within one filesystem). Temporary names carry the writing
process's id, so the debris of a killed run is recognised and removed by the next one.
Outputs get the permissions the umask gives ordinary files and folders (usually 0644/0755):
a WebUI running as another user must be able to read the LoRA.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_debris(path: str | Path) -> list[Path]:
    """Remove what killed runs left beside `path`: temporary files and folders
    (.<name>.<pid>.<random>.tmp) and replaced old copies (.<name>.old.<pid>) whose writing
    process is gone. Returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:old\.)?(\d+)(?:\..*\.tmp)?$")
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(file_mode())  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                dir=path.parent))
    tmp.chmod(dir_mode())  # mkdtemp makes 0700; outputs are ordinary folders
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def canonical_safetensors(path: Path, extra_metadata: dict[str, str] | None = None) -> None:
    """Rewrite a .safetensors header with sorted keys (and `extra_metadata` added), with the
    umask's file mode.

    The safetensors writer stores metadata from a hash map, so the same tensors and metadata
    can come out in a different key order from one save to the next. Sorting makes equal
    content equal bytes. Tensor offsets are relative to the data section, so they stay valid.
    """
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if extra_metadata:
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra_metadata}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])
    path.chmod(file_mode())  # the safetensors writer creates its files 0600


def read_safetensors(path: Path, missing: str) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file this pipeline wrote; a LorapipeError
    saying `missing` (what to run) when it is not there."""
    from safetensors import safe_open

    from lorapipe.core.errors import LorapipeError

    if not Path(path).exists():
        raise LorapipeError(f"{path} not found; {missing}")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
