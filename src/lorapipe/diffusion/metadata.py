"""metadata.csv reading and the dataset validation rules.

A dataset is a folder of images plus metadata.csv with one row per image: the image's path
relative to the folder and its caption (the layout of Hugging Face's `imagefolder`).
Every problem becomes a Finding with a stable code; see README "Validation codes".
"""

from __future__ import annotations

import csv
import difflib
import io
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from lorapipe.core.findings import (
    METADATA_NAME,
    DatasetError,
    Finding,
    HasFindings,
    decode_text,
    read_data_file,
)
from lorapipe.core.parallel import map_progress
from lorapipe.diffusion.images import (
    ImageProblem,
    image_extensions,
    inspect_image,
    normalise_name,
    resolve_inside,
)

_OTHER_DELIMITERS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}
FILE_COLUMNS = ("file_name", "filename", "image")
TEXT_COLUMNS = ("text", "prompt", "caption")


@dataclass
class Row:
    line: int
    file_name: str  # as written in metadata.csv (stripped): what findings show the user
    text: str
    extra: list[str] = field(default_factory=list)  # non-empty cells past the header's columns

    @property
    def name(self) -> str:
        """The normalised name every lookup uses (duplicates, the file, unlisted images,
        usable.csv): forward slashes, Unicode NFC."""
        return normalise_name(self.file_name) if self.file_name else ""


@dataclass
class Report(HasFindings):
    rows: int = 0
    usable: list[Row] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # usable: name -> (w, h)

    def summary(self) -> dict:
        """Counts only, so `dvc metrics show` and `dvc exp show` can display them."""
        return {
            "rows": self.rows,
            "usable": len(self.usable),
            "rows_with_errors": self.rows - len(self.usable) if self.rows else 0,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "unlisted": sum(f.code == "UNLISTED_IMAGE" for f in self.findings),
        }


