"""What each lora.method and train.optimizer costs on a real model: SD 1.5's UNet (built from
its config on the meta device, no weights) with the kohya preset at rank 16 (LoCon: conv rank
8): the trainable parameters (the WebUI file's size is 4 bytes each, fp32), and for every
optimizer the bytes of its state after a real step on tensors of exactly those shapes (CPU;
the state does not depend on the UNet's values). Then the tiny builtin SD's train stage per
method (the example data, 100 steps, evaluations every 50; `--steps`), for the speed ratio of
the methods in one process.

    python bench/methods.py [--rank 16] [--steps 100] [--out bench/results/methods.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from report import table, write  # noqa: E402
from train_step import example_cache  # noqa: E402

METHODS = {"lora": {}, "dora": {"method": "dora"}, "loha": {"method": "loha"},
           "lokr": {"method": "lokr", "lokr_factor": 8}, "locon": {"conv_rank": 8,
                                                                 "conv_alpha": 8}}
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree")


def adapter_shapes(method: dict, rank: int) -> list[tuple[int, ...]]:
    """The trainable tensors' shapes of a method on SD 1.5's real UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from lorapipe.core import adapters
    from lorapipe.diffusion import families, lora
    from lorapipe.diffusion.families.sd import SD_1_5_UNET

    family = families.by_name("sd")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_1_5_UNET)
    shape = adapters.Shape(rank=rank, alpha=rank, targets="kohya", **method)
    configs = lora.configs_for(shape, family, {"unet": unet})
    lora.attach({"unet": unet}, configs, family)
    return [tuple(q.shape) for q in unet.parameters() if q.requires_grad]


def optimizer_state_bytes(shapes: list[tuple[int, ...]], name: str) -> int:
    """Bytes of the optimizer's state after one step over parameters of these shapes."""
    import torch

    from lorapipe.core import optimizers

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.01) for s in shapes]
    p = _train_params(name)
    optimizer = optimizers.build(p, [{"params": params, "lr": p.learning_rate}])
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    optimizer.step()
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


def _train_params(optimizer: str):
    from ruamel.yaml import YAML

    from lorapipe.tasks import parse_params

    # YAML 1.2, as params.yaml is read (PyYAML would read 1e-3 as a string)
    params = YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = str(REPO / "data/example")
    params["train"]["optimizer"] = optimizer
    if optimizer == "prodigy":
        params["train"]["learning_rate"] = 1.0
    return parse_params(params, REPO).train


def train_seconds(root: Path, cache: Path, method: dict, steps: int) -> tuple[float, str]:
    from accelerate.state import AcceleratorState, GradientState

    from lorapipe.core.training import Paths, run
    from lorapipe.tasks import load_params, stage

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = str(REPO / "data/example")
    params["lora"].update(method)
    params["train"].update(max_steps=steps, sample_every=0, checkpoint_every=0)
    params["train"]["validation"]["every"] = steps // 2
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    params = load_params(root / "params.yaml")
    start = time.perf_counter()
    result = run(params, Paths(cache, root / "lora", root / "dvclive", root / "logs",
                               root / "ckpt", root / "health.md", root / "examples.csv"),
                 stage(params, "train").recipe_class())
    return time.perf_counter() - start, result.summary["health"]["status"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=str(REPO / "bench/results/methods.json"))
    args = parser.parse_args()
    rows = []
    for name, method in METHODS.items():
        shapes = adapter_shapes(method, args.rank)
        numel = sum(math.prod(s) for s in shapes)
        row = {"method": name, "params": numel, "file_mib": numel * 4 / 2**20}
        for opt in OPTIMIZERS:
            row[opt] = optimizer_state_bytes(shapes, opt) / 2**20
        rows.append(row)
    table(f"SD 1.5 UNet, kohya preset, rank {args.rank} (LoCon: conv rank 8): trainable "
          "parameters, WebUI file and optimizer state (MiB)",
          [("method", "method", "<7"), ("params", "params", ">10,"),
           ("file MiB", "file_mib", ">9.1f")] + [(o, o, ">12.1f") for o in OPTIMIZERS], rows)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = example_cache(root / "data")
        train_seconds(root / "warm-up", cache, {}, args.steps)  # first-run costs paid here
        timed = []
        for name, method in METHODS.items():
            seconds, status = train_seconds(root / name, cache, method, args.steps)
            timed.append({"method": name, "seconds": seconds, "health": status})
    base = next(r["seconds"] for r in timed if r["method"] == "lora")
    for r in timed:
        r["ratio"] = r["seconds"] / base
    table(f"tiny SD train stage, {args.steps} steps on the example data",
          [("method", "method", "<7"), ("seconds", "seconds", ">8.2f"),
           ("vs lora", "ratio", ">8.2f"), ("health", "health", "<10")], timed)
    write(args.out, {"rank": args.rank, "steps": args.steps, "memory": rows, "speed": timed})


if __name__ == "__main__":
    main()
