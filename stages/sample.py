"""sample: the trained LoRA beside the base model (task_type sd: images and a grid; llm:
answers to sample.prompts).

    python -m stages.sample --lora models/lora --out samples --logs logs/sample
"""

from __future__ import annotations

import argparse

from lorapipe.core import threads
from lorapipe.core.cli import run_stage
from lorapipe.tasks import load_params, stage


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sample", description=__doc__)
    parser.add_argument("--lora", required=True, help="folder with the trained LoRA")
    parser.add_argument("--out", required=True, help="folder for the samples")
    parser.add_argument("--logs", required=True, help="TensorBoard folder for the samples")
    args = parser.parse_args(argv)
    params = load_params()  # checked before the task's heavy imports
    threads.register()  # shares the CPU with the other lorapipe runs (lorapipe.core.threads)
    return stage(params, "sample").run(params, args)


if __name__ == "__main__":
    run_stage("sample", main, warm_start=True)
