"""validate, image task: every image against metadata.csv, and with preprocess.buckets the
bucket each usable image will land in."""

from __future__ import annotations

import csv
import io

from lorapipe.core import reports
from lorapipe.diffusion import buckets
from lorapipe.diffusion.metadata import Finding, Report, Row, validate_dataset


def usable_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "text"])
    writer.writerows([row.name, row.text] for row in report.usable)  # normalised names
    return buf.getvalue()


def bucket_report(report: Report, p) -> dict[str, int]:
    """With preprocess.buckets: the bucket each usable image will land in, as counts per
    size ('WxH', largest count first), and a warning for a bucket of one image (its batches
    repeat that image). {} without buckets."""
    if not p.buckets:
        return {}
    sizes = buckets.make_buckets(p.resolution, p.bucket_step, p.min_side, p.max_side)
    landing: dict[str, list[Row]] = {}
    for row in report.usable:
        placed = buckets.place(report.sizes[row.name], sizes, p.bucket_step, p.upscale)
        landing.setdefault(f"{placed.width}x{placed.height}", []).append(row)
    for size, rows in landing.items():
        if len(rows) == 1:
            report.findings.append(Finding(
                "warning", "SINGLE_IMAGE_BUCKET",
                f"the only image of bucket {size}: its batches repeat it; add images of this "
                "shape or crop it to a common one", row=rows[0].line, file=rows[0].file_name))
    return {size: len(rows) for size, rows in sorted(landing.items(),
                                                     key=lambda kv: (-len(kv[1]), kv[0]))}


def run(params, args) -> int:
    p = params.validate
    report = validate_dataset(args.images, p.min_side, p.max_pixels)
    histogram = bucket_report(report, params.preprocess)
    lines = ["validate: buckets (images per size): "
             + ", ".join(f"{size}: {n}" for size, n in histogram.items())] if histogram else []
    return reports.finish(report, p.on_error, args.report, args.usable, usable_csv(report),
                          {"buckets": histogram} if histogram else None, lines)
