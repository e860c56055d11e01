"""Benchmark an SD3.5 (large, medium) LoRA step at the real width.

    python bench/sd3_step.py [--steps 0] [--models large,medium] [--settings bf16+ckpt]
    python bench/sd3_step.py --full          # a lent GPU: all 38 (large) / 24 (medium) blocks

The transformer from stabilityai/stable-diffusion-3.5-large's and -medium's configs
(lorapipe.diffusion.families.sd3: large 38 blocks of width 2432, medium 24 of 1536 with
MMDiT-X's second attention in its first 13; random weights), built with a reduced number of
blocks, a rank-16 LoRA on the `attn` preset, at 1024 px (128x128 latents: 4096 image tokens)
with 77 CLIP + 256 T5 tokens, batch 1, through lorapipe's predictor and flow-matching loss.
Depths measured: large 1 and 2 blocks; medium 1 and 2 blocks with the second attention in the
first only, and 2 with it in both. Per-block figures are the differences (for medium a plain
and an MMDiT-X block), the full model extrapolated from them: stated as an extrapolation,
never measured on this CPU machine. s/step (after a warm-up step; --steps 0: the first step
only) and peak memory (peak RSS on CPU, torch's peak allocated memory on CUDA), each run its
own process under an address-space limit (--limit-gib, CPU only).

Prints a table and writes bench/results/sd3_step.json.
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

# model -> [(label, blocks, blocks with the second attention)]
DEPTHS = {"large": [("1", 1, 0), ("2", 2, 0)],
          "medium": [("1x", 1, 1), ("2x1", 2, 1), ("2xx", 2, 2)]}
FULL = {"large": (38, 0), "medium": (24, 13)}


def _config(model: str, blocks: int, dual: int) -> dict:
    from lorapipe.diffusion.families.sd3 import SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER

    config = SD35_LARGE_TRANSFORMER if model == "large" else SD35_MEDIUM_TRANSFORMER
    return {**config, "num_layers": blocks, "dual_attention_layers": list(range(dual))}


def step(model: str, setting: str, blocks: int, dual: int, steps: int) -> dict:
    """Runs in a child process: one model, setting and depth."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.training_utils import cast_training_params

    from lorapipe.core import adapters
    from lorapipe.diffusion import lora
    from lorapipe.diffusion.families.sd3 import FAMILY, SD35_SCHEDULER
    from lorapipe.diffusion.objectives import FlowMatching, FlowSettings, diffusion_loss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = setting.startswith("bf16")
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
    transformer = SD3Transformer2DModel(**_config(model, blocks, dual))
    torch.set_default_dtype(torch.float32)
    lora.attach({"transformer": transformer}, {"transformer": lora.lora_config(
        adapters.Shape(rank=16, alpha=16), FAMILY.targets("attn")["transformer"])}, FAMILY)
    if bf16:  # frozen base in bf16, trainable LoRA in fp32, as train.mixed_precision: bf16
        cast_training_params(transformer, dtype=torch.float32)
    if setting.endswith("+ckpt"):
        transformer.enable_gradient_checkpointing()
    transformer.to(device).train()
    build_s = time.perf_counter() - start
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
                             FlowSettings("sigmoid", 0.0, 1.0, 1.0, 1.0, True, "none", 1.0))
    cond = {"text_states": torch.randn(1, 77 + 256, 4096, device=device),
            "pooled": torch.randn(1, 2048, device=device)}
    predict = FAMILY.predictor(transformer, cond, objective)
    latents = torch.randn(1, 16, 128, 128, device=device)
    gen = torch.Generator().manual_seed(0)
    return {"model": model, "setting": setting, "blocks": blocks, "dual": dual,
            "build_s": build_s, **report.lora_step(
                transformer, lambda: diffusion_loss(predict, objective, latents, gen), steps,
                device, torch.bfloat16 if bf16 else None)}


