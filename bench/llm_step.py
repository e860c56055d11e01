"""Benchmark an LLM LoRA step on Qwen2.5-0.5B-Instruct's architecture.

    python bench/llm_step.py [--steps 2] [--settings fp32,fp32+ckpt,bf16+ckpt,bf16]

Qwen2.5-0.5B's shape (lorapipe.llm.models.QWEN2_5_0_5B, 494M parameters, random weights:
the timing does not depend on them), lorapipe's LoRA (lora.targets attn and all-linear, rank
16) through peft, one sequence of --tokens tokens (batch 1), next-token cross-entropy on
all of them. For each setting: s/step (after one warm-up step) and peak memory (peak RSS on
CPU, torch's peak allocated on CUDA). Settings: the base in fp32 or bf16 (the LoRA stays
fp32, as train.mixed_precision: bf16 does), with or without gradient checkpointing. Each
runs in its own process.

Also the builtin tiny LLM's speed at the example set's shapes (batch 4 of 64 tokens).

Prints a table and writes bench/results/llm_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402

SETTINGS = ("fp32", "fp32+ckpt", "bf16+ckpt", "bf16")


def step(setting: str, targets: str, steps: int, tokens: int, batch: int) -> dict:
    """Runs in a child process: one setting."""
    from diffusers.training_utils import cast_training_params
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorapipe.core import adapters
    from lorapipe.llm.adapter import attach
    from lorapipe.llm.models import QWEN2_5_0_5B, build_tiny_llm

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = setting.startswith("bf16")
    start = time.perf_counter()
    torch.manual_seed(0)
    if targets == "tiny":
        model, _ = build_tiny_llm()
        lp = adapters.Shape(rank=4, alpha=4, targets="attn")
    else:
        torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_0_5B))
        torch.set_default_dtype(torch.float32)
        lp = adapters.Shape(rank=16, alpha=32, targets=targets)
    model.config.use_cache = False
    model = attach(model, lp, "bench")
    if bf16:
        cast_training_params(model, dtype=torch.float32)
    if setting.endswith("+ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    build_s = time.perf_counter() - start
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device=device)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    def loss_of():
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 ids[:, 1:].flatten())

    times, _ = report.timed_steps(loss_of, opt, steps, device, torch.bfloat16 if bf16 else None)
    out = {"setting": setting, "targets": targets, "device": device, "tokens": batch * tokens,
           "s_per_step": sum(times[1:]) / steps, "warmup_s": times[0], "build_s": build_s,
           "model_params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "lora_params": sum(p.numel() for p in params)}
    out.update(report.peak_memory(rss_setup))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--targets", default="attn", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "llm_step.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step(args.child, args.targets, args.steps, args.tokens, args.batch)))
        return

    runs = [(s, "attn", args.steps, args.tokens, 1) for s in args.settings.split(",")]
    runs += [("fp32", "all-linear", args.steps, args.tokens, 1), ("fp32", "tiny", 20, 64, 4)]
    rows = []
    for setting, targets, steps, tokens, batch in runs:
        child = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--targets", targets, "--steps",
             str(steps), "--tokens", str(tokens), "--batch", str(batch)],
            capture_output=True, text=True, cwd=REPO)
        if child.returncode == 0:
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        else:
            rows.append({"setting": setting, "targets": targets,
                         "error": child.stderr.strip().splitlines()[-1][:120]})
    report.table("LLM LoRA step (Qwen2.5-0.5B shape, rank 16; tiny: the builtin, rank 4)", [
        ("setting", "setting", "<10"), ("targets", "targets", "<10"), ("tokens", "tokens", ">6"),
        ("s/step", "s_per_step", ">8.3f"), ("peak GiB", "peak_rss_gib", ">8.2f"),
        ("LoRA params", "lora_params", ">11,")], rows)
    report.write(args.out, {"benchmark": "llm_step", "machine": platform.machine(),
                            "cores": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
