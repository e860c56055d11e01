"""encode: cache what training reads every step (task_type sd: VAE latents and text-encoder
states of every processed image; llm: the token ids and loss masks of every example).

    python -m stages.encode --images data/processed --out data/cache
"""

from __future__ import annotations

import argparse

from lorapipe.core.cli import run_stage
from lorapipe.tasks import load_params, stage


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.encode", description=__doc__)
    parser.add_argument("--images", required=True, help="the preprocess stage's folder")
    parser.add_argument("--out", required=True, help="folder for the cache file")
    args = parser.parse_args(argv)
    params = load_params()  # checked before the task's heavy imports
    return stage(params, "encode").run(params, args)


if __name__ == "__main__":
    run_stage("encode", main, warm_start=True)
