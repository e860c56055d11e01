"""The pipeline's fixed costs: `dvc repro` stage by stage against the same work in one
process.

    python bench/overhead.py [--repeats 2]

In a clone of this repository (committed HEAD), on the defaults (builtin model, example
data): each stage forced through DVC (`dvc repro -f -s <stage>`, a fresh Python per stage,
DVC's hashing and bookkeeping), then every stage's own `main` called in order inside one
Python process with the same arguments (dvc.yaml's commands): the same model, data, steps
and code, with the imports paid once and no DVC. Per stage, the difference is what running
it as a DVC stage costs; `python -X importtime` of each stage's imports says how much of
that is imports. Keeps each figure's best of `--repeats`. Then `dvc exp run -S lora.rank=16`
and the part of it outside the training loop and the sampling. With the warm server
(lorapipe.core.warm, on unless LORAPIPE_WARM=0) the torch stages skip their imports; run once
with LORAPIPE_WARM=0 to compare. Writes bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402
import workspace  # noqa: E402

from lorapipe.core import warm  # noqa: E402

STAGES = ["params", "validate", "preprocess", "encode", "train", "sample"]


def stage_argv(root: Path) -> dict[str, list[str]]:
    """Each stage's arguments, from dvc.yaml's commands (${data.dir} filled in)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    data_dir = yaml.safe_load((root / "params.yaml").read_text())["data"]["dir"]
    out = {}
    for name in STAGES:
        cmd = stages[name]["cmd"].replace("${data.dir}", data_dir)
        args = shlex.split(cmd)
        out[name] = args[args.index(f"stages.{name}") + 1:]
    return out


def in_process(root: Path) -> dict[str, float]:
    """Runs in a child Python: every stage's main in order, timed one by one."""
    os.chdir(root)
    sys.path.insert(0, str(root))
    times = {}
    for name, argv in stage_argv(root).items():
        start = time.perf_counter()
        module = importlib.import_module(f"stages.{name}")
        if module.main(argv):
            raise RuntimeError(f"stage {name} failed in-process")
        times[name] = time.perf_counter() - start
    return times


def through_dvc(root: Path) -> dict[str, float]:
    return {name: workspace.timed(root, "dvc", "repro", "-f", "-s", name)[0] for name in STAGES}


def import_seconds(root: Path, name: str) -> float:
    """Self-reported import time of `stages.<name>` and what its main imports, from
    `python -X importtime` (cumulative time of the top-level imports)."""
    heavy = {"encode": "lorapipe.diffusion.cache, lorapipe.diffusion.models",
             "train": "lorapipe.core.training, lorapipe.diffusion.recipe",
             "sample": "lorapipe.diffusion.sampling, lorapipe.diffusion.models, "
                       "lorapipe.diffusion.lora"}.get(name, "")
    code = f"import stages.{name}" + (f"; import {heavy}" if heavy else "")
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=root,
                         env=workspace.env(PYTHONPATH=str(root)), capture_output=True,
                         text=True, check=True).stderr
    total = 0
    for line in err.splitlines():  # "import time: self | cumulative | name", top level only
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):
            total += int(m.group(1))
    return total / 1e6


def experiment_outside(root: Path) -> dict:
    """`dvc exp run -S lora.rank=16` after the pipeline: its wall time, and what is left of
    it outside the training loop and the sampling (both as the stages print them)."""
    seconds, out = workspace.timed(root, "dvc", "exp", "run", "-S", "lora.rank=16")
    loop = float(re.search(r"train: \d+ steps in ([\d.]+) s", out).group(1))
    sampling = float(re.search(r"sample: .* in ([\d.]+) s ->", out).group(1))
    return {"exp_run_s": seconds, "train_loop_s": loop, "sampling_s": sampling,
            "outside_s": seconds - loop - sampling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # root, result file
    parser.add_argument("--out", default=str(HERE / "results" / "overhead.json"))
    args = parser.parse_args()
    if args.child:
        times = in_process(Path(args.child[0]))
        Path(args.child[1]).write_text(yaml.safe_dump(times))
        return
    root = workspace.clone("bench-overhead-")
    workspace.timed(root, "dvc", "repro")  # the DVC cache and lock in place
    dvc, inproc = [], []
    for _ in range(args.repeats):
        dvc.append(through_dvc(root))
        result = root.parent / "in_process.yaml"
        child = subprocess.run([sys.executable, __file__, "--child", str(root), str(result)],
                               env=workspace.env(), capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(child.stdout + child.stderr)
        inproc.append(yaml.safe_load(result.read_text()))
    rows = []
    for name in STAGES:
        d = min(r[name] for r in dvc)
        i = min(r[name] for r in inproc)
        rows.append({"stage": name, "dvc_s": d, "in_process_s": i, "fixed_s": d - i,
                     "imports_s": import_seconds(root, name)})
    total = {"stage": "all", "dvc_s": sum(r["dvc_s"] for r in rows),
             "in_process_s": sum(r["in_process_s"] for r in rows)}
    total["fixed_s"] = total["dvc_s"] - total["in_process_s"]
    total["ratio"] = total["dvc_s"] / total["in_process_s"]
    experiment = experiment_outside(root)
    report.table(f"the pipeline on the defaults, best of {args.repeats}, {os.cpu_count()} cores "
                 f"(ratio {total['ratio']:.2f}x)",
                 [("stage", "stage", "<10"), ("dvc s", "dvc_s", ">7.1f"),
                  ("in-process s", "in_process_s", ">12.1f"), ("fixed s", "fixed_s", ">8.1f"),
                  ("imports s", "imports_s", ">9.1f")], [*rows, total])
    report.table("dvc exp run -S lora.rank=16 after it", [
        ("wall s", "exp_run_s", ">7.1f"), ("train loop s", "train_loop_s", ">12.1f"),
        ("sampling s", "sampling_s", ">10.1f"), ("outside s", "outside_s", ">9.1f")],
        [experiment])
    report.write(args.out, {"benchmark": "overhead", "cores": os.cpu_count(),
                            "machine": platform.machine(), "warm": warm.enabled(),
                            "stages": rows, "total": total, "experiment": experiment,
                            "runs": {"dvc": dvc, "in_process": inproc}})


if __name__ == "__main__":
    main()
