"""Benchmark a Qwen-Image LoRA step at the real width.

    python bench/qwen_image_step.py [--steps 0] [--settings bf16+ckpt]
    python bench/qwen_image_step.py --full      # a lent GPU: all 60 blocks

The transformer from Qwen/Qwen-Image's config (lorapipe.diffusion.families.qwen_image: 60
dual-stream blocks of width 3072, joint attention dim 3584; random weights), built with 1
and 2 blocks, a rank-16 LoRA on the `kohya` preset (musubi-tuner's default: attention and
both MLPs), at 1024 px (128x128 latents: 4096 image tokens) with a 256-token caption,
batch 1, through lorapipe's predictor and flow-matching loss with the dynamic shift. The
per-block figure is the difference of the two, the full model extrapolated from it: stated
as an extrapolation, never measured on this CPU machine. s/step (after a warm-up step;
--steps 0: the first step only) and peak memory (peak RSS on CPU, torch's peak allocated
memory on CUDA), each run its own process under an address-space limit (--limit-gib, CPU
only).

Prints a table and writes bench/results/qwen_image_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402

FULL = 60
TEXT_TOKENS = 256


def step(setting: str, blocks: int, steps: int) -> dict:
    """Runs in a child process: one setting and depth."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.training_utils import cast_training_params

    from lorapipe.core import adapters
    from lorapipe.diffusion import lora
    from lorapipe.diffusion.families.qwen_image import (
        FAMILY,
        QWEN_IMAGE_SCHEDULER,
        QWEN_IMAGE_TRANSFORMER,
    )
    from lorapipe.diffusion.objectives import FlowMatching, FlowSettings, diffusion_loss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = setting.startswith("bf16")
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
    transformer = QwenImageTransformer2DModel(**{**QWEN_IMAGE_TRANSFORMER, "num_layers": blocks})
    torch.set_default_dtype(torch.float32)
    lora.attach({"transformer": transformer}, {"transformer": lora.lora_config(
        adapters.Shape(rank=16, alpha=16), FAMILY.targets("kohya")["transformer"])}, FAMILY)
    if bf16:  # frozen base in bf16, trainable LoRA in fp32, as train.mixed_precision: bf16
        cast_training_params(transformer, dtype=torch.float32)
    if setting.endswith("+ckpt"):
        FAMILY.enable_gradient_checkpointing(transformer)
    transformer.to(device).train()
    build_s = time.perf_counter() - start
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
                             FlowSettings("sigmoid", 0.0, 1.0, 1.0, 1.0, True, "none", 1.0))
    cond = {"text_states": torch.randn(1, TEXT_TOKENS, 3584, device=device),
            "text_mask": torch.ones(1, TEXT_TOKENS, device=device)}
    predict = FAMILY.predictor(transformer, cond, objective)
    latents = torch.randn(1, 16, 128, 128, device=device)
    gen = torch.Generator().manual_seed(0)
    return {"setting": setting, "blocks": blocks, "build_s": build_s, **report.lora_step(
        transformer, lambda: diffusion_loss(predict, objective, latents, gen), steps, device,
        torch.bfloat16 if bf16 else None)}


def extrapolate(rows: list[dict], setting: str) -> dict | None:
    by = {r["blocks"]: r for r in rows
          if r.get("setting") == setting and "s_per_step" in r}
    if not {1, 2} <= set(by):
        return None
    key = "peak_allocated_gib" if "peak_allocated_gib" in by[1] else "peak_rss_gib"
    one, two = by[1], by[2]
    per_s, per_gib = two["s_per_step"] - one["s_per_step"], two[key] - one[key]
    return {"setting": setting, "block_s": per_s, "block_gib": per_gib,
            "full_s_per_step": one["s_per_step"] + (FULL - 1) * per_s,
            "full_gib": one[key] + (FULL - 1) * per_gib, "memory": key, "extrapolated": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--settings", default="bf16+ckpt")
    parser.add_argument("--full", action="store_true", help="all 60 blocks (a GPU)")
    parser.add_argument("--limit-gib", type=float, default=22.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "qwen_image_step.json"))
    args = parser.parse_args()
    if args.child:
        report.limit_address_space(args.limit_gib)
        setting, blocks = args.child.split("@")
        print(json.dumps(step(setting, int(blocks), args.steps)))
        return
    rows = []
    for setting in args.settings.split(","):
        for blocks in ([FULL] if args.full else [1, 2]):
            rows.append(report.child_row(
                __file__, f"{setting}@{blocks}",
                ["--steps", str(args.steps), "--limit-gib", str(args.limit_gib)],
                {"setting": setting, "blocks": blocks}))
            print(json.dumps(rows[-1]), flush=True)
    extrapolated = [e for s in args.settings.split(",") if (e := extrapolate(rows, s))]
    result = {"benchmark": "qwen_image_step", "steps": args.steps, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "limit_gib": args.limit_gib, "text_tokens": TEXT_TOKENS, "rows": rows,
              "extrapolated": extrapolated}
    report.table(f"Qwen-Image transformer LoRA step, 4096 image + {TEXT_TOKENS} text tokens, "
                 f"batch 1, torch {torch.__version__}",
                 [("setting", "setting", "<10"), ("blocks", "blocks", ">6"),
                  ("s/step", "s_per_step", ">8.1f"), ("peak RSS GiB", "peak_rss_gib", ">12.2f"),
                  ("peak CUDA GiB", "peak_allocated_gib", ">13.2f"),
                  ("failed", "failed", "<40")], rows)
    if extrapolated:
        report.table("per block (difference) and the full 60-block model, EXTRAPOLATED",
                     [("setting", "setting", "<10"), ("s/block", "block_s", ">8.1f"),
                      ("GiB/block", "block_gib", ">9.2f"),
                      ("full s/step", "full_s_per_step", ">11.0f"),
                      ("full GiB", "full_gib", ">9.1f")], extrapolated)
    report.write(args.out, result)


if __name__ == "__main__":
    main()
