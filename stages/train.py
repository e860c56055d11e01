"""train: a LoRA on the base model (task_type sd: its denoiser and text encoders; llm: the
causal LM) over the encode cache, logged to dvclive + TensorBoard.

    python -m stages.train --cache data/cache --out models/lora --live dvclive --logs logs \
        --checkpoints checkpoints/train
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lorapipe import threads
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
    if params.train.devices:  # before torch starts CUDA, so it sees only these GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, params.train.devices))
    if launch_needed(params.train):
        return relaunch(params.train, argv)
    # counted among the runs sharing the CPU from now; the share is taken after the imports
    threads.register()

    from lorapipe.training import Diverged, run

    try:
        run(params, Path(args.cache), Path(args.out), Path(args.live), Path(args.logs),
            Path(args.checkpoints), Path(args.health))
    except Diverged as exc:
        print(f"train: diverged: {exc}", file=sys.stderr)
        return 1
    return 0


def launch_needed(p) -> bool:
    """More than one process (or a config) asked for, and not yet under a launcher."""
    launched = "LOCAL_RANK" in os.environ or "ACCELERATE_LAUNCHED" in os.environ
    return not launched and (p.num_processes > 1 or bool(p.accelerate_config))


def relaunch(p, argv: list[str] | None) -> int:
    """Run this stage again under `accelerate launch` with train.num_processes processes
    (torch.distributed underneath: NCCL on GPUs, gloo on CPUs)."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(p.num_processes), "--mixed_precision", p.mixed_precision,
           "--dynamo_backend", "no"]
    if p.accelerate_config:
        cmd += ["--config_file", p.accelerate_config]
    else:
        cmd += ["--num_machines", "1"] + (["--multi_gpu"] if p.num_processes > 1 else [])
    env = {**os.environ, "ACCELERATE_LAUNCHED": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # data parallel over CPU processes (gloo)
    cmd += ["-m", "stages.train", *(sys.argv[1:] if argv is None else argv)]
    print(f"train: launching {p.num_processes} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    run_stage("train", main, warm_start=True)
