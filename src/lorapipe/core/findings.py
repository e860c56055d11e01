"""Findings: what validate reports about a dataset (images or LLM examples), and reading
its text files as UTF-8 with a message that names the real encoding.

Kept free of image libraries, so the LLM task's data checks import it alone.
"""

from __future__ import annotations

import codecs
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

METADATA_NAME = "metadata.csv"


@dataclass
class Finding:
    severity: str  # "error" or "warning"
    code: str  # stable, documented in the README
    message: str
    row: int | None = None  # line number in metadata.csv (the header is line 1)
    file: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = " ".join(
            part for part in (f"line {self.row}" if self.row else "", self.file or "") if part
        )
        return f"{self.severity} {self.code}: {where + ': ' if where else ''}{self.message}"


class HasFindings:
    """What both tasks' validation reports share: their findings by severity."""

    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]


class DatasetError(Exception):
    """metadata.csv as a whole is unusable; carries the finding that says why."""

    def __init__(self, code: str, message: str, file: str = METADATA_NAME):
        super().__init__(message)
        self.finding = Finding("error", code, message, file=file)


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# A data file is read whole into memory: past this it is refused before reading, with the way
# out (split it), rather than reading gigabytes of something that was never a data set.
MAX_DATA_FILE_BYTES = 2 << 30
_NOT_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def read_data_file(path: Path, limit: int = MAX_DATA_FILE_BYTES) -> bytes:
    """The bytes of a data file (metadata.csv, data.jsonl); a DatasetError naming it when it
    is a folder, a FIFO or a device (a symlink to /dev/zero read forever, a FIFO blocked
    validate), or over `limit`. FileNotFoundError passes through."""
    name = path.name
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = next((what for test, what in _NOT_FILES if test(st.st_mode)),
                    "not a regular file")
        raise DatasetError("DATA_NOT_FILE", f"{path} is {kind}, not a file; {name} must be a "
                           "regular file (replace it, or the link to it, with the data)",
                           file=name)
    if st.st_size > limit:
        raise DatasetError("DATA_TOO_LARGE", f"{path} is {st.st_size / 2**30:.1f} GiB, more "
                           f"than the {limit / 2**30:.0f} GiB a data file may hold; split the "
                           "data set or keep only what this run trains on", file=name)
    # O_NONBLOCK: should it have become a FIFO since the stat, the open does not wait
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DatasetError("DATA_NOT_FILE", f"{path} is not a regular file", file=name)
        return f.read(limit + 1)[:limit]


def decode_text(data: bytes) -> str:
    """UTF-8 text (with or without BOM), or a DatasetError that names the real encoding."""
    if data.startswith(_UTF16_BOMS) or (len(data) >= 4 and (data[1::2][:8].count(0) >= 4
                                                            or data[0::2][:8].count(0) >= 4)):
        raise DatasetError(
            "CSV_ENCODING",
            "the file is UTF-16 text (what a spreadsheet's 'Unicode Text' export and Windows "
            "Notepad's 'Unicode' write), not UTF-8; re-save it as UTF-8 (in a spreadsheet: "
            "'CSV UTF-8'), or run: iconv -f UTF-16 -t UTF-8 metadata.csv > fixed.csv",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(
            "CSV_ENCODING",
            f"not UTF-8: byte 0x{data[exc.start]:02x} on line {line}; re-save the file "
            "as UTF-8 (in a spreadsheet: 'CSV UTF-8')",
        ) from None
