"""Memory of a LoRA step on a quantized frozen base (model.quantize), real architectures.

    python bench/memory.py [--models sd15,sdxl,flux,qwen0.5b,llm8b]
                           [--modes none,bf16,int8,fp8,nf4] [--ckpt 1,0] [--steps 1]
                           [--compute bf16|fp32]

Each row builds one real architecture from its config (random weights: memory and speed do
not depend on them), applies model.quantize through lorapipe's own functions in lorapipe's
order (bitsandbytes before the LoRA, fp8 after it; the LLM through peft's
prepare_model_for_kbit_training, as the train stage does), puts a rank-16 LoRA on the
attention projections (fp32, AdamW), and trains with the base computing in --compute: bf16
(autocast) on CUDA, fp32 on a CPU, where the "bf16" row stores the base in bf16 and computes
it in fp32 (fp8's parametrization with bf16 storage) as the reference the quantized rows
compare with:

- sd15: SD 1.5's UNet, 64x64 latents (512 px), batch 1;
- sdxl: SDXL 1.0's UNet, 128x128 latents (1024 px), batch 1;
- flux: FLUX.1-dev's transformer at its real width with 1 double + 1 single block on a CPU
  (all 19 + 38 on CUDA), 1024 px; the full depth's figure is extrapolated from the measured
  per-block weights, LoRA state and (with checkpointing) the block inputs kept for backward:
  an estimate, said as such in the table;
- qwen0.5b: Qwen2.5-0.5B, 256 tokens, all of it;
- llm8b: Llama-3-8B's shape with 2 of its 32 decoder layers (embeddings and head in full),
  extrapolated per layer the same way: an estimate.

Measured per row: peak RSS while loading and quantizing (`load`), and the peak of the training
steps alone (`step`: the kernel's high-water mark reset after set-up, /proc/self/clear_refs),
s/step, the bytes of the quantized weights and of the rest of the model; on CUDA torch's
peak allocated memory instead. Each row runs in its own process under an address-space limit
(CPU), with glibc's mmap threshold fixed at 128 KiB so freed full-precision weights go back
to the system (otherwise the heap keeps them and the step peak measures the allocator).

Prints a table and writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402

MODELS = ("sd15", "sdxl", "flux", "qwen0.5b", "llm8b")
# model.quantize's settings, and "bf16": the base stored in bf16 and computed in --compute
# (fp8's parametrization with bf16 storage), the reference the quantized rows are set against where
# the compute is fp32
MODES = ("none", "bf16", "int8", "fp8", "nf4")
IMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# meta-llama/Meta-Llama-3-8B's config.json (the keys that shape memory)
LLAMA_3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 8192, "rope_theta": 500000.0,
              "tie_word_embeddings": False}
LLM8B_LAYERS = 2
FLUX_FULL = (19, 38)
TOKENS = 256


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


def _image_model(name: str, device: str):
    """(denoiser, predict(latents, t), latents) for one real image architecture."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from lorapipe.diffusion.families.flux import FLUX_1_DEV_TRANSFORMER
    from lorapipe.diffusion.families.sd import SD_1_5_UNET
    from lorapipe.diffusion.families.sdxl import SDXL_1_0_UNET

    if name == "flux":
        double, single = FLUX_FULL if device == "cuda" else (1, 1)
        model = FluxTransformer2DModel(**{**FLUX_1_DEV_TRANSFORMER, "num_layers": double,
                                          "num_single_layers": single})
        return model, torch.randn(1, 16, 128, 128)
    config = SD_1_5_UNET if name == "sd15" else SDXL_1_0_UNET
    side = 64 if name == "sd15" else 128
    return UNet2DConditionModel(**config), torch.randn(1, 4, side, side)


def _image_predict(name: str, model, device: str):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from lorapipe.diffusion.families.flux import FAMILY as FLUX
    from lorapipe.diffusion.families.flux import FLUX_1_DEV_SCHEDULER
    from lorapipe.diffusion.objectives import DDPM, FlowMatching, FlowSettings

    if name == "flux":
        objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**FLUX_1_DEV_SCHEDULER),
                                 FlowSettings("sigmoid", 0.0, 1.0, 1.0, 1.0, True, "none", 1.0))
        cond = {"text_states": torch.randn(1, 512, 4096, device=device),
                "pooled": torch.randn(1, 768, device=device)}
        return FLUX.predictor(model, cond, objective), objective
    width = 768 if name == "sd15" else 2048
    inputs = {"encoder_hidden_states": torch.randn(1, 77, width, device=device)}
    if name == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, device=device),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=device)}
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return (lambda x, t: model(x, t, **inputs).sample), DDPM(sched)


