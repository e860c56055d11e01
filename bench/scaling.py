"""Data-parallel scaling of the train stage: steps/s and samples/s for 1 vs N processes.

    python bench/scaling.py [--steps 100] [--batch 4]

Runs the real train stage (python -m stages.train, relaunching itself under accelerate) on
the builtin model and the example data, each process with `--batch` images per step, so the
global batch grows with the process count. On CPU it compares 1 and 2 processes (gloo); on a
CUDA machine every visible device count from 1 up. steps/s comes from the stage's own summary
(the training loop only, not start-up). Prints a table and writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import report  # noqa: E402
from train_step import example_cache  # noqa: E402


def run_stage(root: Path, cache: Path, processes: int, batch: int, steps: int) -> float:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = str(REPO / "data/example")
    params["train"].update(max_steps=steps, batch_size=batch, num_processes=processes,
                           sample_every=0, checkpoint_every=0)
    params["train"]["validation"]["every"] = steps
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run(
        [sys.executable, "-m", "stages.train", "--cache", str(cache), "--out", "lora",
         "--live", "dvclive", "--logs", "logs", "--checkpoints", "ckpt", "--health",
         "health.md"], cwd=root, check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    # the stage's last summary line: "train: N steps in S s (R steps/s); ..."
    return float(re.search(r"\(([\d.]+) steps/s\)", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4, help="images per process per step")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scaling.json"))
    args = parser.parse_args()
    cuda = torch.cuda.device_count()
    counts = list(range(1, cuda + 1)) if cuda else [1, 2]
    root = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    cache = example_cache(root / "data")
    rows = []
    for n in counts:
        steps_per_s = run_stage(root / f"n{n}", cache, n, args.batch, args.steps)
        rows.append({"processes": n, "global_batch": n * args.batch, "steps_per_s": steps_per_s,
                     "samples_per_s": round(steps_per_s * n * args.batch, 2)})
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_samples"] = round(r["samples_per_s"] / base, 2)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores"
    result = {"benchmark": "scaling", "device": device, "steps": args.steps,
              "batch_per_process": args.batch, "torch": torch.__version__,
              "machine": platform.machine(), "rows": rows}
    report.table(f"train stage, builtin model, {args.steps} steps, {args.batch} images per "
                 f"process per step, {device}",
                 [("processes", "processes", ">9"), ("global batch", "global_batch", ">12"),
                  ("steps/s", "steps_per_s", ">8"), ("samples/s", "samples_per_s", ">10"),
                  ("speed-up", "speedup_samples", ">8")], rows)
    report.write(args.out, result)


if __name__ == "__main__":
    main()