def _pick_column(header: list[str], aliases: tuple[str, ...], what: str) -> int:
    names = [h.strip().lower() for h in header]
    found = [i for i, h in enumerate(names) if h in aliases]
    if len(found) > 1:
        both = " and ".join(repr(header[i]) for i in found)
        raise DatasetError("CSV_HEADER", f"columns {both} both name the {what}; keep one")
    if found:
        return found[0]
    hint = ""
    for h in header:
        close = difflib.get_close_matches(h.strip().lower(), aliases, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {close[0]!r} instead of {h!r}?"
            break
    raise DatasetError(
        "CSV_HEADER",
        f"no {what} column: the header needs one of {', '.join(aliases)} "
        f"(found: {', '.join(repr(h) for h in header) or 'nothing'}){hint}",
    )


def _check_delimiter(header: list[str]) -> None:
    """A header read as one cell that another delimiter splits into our columns: say so,
    instead of suggesting a column name."""
    if len(header) != 1:
        return
    for delimiter, plural in _OTHER_DELIMITERS.items():
        cells = [c.strip().lower() for c in header[0].split(delimiter)]
        if len(cells) > 1 and set(cells) & set(FILE_COLUMNS) and set(cells) & set(TEXT_COLUMNS):
            raise DatasetError(
                "CSV_DELIMITER",
                f"the columns are separated by {plural} ({header[0]!r}), not commas; re-save "
                "the file as comma-separated CSV (in a spreadsheet: 'CSV UTF-8 (comma "
                "delimited)')",
            )


def read_metadata(csv_path: str | Path) -> list[Row]:
    """Parse metadata.csv (UTF-8, with or without BOM); raise DatasetError if unusable."""
    csv_path = Path(csv_path)
    try:
        data = read_data_file(csv_path)
    except FileNotFoundError:
        raise DatasetError(
            "CSV_MISSING",
            f"{csv_path} not found; the image folder needs a {METADATA_NAME} with columns "
            "file_name,text",
        ) from None
    text = decode_text(data)
    if not text.strip():
        raise DatasetError("CSV_EMPTY", "the file is empty; add a header file_name,text and rows")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        _check_delimiter(header)
        file_col = _pick_column(header, FILE_COLUMNS, "image file")
        text_col = _pick_column(header, TEXT_COLUMNS, "caption")
        rows = []
        start = reader.line_num + 1
        for record in reader:
            if any(cell.strip() for cell in record):
                cells = record + [""] * (max(file_col, text_col) + 1 - len(record))
                extra = [c for c in record[len(header):] if c.strip()]
                rows.append(Row(start, cells[file_col].strip(), cells[text_col].strip(), extra))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DatasetError(
            "CSV_PARSE", f"malformed CSV near line {reader.line_num}: {exc}"
        ) from None
    if not rows:
        raise DatasetError("CSV_EMPTY", "the file has a header but no rows; add one row per image")
    return rows


def check_row(image_dir: str, row: Row, min_side: int, max_pixels: int):
    """All findings for one row, the image's content hash (None if unusable) and its size
    after EXIF orientation (None if unusable).

    Runs in a worker process: takes and returns only plain data.
    """
    findings = []

    def add(severity, code, message):
        findings.append(Finding(severity, code, message, row=row.line, file=row.file_name))

    if row.extra:
        cells = " | ".join(repr(c) for c in [row.file_name, row.text, *row.extra])
        add("error", "EXTRA_CELLS",
            f"{METADATA_NAME} line {row.line} has {len(row.extra)} more cell(s) than its header "
            f"has columns ({cells}): the caption was split at a comma; put a caption that "
            "contains commas in double quotes")
    if not row.text:
        add("error", "EMPTY_CAPTION", "empty caption; write a caption in the text column")
    try:
        path = resolve_inside(image_dir, row.name)
        info = inspect_image(path, max_pixels)
    except ImageProblem as problem:
        add("error", problem.code, str(problem))
        return findings, None, None
    if min(info.width, info.height) < min_side:
        add(
            "error",
            "TOO_SMALL",
            f"{info.width}x{info.height} is smaller than validate.min_side={min_side}; use a "
            "larger image or lower validate.min_side",
        )
    for code, message in info.warnings:
        add("warning", code, message)
    return findings, info.content_hash, (info.width, info.height)


def unlisted_images(image_dir: str | Path, listed: set[str]) -> list[str]:
    """Image files under the folder (hidden ones aside) that no row names, sorted.
    `listed` holds normalised names; names on disk are normalised the same way (a macOS
    folder stores 'café' decomposed, a CSV typed elsewhere has it composed)."""
    extensions = image_extensions()
    root = Path(image_dir)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                continue
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if normalise_name(rel) not in listed:
                found.append(rel)
    return sorted(found)


def validate_dataset(
    image_dir: str | Path, min_side: int, max_pixels: int, workers: int = 0
) -> Report:
    """Check metadata.csv and every image it lists. Never writes inside `image_dir`."""
    image_dir = str(image_dir)
    report = Report()
    try:
        rows = read_metadata(Path(image_dir) / METADATA_NAME)
    except DatasetError as exc:
        report.findings.append(exc.finding)
        return report
    report.rows = len(rows)

    first_line: dict[str, int] = {}
    to_check: list[Row] = []
    for row in rows:
        key = row.name or None
        if key is not None and key in first_line:
            report.findings.append(Finding(
                "error", "DUPLICATE_FILE",
                f"also listed on line {first_line[key]}; keep one row per image",
                row=row.line, file=row.file_name,
            ))
            continue
        if key is not None:
            first_line[key] = row.line
        to_check.append(row)

    check = partial(check_row, image_dir, min_side=min_side, max_pixels=max_pixels)
    results = map_progress(check, to_check, workers, desc="validate")
    seen_content: dict[str, Row] = {}
    for row, (findings, content_hash, size) in zip(to_check, results, strict=True):
        report.findings += findings
        if content_hash is not None and content_hash in seen_content:
            first = seen_content[content_hash]
            report.findings.append(Finding(
                "warning", "DUPLICATE_CONTENT",
                f"same pixels as {first.file_name} (line {first.line}); the image counts twice",
                row=row.line, file=row.file_name,
            ))
        elif content_hash is not None:
            seen_content[content_hash] = row
        if not any(f.severity == "error" for f in findings):
            report.usable.append(row)
            report.sizes[row.name] = size

    for name in unlisted_images(image_dir, set(first_line)):
        report.findings.append(Finding(
            "warning", "UNLISTED_IMAGE",
            f"in the folder but not in {METADATA_NAME}; it is not used",
            file=name,
        ))
    return report
