"""The validate stage's report, for every task: the JSON report with every finding, a
sample of them on the terminal, the usable rows, and pass or fail."""

from __future__ import annotations

import sys
from collections import Counter

from lorapipe.core import outputs

SHOWN_PER_CODE = 5  # the terminal gets a sample; the report has every finding


def print_summary(report, on_error: str, out=None) -> None:
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


def finish(report, on_error: str, report_path: str, usable_path: str, usable_text: str,
           extra: dict | None = None, lines: list[str] = ()) -> int:
    """Write the report (with the task's `extra` fields), print the summary and the task's
    `lines`, and write the usable rows unless the check failed; the stage's exit code."""
    failed = bool(report.errors) and (on_error == "fail" or not report.usable)
    outputs.write_json(report_path, {
        **report.summary(),
        "passed": not failed,
        **(extra or {}),
        "findings": [f.to_dict() for f in report.findings],
    })
    print_summary(report, on_error)
    for line in lines:
        print(line)
    if failed:
        if report.usable:
            hint = "fix the rows above or set validate.on_error: skip to drop them"
        else:
            hint = "no usable rows are left"
        print(f"validate: failed: {hint}; every finding is in {report_path}", file=sys.stderr)
        return 1
    outputs.write_text(usable_path, usable_text)
    return 0
