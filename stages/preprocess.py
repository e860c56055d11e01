"""preprocess: bring the usable examples to training form (task_type sd: every image to a
square PNG at preprocess.resolution or to its aspect-ratio bucket; llm: the examples in
canonical form).

    python -m stages.preprocess --images data/example --usable reports/usable.csv \
        --out data/processed
"""

from __future__ import annotations

import argparse

from lorapipe.core.cli import run_stage
from lorapipe.tasks import load_params, stage


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.preprocess", description=__doc__)
    parser.add_argument("--images", required=True, help="folder with the source data")
    parser.add_argument("--usable", required=True, help="usable rows from the validate stage")
    parser.add_argument("--out", required=True, help="folder to write the processed data into")
    args = parser.parse_args(argv)
    params = load_params()
    return stage(params, "preprocess").run(params, args)


if __name__ == "__main__":
    run_stage("preprocess", main)
