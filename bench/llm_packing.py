"""Trained tokens per second with llm.packing on and off, through lorapipe's own train loop.

    python bench/llm_packing.py [--layers 4] [--steps 12] [--batch 16] [--repeats 2]

Base: Qwen2.5-0.5B-Instruct's widths and vocabulary (151,936 tokens) with --layers of its 24
layers, random weights (bench/llm_runs.py). LoRA rank 16 on the attention projections, fp32.
Two data sets: the LLM example set (data/example-llm) and 258 short real-looking chats (400
drawn, duplicates dropped; one or two turns, some with a system message). Packing lays each
batch's examples out in fewer rows; the batches and so the trained tokens are the same, so
the gain is the time per step.
Each run is its own process; packed and unpacked alternate, --repeats pairs each.

Prints a table and writes bench/results/llm_packing.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import llm_runs  # noqa: E402
import report  # noqa: E402

REPO = HERE.parent


def child(args) -> None:
    import resource

    work = Path(args.work)
    data = {"example": REPO / "data" / "example-llm",
            "chats": llm_runs.short_chats(work / "chats", 400)}[args.data]
    base = str(llm_runs.base_folder(work / f"base-{args.layers}", args.layers))
    out = llm_runs.lorapipe_run(
        Path(tempfile.mkdtemp(dir=work)), data, base, train__max_steps=args.steps,
        train__batch_size=args.batch, train__learning_rate=1e-4, lora__rank=16,
        lora__alpha=16, lora__targets="attn", llm__packing=args.packed,
        train__validation__every=args.steps, train__validation__fixed_images=1,
        train__validation__max_images=1, train__cpu_threads=0)
    steps_per_s = out["timing"]["steps_per_s"]
    print(json.dumps({
        "data": args.data, "packed": args.packed, "s_per_step": 1 / steps_per_s,
        "trained_tokens_per_s": steps_per_s * args.batch * out["trained_tokens_per_example"],
        "health": out["summary"]["health"]["status"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", default="")
    parser.add_argument("--data", default="example")
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows, work = [], tempfile.mkdtemp(prefix="lorapipe-bench-packing-")
    for data in ("example", "chats"):
        for _ in range(args.repeats):
            for packed in (False, True):
                flags = ["--data", data, "--layers", str(args.layers), "--steps",
                         str(args.steps), "--batch", str(args.batch), "--work", work]
                rows.append(report.child_row(__file__, "run", flags + (["--packed"] * packed),
                                             {"data": data, "packed": packed}))
                print(rows[-1], flush=True)
    summary = []
    for data in ("example", "chats"):
        medians = {packed: statistics.median(r["trained_tokens_per_s"] for r in rows
                                             if r["data"] == data and r["packed"] == packed
                                             and "failed" not in r)
                   for packed in (False, True)}
        summary.append({"data": data, "unpacked": medians[False], "packed": medians[True],
                        "gain": medians[True] / medians[False]})
    report.table("trained tokens/s (median of the repeats)",
                 [("data", "data", "<8"), ("unpacked", "unpacked", ">9.1f"),
                  ("packed", "packed", ">9.1f"), ("gain", "gain", ">6.2f")], summary)
    report.write(HERE / "results" / "llm_packing.json", {
        "machine": {"cpu": platform.processor() or platform.machine(), "python":
                    platform.python_version()},
        "settings": vars(args), "runs": rows, "summary": summary})


if __name__ == "__main__":
    main()
