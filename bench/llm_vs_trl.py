"""lorapipe's LLM train loop against TRL's SFTTrainer + peft, side by side.

    python bench/llm_vs_trl.py [--layers 4] [--steps 20] [--batch 8] [--pairs 3]

TRL is not a lorapipe dependency: `pip install trl` first (this bench's results: trl 1.16.0).

The same model, data and settings in both: Qwen2.5-0.5B-Instruct's widths and vocabulary
with --layers of its 24 layers (random weights, saved as a Hugging Face folder with the
builtin tokenizer: bench/llm_runs.py), 111 short one-turn chats (240 drawn, duplicates
dropped; some with a system message; bench/llm_runs.py), lorapipe's training split of them for
both (its own held-out split: TRL trains on exactly the examples lorapipe does), LoRA rank 16 /
alpha 16 on
q,k,v,o_proj without dropout, AdamW at a constant 1e-4 with weight decay 0.01 and gradient
clipping at 1.0, batch --batch, fp32, no gradient checkpointing, loss on the answers only
(lorapipe's default; TRL's completion_only_loss on prompt/completion chats), each batch padded
to its longest example, no packing, and no evaluation, checkpoints or samples beyond what
lorapipe cannot switch off (one fixed-loss evaluation of one example at the start and end).

Per run: s/step over the whole loop (lorapipe's steps/s; TRL's train_runtime / steps) and
the process's peak RSS. Each run is its own process; the two alternate, --pairs times, and
the ratio is the median of the pairs' ratios.

Prints a table and writes bench/results/llm_vs_trl.json.
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
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def chats(work: Path) -> Path:
    return llm_runs.short_chats(work / "chats", 240, max_turns=1)


def train_examples(work: Path):
    """The chats' training split, as lorapipe holds out its validation examples."""
    import yaml

    from lorapipe.core.evaluation import holdout
    from lorapipe.llm.data import read_examples

    examples, _, _ = read_examples(chats(work))
    split = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["validation"]["split"]
    train, _ = holdout([e.to_json() for e in examples], split)
    return [examples[i] for i in train]


def run_lorapipe(args, work: Path) -> dict:
    base = str(llm_runs.base_folder(work / f"base-{args.layers}", args.layers))
    out = llm_runs.lorapipe_run(
        Path(tempfile.mkdtemp(dir=work)), chats(work), base, train__max_steps=args.steps,
        train__batch_size=args.batch, train__learning_rate=1e-4, lora__rank=16,
        lora__alpha=16, lora__targets=TARGETS, train__validation__every=args.steps,
        train__validation__fixed_images=1, train__validation__max_images=1,
        train__cpu_threads=0)
    return {"s_per_step": 1 / out["timing"]["steps_per_s"],
            "loss_end": out["summary"]["loss"]["train"], "examples": len(train_examples(work))}


def run_trl(args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base = llm_runs.base_folder(work / f"base-{args.layers}", args.layers)
    rows = [{"prompt": e.messages[:-1], "completion": e.messages[-1:]}
            for e in train_examples(work)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = SFTConfig(
        output_dir=str(Path(tempfile.mkdtemp(dir=work))), max_steps=args.steps,
        per_device_train_batch_size=args.batch, learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.01,
        max_grad_norm=1.0, logging_steps=args.steps, save_strategy="no", eval_strategy="no",
        report_to=[], max_length=256, completion_only_loss=True, packing=False, seed=0,
        dataloader_num_workers=0, use_cpu=True, bf16=False, gradient_checkpointing=False,
        disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=LoraConfig(
                             r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM"))
    metrics = trainer.train().metrics
    return {"s_per_step": metrics["train_runtime"] / args.steps,
            "loss_end": trainer.state.log_history[-1].get("train_loss"),
            "examples": len(rows), "trl": __import__("trl").__version__}


def child(args) -> None:
    import resource

    work = Path(args.work)
    out = (run_lorapipe if args.child == "lorapipe" else run_trl)(args, work)
    print(json.dumps({"trainer": args.child, **out,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--child", default="")
    parser.add_argument("--work", default="")
    args = parser.parse_args()
    if args.child:
        return child(args)
    work = tempfile.mkdtemp(prefix="lorapipe-bench-trl-")
    flags = ["--layers", str(args.layers), "--steps", str(args.steps), "--batch",
             str(args.batch), "--work", work]
    rows, ratios = [], []
    for pair in range(args.pairs):
        order = ("lorapipe", "trl") if pair % 2 == 0 else ("trl", "lorapipe")
        got = {name: report.child_row(__file__, name, flags, {"trainer": name})
               for name in order}
        for name in order:
            rows.append({**got[name], "pair": pair})
            print(rows[-1], flush=True)
        if all("failed" not in got[n] for n in order):
            ratios.append(got["lorapipe"]["s_per_step"] / got["trl"]["s_per_step"])
    summary = [{"trainer": name,
                "s_per_step": statistics.median(r["s_per_step"] for r in rows
                                                if r["trainer"] == name and "failed" not in r),
                "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rows
                                                  if r["trainer"] == name and "failed" not in r)}
               for name in ("lorapipe", "trl")]
    report.table("s/step and peak RSS (median of the runs)",
                 [("trainer", "trainer", "<9"), ("s/step", "s_per_step", ">8.3f"),
                  ("peak RSS GiB", "peak_rss_gib", ">12.2f")], summary)
    ratio = statistics.median(ratios) if ratios else float("nan")
    print(f"\nlorapipe / TRL s/step, median of {len(ratios)} pairs: {ratio:.3f}")
    report.write(HERE / "results" / "llm_vs_trl.json", {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "work")},
        "runs": rows, "summary": summary, "pair_ratios": ratios, "ratio": ratio})


if __name__ == "__main__":
    main()
