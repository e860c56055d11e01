"""Benchmark an SDXL-shaped UNet LoRA step at SDXL's native size.

    python bench/sdxl_step.py [--steps 1] [--settings fp32,fp32+ckpt,bf16+ckpt,bf16]

SDXL 1.0's UNet built from its config (lorapipe.diffusion.families.sdxl.SDXL_1_0_UNET, 2.6B
parameters, random weights), a rank-4 LoRA on the attention projections (as lorapipe's
default targets), 128x128 latents (1024 px), batch 1, the SDXL conditioning (2048-wide
text states, pooled embedding, time ids) through lorapipe's loss. For each setting: s/step
(after one warm-up step) and peak memory: the process's peak RSS on CPU, torch's peak
allocated memory on CUDA. Settings: the base in fp32 or bf16 (the LoRA weights stay fp32,
as in training), with or without gradient checkpointing. Each runs in its own process, under
an address-space limit (--limit-gib, CPU only) so a setting that does not fit fails with an
out-of-memory error instead of taking the machine down.

Prints a table and writes bench/results/sdxl_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SETTINGS = ("fp32", "fp32+ckpt", "bf16+ckpt", "bf16")


def step(setting: str, steps: int) -> dict:
    """Runs in a child process: one setting."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from lorapipe.core import adapters
    from lorapipe.diffusion import lora
    from lorapipe.diffusion.families.sdxl import SDXL_1_0_UNET
    from lorapipe.diffusion.objectives import DDPM, diffusion_loss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = setting.startswith("bf16")
    start = time.perf_counter()
    torch.manual_seed(0)
    # bf16 settings build the UNet in bf16 directly: an fp32 build (10 GiB) would set the
    # peak before training starts
    torch.set_default_dtype(torch.bfloat16 if bf16 else torch.float32)
    unet = UNet2DConditionModel(**SDXL_1_0_UNET)
    torch.set_default_dtype(torch.float32)
    lora.attach({"unet": unet}, {"unet": lora.lora_config(adapters.Shape(), TARGETS)})
    if bf16:  # frozen base in bf16, trainable LoRA in fp32, as train.mixed_precision: bf16
        cast_training_params(unet, dtype=torch.float32)
    if setting.endswith("+ckpt"):
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    build_s = time.perf_counter() - start
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(1, 4, 128, 128, device=device)
    inputs = {"encoder_hidden_states": torch.randn(1, 77, 2048, device=device),
              "added_cond_kwargs": {
                  "text_embeds": torch.randn(1, 1280, device=device),
                  "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=device)}}
    gen = torch.Generator().manual_seed(0)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, _ = report.timed_steps(
        lambda: diffusion_loss(lambda x, t: unet(x, t, **inputs).sample, DDPM(sched), latents,
                               gen),
        opt, steps, device, torch.bfloat16 if bf16 else None)
    out = {"setting": setting, "device": device, "s_per_step": sum(times[1:]) / steps,
           "warmup_s": times[0], "build_s": build_s,
           "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
           "lora_params": sum(p.numel() for p in params)}
    out.update(report.peak_memory(rss_setup))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--limit-gib", type=float, default=22.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "sdxl_step.json"))
    args = parser.parse_args()
    if args.child:
        report.limit_address_space(args.limit_gib)
        print(json.dumps(step(args.child, args.steps)))
        return

    rows = []
    for setting in args.settings.split(","):
        rows.append(report.child_row(__file__, setting, ["--steps", str(args.steps),
                                                          "--limit-gib", str(args.limit_gib)],
                                     {"setting": setting}))
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "sdxl_step", "steps": args.steps, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "limit_gib": args.limit_gib, "rows": rows}
    report.table(f"SDXL 1.0-shaped UNet LoRA step, 128x128 latents, batch 1, torch "
                 f"{torch.__version__}",
                 [("setting", "setting", "<12"), ("s/step", "s_per_step", ">8.1f"),
                  ("peak RSS GiB", "peak_rss_gib", ">12.2f"),
                  ("peak CUDA GiB", "peak_allocated_gib", ">13.2f"),
                  ("failed", "failed", "<40")], rows)
    report.write(args.out, result)


if __name__ == "__main__":
    main()
