"""What the loss insight costs a default run: the train stage's wall time on the example data
with train.validation.breakdown on (the per-timestep and per-example losses, the gains, the
examples report) and off, and with no evaluation between the first and the last (how much of
the run evaluation is at all). Defaults otherwise: 300 steps, evaluations every 25, sample
images every 100. Runs alternate in one process, `--pairs` times; the medians are compared.

    python bench/insight_cost.py [--pairs 3] [--out bench/results/insight_cost.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from report import table, write  # noqa: E402
from train_step import example_cache  # noqa: E402

SETTINGS = {
    "breakdown on (default)": {"breakdown": True},
    "breakdown off": {"breakdown": False},
    "no evaluation but the first and last": {"breakdown": False, "every": 10_000},
}


def train(root: Path, cache: Path, breakdown: bool, every: int = 25) -> float:
    from accelerate.state import AcceleratorState, GradientState

    from lorapipe.core.training import Paths, run
    from lorapipe.tasks import load_params, stage

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dir"] = str(REPO / "data/example")
    params["train"]["validation"].update(breakdown=breakdown, every=every)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    params = load_params(root / "params.yaml")
    start = time.perf_counter()
    run(params, Paths(cache, root / "lora", root / "dvclive", root / "logs", root / "ckpt",
                      root / "health.md", root / "examples.csv"),
        stage(params, "train").recipe_class())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench/results/insight_cost.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = example_cache(root / "data")
        train(root / "warm-up", cache, True)  # first-run costs (imports, allocator) paid here
        times: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for k in range(args.pairs):
            for name, setting in SETTINGS.items():
                times[name].append(train(root / f"{k}-{len(times[name])}-{hash(name)}", cache,
                                         **setting))
    base = statistics.median(times["breakdown off"])
    rows = [{"setting": name, "median_s": statistics.median(t), "runs": len(t),
             "ratio": statistics.median(t) / base, "all_s": [round(x, 2) for x in t]}
            for name, t in times.items()]
    table("train stage, default run on the example data (300 steps, eval every 25)",
          [("setting", "setting", "<38"), ("median s", "median_s", ">9.2f"),
           ("vs off", "ratio", ">7.3f"), ("runs", "runs", ">5")], rows)
    write(args.out, {"pairs": args.pairs, "rows": rows})


if __name__ == "__main__":
    main()
