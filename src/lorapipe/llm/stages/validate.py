"""validate, LLM task: every example of data.jsonl (or metadata.csv), counted in model.base's
tokens against llm.max_length."""

from __future__ import annotations

import csv
import io

from lorapipe.core import reports


def usable_examples_csv(report) -> str:
    """Each usable example's line and its canonical JSON."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["line", "example"])
    writer.writerows([e.line, e.to_json()] for e in report.usable)
    return buf.getvalue()


def run(params, args) -> int:
    from lorapipe.llm.data import validate_examples
    from lorapipe.llm.models import load_tokenizer

    p = params.llm
    report = validate_examples(args.images, load_tokenizer(params.model.base), p.max_length,
                               p.too_long, p.train_on_prompt, p.thinking)
    tokens = report.summary().get("tokens")
    lines = [f"validate: tokens per example min {tokens['min']}, median {tokens['median']:g}, "
             f"max {tokens['max']} (llm.max_length {p.max_length}); "
             f"{tokens['trained']} of {tokens['total']} tokens trained"] if tokens else []
    return reports.finish(report, params.validate.on_error, args.report, args.usable,
                          usable_examples_csv(report), None, lines)
