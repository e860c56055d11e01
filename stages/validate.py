"""validate: check every training example against its metadata (task_type sd: every image
against metadata.csv; llm: every example of data.jsonl, with its token count); write the
report and the usable rows.

    python -m stages.validate --images data/example --report reports/validation.json \
        --usable reports/usable.csv
"""

from __future__ import annotations

import argparse

from lorapipe.core.cli import run_stage
from lorapipe.tasks import load_params, stage


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__)
    parser.add_argument("--images", required=True, help="folder with the data and its metadata")
    parser.add_argument("--report", required=True, help="JSON report to write")
    parser.add_argument("--usable", required=True, help="CSV of usable rows to write")
    args = parser.parse_args(argv)
    params = load_params()
    return stage(params, "validate").run(params, args)


if __name__ == "__main__":
    run_stage("validate", main)
