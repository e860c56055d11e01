"""validate: check every image against metadata.csv (task_type llm: every example of
data.jsonl, with its token count); write the report and the usable rows.

    python -m stages.validate --images data/example --report reports/validation.json \
        --usable reports/usable.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter

from lorapipe import buckets, outputs
from lorapipe.cli import run_stage
from lorapipe.metadata import Finding, Report, Row, validate_dataset
from lorapipe.params import load_params

SHOWN_PER_CODE = 5  # the terminal gets a sample; the report has every finding


def usable_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "text"])
    writer.writerows([row.name, row.text] for row in report.usable)  # normalised names
    return buf.getvalue()


def usable_examples_csv(report) -> str:
    """task_type llm: each usable example's line and its canonical JSON."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["line", "example"])
    writer.writerows([e.line, e.to_json()] for e in report.usable)
    return buf.getvalue()


def validate_llm(all_params, folder: str):
    """The examples of data.jsonl, counted in model.base's tokens."""
    from lorapipe.llm.data import validate_examples
    from lorapipe.llm.models import load_tokenizer

    p = all_params.llm
    return validate_examples(folder, load_tokenizer(all_params.model.base), p.max_length,
                             p.too_long, p.train_on_prompt)


def print_summary(report: Report, on_error: str, out=None) -> None:
    out = out or sys.stdout
    s = report.summary()
    print(
        f"validate: {s['rows']} rows, {s['usable']} usable, "
        f"{s['errors']} errors, {s['warnings']} warnings",
        file=out,
    )
    shown = Counter()
    for finding in report.findings:
        shown[finding.code] += 1
        if shown[finding.code] <= SHOWN_PER_CODE:
            print(f"  {finding}", file=out)
    for code, count in shown.items():
        if count > SHOWN_PER_CODE:
            print(f"  ... {count - SHOWN_PER_CODE} more {code}", file=out)
    if report.errors and on_error == "skip" and report.usable:
        print(f"validate: skipped {s['rows_with_errors']} rows with errors "
              "(validate.on_error: skip)", file=out)


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


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__)
    parser.add_argument("--images", required=True, help="folder with images and metadata.csv")
    parser.add_argument("--report", required=True, help="JSON report to write")
    parser.add_argument("--usable", required=True, help="CSV of usable rows to write")
    args = parser.parse_args(argv)
    all_params = load_params()
    params = all_params.validate

    llm = all_params.task_type == "llm"
    if llm:
        report, histogram = validate_llm(all_params, args.images), {}
    else:
        report = validate_dataset(args.images, params.min_side, params.max_pixels)
        histogram = bucket_report(report, all_params.preprocess)
    failed = bool(report.errors) and (params.on_error == "fail" or not report.usable)
    outputs.write_json(args.report, {
        **report.summary(),
        "passed": not failed,
        **({"buckets": histogram} if histogram else {}),
        "findings": [f.to_dict() for f in report.findings],
    })
    print_summary(report, params.on_error)
    tokens = report.summary().get("tokens") if llm else None
    if tokens:
        print(f"validate: tokens per example min {tokens['min']}, median {tokens['median']:g}, "
              f"max {tokens['max']} (llm.max_length {all_params.llm.max_length}); "
              f"{tokens['trained']} of {tokens['total']} tokens trained")
    if histogram:
        print("validate: buckets (images per size): "
              + ", ".join(f"{size}: {n}" for size, n in histogram.items()))
    if failed:
        if report.usable:
            hint = "fix the rows above or set validate.on_error: skip to drop them"
        else:
            hint = "no usable rows are left"
        print(f"validate: failed: {hint}; every finding is in {args.report}", file=sys.stderr)
        return 1
    outputs.write_text(args.usable, usable_examples_csv(report) if llm else usable_csv(report))
    return 0


if __name__ == "__main__":
    run_stage("validate", main)
