"""The train stage for every task: the GPUs it may use, a relaunch under `accelerate launch`
for several processes, the CPU-thread registry, then the task's recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lorapipe.core import threads
from lorapipe.core.errors import LorapipeError


def train(params, args, argv: list[str] | None, recipe_class) -> int:
    """Run the train stage; recipe_class() imports and returns the task's Recipe (called
    after the thread registry, so its heavy imports count as this run's)."""
    if params.train.devices:  # before torch starts CUDA, so it sees only these GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, params.train.devices))
    if launch_needed(params.train):
        return relaunch(params.train, argv)
    # counted among the runs sharing the CPU from now; the share is taken after the imports
    threads.register()

    from lorapipe.core.training import Diverged, Paths, run

    try:
        run(params, Paths(Path(args.cache), Path(args.out), Path(args.live), Path(args.logs),
                          Path(args.checkpoints), Path(args.health),
                          Path(args.examples) if args.examples else None), recipe_class())
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
        refuse_accelerate_fsdp(Path(p.accelerate_config))
        cmd += ["--config_file", p.accelerate_config]
    else:
        cmd += ["--num_machines", "1"] + (["--multi_gpu"] if p.num_processes > 1 else [])
    env = {**os.environ, "ACCELERATE_LAUNCHED": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # data parallel over CPU processes (gloo)
    cmd += ["-m", "stages.train", *(sys.argv[1:] if argv is None else argv)]
    print(f"train: launching {p.num_processes} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, env=env).returncode


def refuse_accelerate_fsdp(config: Path) -> None:
    """An accelerate config that turns on accelerate's own FSDP: refused before the launch
    (on CPU processes accelerate would quietly run plain data parallel instead, and on GPUs
    its FSDP saves whole models); train.fsdp is lorapipe's sharding (core/sharding.py)."""
    from ruamel.yaml import YAML, YAMLError

    from lorapipe.core.sharding import ACCELERATE_FSDP

    try:
        settings = YAML(typ="safe").load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YAMLError):
        return  # accelerate's launcher reports a file it cannot read, in its own words
    if isinstance(settings, dict) and (settings.get("distributed_type") == "FSDP"
                                       or settings.get("use_fsdp")):
        raise LorapipeError(f"train.accelerate_config {config}: {ACCELERATE_FSDP}")