def _llm(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lorapipe.llm.models import QWEN2_5_0_5B

    if name == "qwen0.5b":
        return Qwen2ForCausalLM(Qwen2Config(**QWEN2_5_0_5B))
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA_3_8B, "num_hidden_layers": LLM8B_LAYERS}))


def _blocks(name: str, model) -> list[tuple[torch.nn.Module, int]]:
    """The repeated blocks a reduced model stands in for: (one block, how many more)."""
    if name == "flux" and len(model.transformer_blocks) == 1:
        return [(model.transformer_blocks[0], FLUX_FULL[0] - 1),
                (model.single_transformer_blocks[0], FLUX_FULL[1] - 1)]
    if name == "llm8b":
        layers = model.base_model.model.model.layers
        return [(layers[0], LLAMA_3_8B["num_hidden_layers"] - len(layers))]
    return []


def _per_block_gib(block: torch.nn.Module, saved_input_bytes: int, ckpt: bool) -> float:
    """One more block's memory: its weights as held, its LoRA's fp32 weights, gradient and
    two AdamW moments, and with checkpointing the block input kept for backward (without
    it, a block's activations: not extrapolated, the row says so)."""
    from lorapipe.core import quantize

    held = sum(quantize.footprint(block))
    lora = sum(q.numel() * 4 * 3 for q in block.parameters() if q.requires_grad)
    return (held + lora + (saved_input_bytes if ckpt else 0)) / 2**30


def _store_bf16(model: torch.nn.Module, compute: torch.dtype, skip: tuple[str, ...]) -> None:
    """The "bf16" row: every Linear and convolution stored in bf16, computed in `compute`,
    with fp8's parametrization (diffusers' in-place layerwise casting fails gradient
    checkpointing's recomputation, as it did for fp8)."""
    from lorapipe.core.quantize import LORA_LAYERS, stored_as

    stored_as(model, torch.bfloat16, compute, skip + LORA_LAYERS)


