"""train: LoRA on the base model's UNet over the encode cache, logged to dvclive + TensorBoard.

    python -m stages.train --cache data/cache --out models/lora --live dvclive --logs logs \
        --checkpoints checkpoints/train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorapipe.cli import run_stage
from lorapipe.params import load_params


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__)
    parser.add_argument("--cache", required=True, help="folder with the encode cache")
    parser.add_argument("--out", required=True, help="folder for the trained LoRA")
    parser.add_argument("--live", required=True, help="dvclive folder")
    parser.add_argument("--logs", required=True, help="TensorBoard runs and train.log")
    parser.add_argument("--checkpoints", required=True, help="resume checkpoints")
    parser.add_argument("--health", required=True, help="the health report to write (.md)")
    args = parser.parse_args(argv)
    params = load_params()  # checked before the heavy imports below

    from lorapipe.training import Diverged, run

    try:
        summary = run(params, Path(args.cache), Path(args.out), Path(args.live),
                      Path(args.logs), Path(args.checkpoints), Path(args.health)).summary
    except Diverged as exc:
        print(f"train: diverged: {exc}", file=sys.stderr)
        return 1
    if summary:
        print(f"train: {summary['steps']} steps in {summary['wall_time_s']} s "
              f"({summary['steps_per_s']} steps/s); average loss "
              f"{summary['final_average_loss']:.4f}"
              f"; fixed-noise loss {summary['fixed_loss_start']:.4f} -> "
              f"{summary['fixed_loss_end']:.4f}; LoRA in {args.out}")
    return 0


if __name__ == "__main__":
    run_stage("train", main)
