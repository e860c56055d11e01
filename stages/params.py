"""params: check the whole params.yaml before any other stage runs.

    python -m stages.params --params params.yaml --out reports/params.txt \
        --compat reports/compatibility.md

Each later stage reads only its own keys, so DVC reruns a stage only when one of those
changes. A key no stage reads (a typo such as `trian:`) would then never be looked at: this
stage depends on the whole file, reruns on every edit of it, and stops `dvc repro` with every
problem listed. Its output says only that the file passed, so it never changes and never
makes the stages after it rerun. It also writes where the adapter these params train will
load (reports/compatibility.md: diffusers, ComfyUI, A1111/Forge, kohya; peft, vLLM,
llama.cpp/Ollama, transformers), before any heavy work; no stage depends on that report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorapipe.core import outputs, warm
from lorapipe.core.cli import run_stage
from lorapipe.core.compat import line as compat_line
from lorapipe.core.params import all_keys
from lorapipe.tasks import RULES, load_params, stage


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.params", description=__doc__)
    parser.add_argument("--params", required=True, help="the params file to check")
    parser.add_argument("--out", required=True, help="where to write that it passed")
    parser.add_argument("--compat", help="where to write reports/compatibility.md")
    args = parser.parse_args(argv)
    params = load_params(args.params)  # raises ParamsError listing every problem
    outputs.write_text(args.out, f"{args.params}: all {len(all_keys())} keys passed the "
                                 "schema and the rules across keys\n")
    print(f"params: {args.params} is valid")
    if args.compat:
        report, rows = stage(params, "params").report(params, Path(args.params).resolve().parent)
        outputs.write_text(args.compat, report)
        print(compat_line(rows, "params"))
    print(f"params: task_type {params.task_type}: not read: "
          + ", ".join(RULES[params.task_type].unused))
    if warm.enabled():  # importing torch & co. now, so encode, train and sample start warm
        warm.start_server()
    return 0


if __name__ == "__main__":
    run_stage("params", main)