def step(name: str, mode: str, ckpt: bool, steps: int, compute_name: str) -> dict:
    """Runs in a child process: one row."""
    from diffusers.training_utils import cast_training_params
    from peft import prepare_model_for_kbit_training

    from lorapipe.core import adapters, quantize
    from lorapipe.diffusion import lora
    from lorapipe.diffusion.objectives import diffusion_loss

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute_name]
    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(compute)  # the base as the run holds it (bf16: built so directly)
    quantized = mode if mode in quantize.MODES else "none"
    llm = name in ("qwen0.5b", "llm8b")
    if llm:
        from lorapipe.llm.adapter import attach
        from lorapipe.llm.models import KEEP

        model = _llm(name)
        torch.set_default_dtype(torch.float32)
        model.config.use_cache = False
        model.to(device)
        if quantize.before_adapter(model, quantized, compute, KEEP):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=ckpt,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = attach(model, adapters.Shape(rank=16, alpha=16), "bench")
        cast_training_params(model, dtype=torch.float32)
        quantize.after_adapter(model, quantized, compute, KEEP)
        if mode == "bf16":
            _store_bf16(model, compute, KEEP)
        if ckpt:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, model.config.vocab_size, (1, TOKENS), device=device)

        def loss_of():
            logits = model(input_ids=ids).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     ids[:, 1:].flatten())
        saved = TOKENS * LLAMA_3_8B["hidden_size"] * compute.itemsize
    else:
        model, latents = _image_model(name, device)
        torch.set_default_dtype(torch.float32)
        model.to(device)
        quantize.before_adapter(model, quantized, compute)
        from lorapipe.diffusion.families import flux

        family = flux.FAMILY if name == "flux" else None
        targets = flux.FAMILY.targets("attn")["transformer"] if name == "flux" \
            else IMAGE_TARGETS
        lora.attach({"m": model}, {"m": lora.lora_config(
            adapters.Shape(rank=16, alpha=16), targets)}, family)
        cast_training_params(model, dtype=torch.float32)
        quantize.after_adapter(model, quantized, compute)
        if mode == "bf16":
            _store_bf16(model, compute, ())
        if ckpt:
            model.enable_gradient_checkpointing()
        predict, objective = _image_predict(name, model, device)
        latents = latents.to(device)
        gen = torch.Generator().manual_seed(0)

        def loss_of():
            return diffusion_loss(predict, objective, latents, gen)
        saved = (4096 + 512) * 3072 * compute.itemsize  # Flux: image + text tokens
    model.train()
    gc.collect()
    build_s = time.perf_counter() - start
    stored, other = quantize.footprint(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rss_setup = _status_gib("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:  # the high-water mark from here on is the training's (Linux 4.0+)
        Path("/proc/self/clear_refs").write_text("5")
    times, loss = report.timed_steps(loss_of, opt, steps, device,
                               None if compute == torch.float32 else compute)
    measured = times[1:] or times  # --steps 0: the first step is the measurement
    out = {"model": name, "quantize": mode, "ckpt": ckpt, "device": device,
           "compute": compute_name,
           "s_per_step": sum(measured) / len(measured), "first_step_only": not times[1:],
           "build_s": build_s, "quantized_gib": stored / 2**30, "rest_gib": other / 2**30,
           "lora_params": sum(p.numel() for p in params), "loss": loss}
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["device_name"] = torch.cuda.get_device_name()
    else:
        out.update(load_peak_gib=load_peak, rss_after_setup_gib=rss_setup,
                   step_peak_gib=_status_gib("VmHWM"))
    blocks = _blocks(name, model)
    if blocks:
        more = sum(n * _per_block_gib(b, saved, ckpt) for b, n in blocks)
        measured_peak = out.get("peak_allocated_gib", out.get("step_peak_gib"))
        out["full_depth_estimate_gib"] = measured_peak + more
        out["estimate"] = ("+ per-block weights, LoRA state" + (" and kept block inputs"
                           if ckpt else "; without checkpointing activations not added"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--ckpt", default="1,0", help="gradient checkpointing: 1, 0 or 1,0")
    parser.add_argument("--steps", type=int, default=1, help="after a warm-up step; 0 = the "
                        "first step is the measurement (the real-width image models on a CPU)")
    parser.add_argument("--compute", choices=("bf16", "fp32"), help="what the base computes "
                        "in; default bf16 on CUDA, fp32 on a CPU (CPUs without AVX512-BF16, "
                        "such as this AVX2 EPYC, run bf16 matmuls about 100x slower)")
    parser.add_argument("--limit-gib", type=float, default=22.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "memory.json"))
    args = parser.parse_args()
    if args.child:
        report.limit_address_space(args.limit_gib)
        name, mode, ckpt = args.child.split(":")
        print(json.dumps(step(name, mode, ckpt == "1", args.steps, args.compute)))
        return

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # see the docstring; children inherit it
    compute = args.compute or ("bf16" if torch.cuda.is_available() else "fp32")
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for name in args.models.split(","):
        for ckpt in args.ckpt.split(","):
            for mode in args.modes.split(","):
                row = report.child_row(__file__, f"{name}:{mode}:{ckpt}",
                                       ["--steps", str(args.steps), "--limit-gib",
                                        str(args.limit_gib), "--compute", compute],
                                       {"model": name, "quantize": mode, "ckpt": ckpt == "1"})
                # a rerun of a row replaces it; the other rows are kept
                rows = [r for r in rows if (r["model"], r["quantize"], r["ckpt"]) !=
                        (name, mode, ckpt == "1")] + [row]
                print(json.dumps(row), flush=True)
                report.write(out, {"benchmark": "memory", "torch": torch.__version__,
                                   "machine": platform.machine(),
                                   "processor": platform.processor() or platform.machine(),
                                   "cpus": os.cpu_count(), "limit_gib": args.limit_gib,
                                   "rows": rows})
    report.table(f"LoRA step memory on a quantized base ({compute} compute), torch "
                 f"{torch.__version__}",
                 [("model", "model", "<9"), ("quantize", "quantize", "<8"),
                  ("ckpt", "ckpt", "<5"), ("s/step", "s_per_step", ">7.1f"),
                  ("load GiB", "load_peak_gib", ">8.2f"), ("step GiB", "step_peak_gib", ">8.2f"),
                  ("CUDA GiB", "peak_allocated_gib", ">8.2f"),
                  ("full depth GiB (est.)", "full_depth_estimate_gib", ">21.2f"),
                  ("quantized GiB", "quantized_gib", ">13.2f"), ("rest GiB", "rest_gib", ">8.2f"),
                  ("failed", "failed", "<30")], rows)


if __name__ == "__main__":
    main()
