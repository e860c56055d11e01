"""train: a LoRA on the base model (task_type sd: its denoiser and text encoders; llm: the
causal LM) over the encode cache, logged to dvclive + TensorBoard, with a health verdict.

    python -m stages.train --cache data/cache --out models/lora --live dvclive --logs logs \
        --checkpoints checkpoints/train --health reports/health.md \
        --examples reports/examples.csv
"""

from __future__ import annotations

import argparse

from lorapipe.core import launch
from lorapipe.core.cli import run_stage
from lorapipe.tasks import load_params, stage


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__)
    parser.add_argument("--cache", required=True, help="folder with the encode cache")
    parser.add_argument("--out", required=True, help="folder for the trained LoRA")
    parser.add_argument("--live", required=True, help="dvclive folder")
    parser.add_argument("--logs", required=True, help="TensorBoard runs and train.log")
    parser.add_argument("--checkpoints", required=True, help="resume checkpoints")
    parser.add_argument("--health", required=True, help="the health report to write (.md)")
    parser.add_argument("--examples", default=None,
                        help="each evaluated example's losses against the base (.csv)")
    args = parser.parse_args(argv)
    params = load_params()  # checked before the heavy imports
    return launch.train(params, args, argv, stage(params, "train").recipe_class)


if __name__ == "__main__":
    run_stage("train", main, warm_start=True)
