"""Two experiments queued side by side vs the same two back to back, on CPU.

    python bench/sweep_queue.py [--steps 300] [--repeats 1]

(Not bench/queue.py: a script there would shadow the standard library's `queue` for every
script in bench/, which multiprocessing imports.)

In a clone of this repository (committed HEAD) with the pipeline already run once: two
`dvc exp run` one after the other, then two other experiments (other seeds, so DVC's run
cache cannot skip them) through `dvc exp run --queue` and `dvc queue start -j 2`, timed from
the queue start until both have finished. Each train process takes its share of the cores
(train.cpu_threads: 0, lorapipe.core.threads), so the two queued runs do not oversubscribe them.
Prints both times and their ratio; writes bench/results/queue.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402
import workspace  # noqa: E402


def queued(root: Path, steps: int, seed: int) -> float:
    workspace.timed(root, "dvc", "exp", "run", "--queue", "-S", "lora.rank=4,8", "-S",
                    f"train.seed={seed}", "-S", f"train.max_steps={steps}")
    start = time.perf_counter()
    workspace.timed(root, "dvc", "queue", "start", "-j", "2")
    while True:
        _, status = workspace.timed(root, "dvc", "queue", "status")
        done = [line for line in status.splitlines() if re.search(r"\b(Success|Failed)\b", line)]
        if len(done) >= 2:
            break
        time.sleep(1)
    seconds = time.perf_counter() - start
    if "Failed" in status:
        raise RuntimeError(status)
    workspace.timed(root, "dvc", "queue", "remove", "--success")
    return seconds


def back_to_back(root: Path, steps: int, seed: int) -> float:
    total = 0.0
    for rank in (4, 8):
        seconds, _ = workspace.timed(root, "dvc", "exp", "run", "-S", f"lora.rank={rank}",
                                     "-S", f"train.seed={seed}", "-S",
                                     f"train.max_steps={steps}")
        total += seconds
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "queue.json"))
    args = parser.parse_args()
    root = workspace.clone("bench-queue-")
    workspace.timed(root, "dvc", "repro")  # data stages and caches in place, not timed
    rows = []
    for k in range(args.repeats):
        serial = back_to_back(root, args.steps, seed=100 + 2 * k)
        side = queued(root, args.steps, seed=101 + 2 * k)
        rows.append({"back_to_back_s": serial, "queue_j2_s": side, "ratio": side / serial})
    report.table(f"two experiments, {args.steps} steps each, {os.cpu_count()} cores",
                 [("back to back s", "back_to_back_s", ">14.1f"),
                  ("queue -j 2 s", "queue_j2_s", ">12.1f"), ("queue/serial", "ratio", ">12.2f")],
                 rows)
    report.write(args.out, {"benchmark": "queue", "steps": args.steps, "cores": os.cpu_count(),
                            "machine": platform.machine(), "runs": rows})


if __name__ == "__main__":
    main()