def extrapolate(rows: list[dict], model: str, setting: str) -> dict | None:
    by = {(r["blocks"], r["dual"]): r for r in rows
          if (r.get("model"), r.get("setting")) == (model, setting) and "s_per_step" in r}
    key = "peak_allocated_gib" if any("peak_allocated_gib" in r for r in by.values()) \
        else "peak_rss_gib"
    n, n_dual = FULL[model]
    if model == "large" and {(1, 0), (2, 0)} <= set(by):
        one, two = by[(1, 0)], by[(2, 0)]
        per_s, per_gib = two["s_per_step"] - one["s_per_step"], two[key] - one[key]
        return {"model": model, "setting": setting, "block_s": per_s, "block_gib": per_gib,
                "full_s_per_step": one["s_per_step"] + (n - 1) * per_s,
                "full_gib": one[key] + (n - 1) * per_gib, "memory": key, "extrapolated": True}
    if model == "medium" and {(1, 1), (2, 1), (2, 2)} <= set(by):
        one, plain, dual = by[(1, 1)], by[(2, 1)], by[(2, 2)]
        plain_s, plain_gib = plain["s_per_step"] - one["s_per_step"], plain[key] - one[key]
        dual_s, dual_gib = dual["s_per_step"] - one["s_per_step"], dual[key] - one[key]
        # the 1-block model is the last (text side pre-only) block with the second attention;
        # the full one adds 12 MMDiT-X blocks and 11 plain ones
        return {"model": model, "setting": setting, "block_s": plain_s, "block_gib": plain_gib,
                "dual_block_s": dual_s, "dual_block_gib": dual_gib,
                "full_s_per_step": one["s_per_step"] + (n_dual - 1) * dual_s
                + (n - n_dual) * plain_s,
                "full_gib": one[key] + (n_dual - 1) * dual_gib + (n - n_dual) * plain_gib,
                "memory": key, "extrapolated": True}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--models", default="large,medium")
    parser.add_argument("--settings", default="bf16+ckpt")
    parser.add_argument("--full", action="store_true", help="every block (a GPU)")
    parser.add_argument("--limit-gib", type=float, default=22.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "sd3_step.json"))
    args = parser.parse_args()
    if args.child:
        report.limit_address_space(args.limit_gib)
        model, setting, blocks, dual = args.child.split("@")
        print(json.dumps(step(model, setting, int(blocks), int(dual), args.steps)))
        return
    rows = []
    models = args.models.split(",")
    for setting in args.settings.split(","):
        for model in models:
            depths = ([("full", *FULL[model])] if args.full else DEPTHS[model])
            for _label, blocks, dual in depths:
                rows.append(report.child_row(
                    __file__, f"{model}@{setting}@{blocks}@{dual}",
                    ["--steps", str(args.steps), "--limit-gib", str(args.limit_gib)],
                    {"model": model, "setting": setting, "blocks": blocks, "dual": dual}))
                print(json.dumps(rows[-1]), flush=True)
    extrapolated = [e for s in args.settings.split(",") for m in models
                    if (e := extrapolate(rows, m, s))]
    result = {"benchmark": "sd3_step", "steps": args.steps, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "limit_gib": args.limit_gib, "rows": rows, "extrapolated": extrapolated}
    report.table(f"SD3.5 transformer LoRA step, 4096 image + 333 text tokens, batch 1, torch "
                 f"{torch.__version__}",
                 [("model", "model", "<7"), ("setting", "setting", "<10"),
                  ("blocks", "blocks", ">6"), ("MMDiT-X", "dual", ">7"),
                  ("s/step", "s_per_step", ">8.1f"), ("peak RSS GiB", "peak_rss_gib", ">12.2f"),
                  ("peak CUDA GiB", "peak_allocated_gib", ">13.2f"),
                  ("failed", "failed", "<40")], rows)
    if extrapolated:
        report.table("per block (differences) and the full model, EXTRAPOLATED",
                     [("model", "model", "<7"), ("setting", "setting", "<10"),
                      ("s/block", "block_s", ">8.1f"), ("GiB/block", "block_gib", ">9.2f"),
                      ("s/X-block", "dual_block_s", ">9.1f"),
                      ("GiB/X-block", "dual_block_gib", ">11.2f"),
                      ("full s/step", "full_s_per_step", ">11.0f"),
                      ("full GiB", "full_gib", ">9.1f")], extrapolated)
    report.write(args.out, result)


if __name__ == "__main__":
    main()
