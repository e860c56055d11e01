"""Benchmark a Flux.1-dev LoRA step at its real width, and load a BFL single file.

    python bench/flux_step.py [--steps 1] [--settings bf16,bf16+ckpt] [--blocks 1:1,2:1,1:2]
    python bench/flux_step.py --steps 0 ...   # the first step only (CPU: minutes a step)
    python bench/flux_step.py --full          # a lent GPU: all 19 + 38 blocks
    python bench/flux_step.py --single-file   # BFL-layout file -> lorapipe's loader
    python bench/flux_step.py --chroma ...    # Chroma1-HD's transformer instead

FLUX.1-dev's transformer from its config (lorapipe.diffusion.families.flux.
FLUX_1_DEV_TRANSFORMER: width 3072, 24 heads of 128, guidance embedding; random weights),
built with a reduced number of double- and single-stream blocks (--blocks D:S,...), a
rank-16 LoRA on the `attn` preset, at 1024 px (64x64 latents packed to 4096 image tokens)
with 512 T5 tokens, batch 1, through lorapipe's own predictor (packing, position ids,
guidance 1.0) and flow-matching loss. For each setting and block count: s/step (after one
warm-up step) and peak memory (peak RSS on CPU, torch's peak allocated memory on CUDA).
Per-block figures are the differences between block counts (D+1:S - D:S for a double block,
D:S+1 - D:S for a single one), and the full model's figures are extrapolated from them to
19 + 38 blocks: stated as an extrapolation, never measured on this CPU machine. On CUDA,
--full measures the whole model. Each run is its own process under an address-space limit
(--limit-gib, CPU only).

--single-file writes a BFL-layout transformer file (Black Forest Labs' names, fused qkv) of
the real width with 1 + 1 blocks, and a diffusers folder (the tiny builtin's text encoders
and VAE, this transformer's config) as model.config, then loads them through lorapipe's
loader (diffusers' single-file converter assumes the real 3072 width, so the tiny builtin
cannot stand in): the family and variant detected from the tensor names, every weight equal
to the one written.

--chroma measures Chroma1-HD's transformer the same way (lorapipe.diffusion.families.chroma.
CHROMA_TRANSFORMER: Flux's blocks and widths, the modulations from one distilled guidance
network; T5 only, with its mask; no guidance input) and writes bench/results/chroma_step.json.

Prints a table and writes bench/results/flux_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402

SETTINGS = ("bf16", "bf16+ckpt")
BLOCKS = "1:1,2:1,1:2"
FULL = (19, 38)


def _transformer(double: int, single: int, dtype, chroma: bool = False):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    from lorapipe.diffusion.families.chroma import CHROMA_TRANSFORMER
    from lorapipe.diffusion.families.flux import FLUX_1_DEV_TRANSFORMER

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in bf16 directly: an fp32 build sets the peak
    cls, config = ((ChromaTransformer2DModel, CHROMA_TRANSFORMER) if chroma
                   else (FluxTransformer2DModel, FLUX_1_DEV_TRANSFORMER))
    model = cls(**{**config, "num_layers": double, "num_single_layers": single})
    torch.set_default_dtype(torch.float32)
    return model


def step(setting: str, double: int, single: int, steps: int, chroma: bool = False) -> dict:
    """Runs in a child process: one setting at one block count."""
    from diffusers.training_utils import cast_training_params

    from lorapipe.core import adapters
    from lorapipe.diffusion import lora
    from lorapipe.diffusion.families import chroma as chroma_family
    from lorapipe.diffusion.families.flux import FAMILY, FLUX_1_DEV_SCHEDULER
    from lorapipe.diffusion.objectives import FlowMatching, FlowSettings, diffusion_loss

    family = chroma_family.FAMILY if chroma else FAMILY

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = setting.startswith("bf16")
    start = time.perf_counter()
    transformer = _transformer(double, single, torch.bfloat16 if bf16 else torch.float32,
                               chroma)
    lora.attach({"transformer": transformer}, {"transformer": lora.lora_config(
        adapters.Shape(rank=16, alpha=16), family.targets("attn")["transformer"])}, family)
    if bf16:  # frozen base in bf16, trainable LoRA in fp32, as train.mixed_precision: bf16
        cast_training_params(transformer, dtype=torch.float32)
    if setting.endswith("+ckpt"):
        transformer.enable_gradient_checkpointing()
    transformer.to(device).train()
    build_s = time.perf_counter() - start
    from diffusers import FlowMatchEulerDiscreteScheduler

    objective = FlowMatching(FlowMatchEulerDiscreteScheduler(**FLUX_1_DEV_SCHEDULER),
                             FlowSettings("sigmoid", 0.0, 1.0, 1.0, 1.0, True, "none", 1.0))
    cond = {"text_states": torch.randn(1, 512, 4096, device=device),
            "pooled": torch.randn(1, 768, device=device)}
    if chroma:  # T5 only, its mask over all 512 tokens
        cond = {"text_states": cond["text_states"], "text_mask": torch.ones(1, 512,
                                                                            device=device)}
    predict = family.predictor(transformer, cond, objective)
    latents = torch.randn(1, 16, 128, 128, device=device)  # 1024 px: 64x64 packed tokens
    gen = torch.Generator().manual_seed(0)
    # --steps 0: the first step is the measurement (on this CPU one real-width step takes
    # minutes; the warm-up's extra cost is small beside it), said in the result
    return {"model": "chroma" if chroma else "flux", "setting": setting, "double": double,
            "single": single, "build_s": build_s, **report.lora_step(
                transformer, lambda: diffusion_loss(predict, objective, latents, gen), steps,
                device, torch.bfloat16 if bf16 else None)}


def to_bfl(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer's weights in Black Forest Labs' layout: the inverse of
    diffusers' convert_flux_transformer_checkpoint_to_diffusers, through lorapipe's module
    map (families.flux.bfl_module, the one kohya's LoRA names come from)."""
    from lorapipe.diffusion.families.flux import SWAPPED, bfl_module

    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm",
             "attn.norm_added_k": "txt_attn.norm.key_norm"}
    single_norms = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".", 1)
        for prefix, bfl, table in (("single_transformer_blocks.", "single_blocks.", single_norms),
                                   ("transformer_blocks.", "double_blocks.", norms)):
            if module.startswith(prefix):
                index, _, rest = module.removeprefix(prefix).partition(".")
                if rest in table:
                    out[f"{bfl}{index}.{table[rest]}.scale"] = tensor
                    break
        else:
            name, part, _ = bfl_module(module)
            if name == SWAPPED:
                first, second = tensor.chunk(2, dim=0)
                tensor = torch.cat([second, first], dim=0)
            parts.setdefault(f"{name}.{kind}", {})[part] = tensor
    for key, members in parts.items():
        out[key] = torch.cat([members[i] for i in sorted(members)], dim=0).contiguous()
    return out


def single_file() -> dict:
    """A real-width BFL file with 1 + 1 blocks through lorapipe's loader."""
    from safetensors.torch import save_file

    from lorapipe.diffusion.families.flux import build_tiny_flux
    from lorapipe.diffusion.models import load_base

    transformer = _transformer(1, 1, torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "config"
        pipe = build_tiny_flux()
        pipe.transformer = transformer  # its config: the real width, 1 + 1 blocks
        pipe.save_pretrained(folder)
        # the config folder's text encoders are the tiny ones; the pipeline only needs them
        # to be there (a user's folder holds FLUX.1-dev's)
        path = Path(tmp) / "flux1-dev.safetensors"
        bfl = to_bfl(transformer.state_dict(), transformer.config)
        save_file(bfl, str(path))
        start = time.perf_counter()
        base = load_base(str(path), str(folder), root=Path("/"))
        load_s = time.perf_counter() - start
        loaded = base.pipe.transformer.state_dict()
        original = transformer.state_dict()
        same = loaded.keys() == original.keys() and all(
            torch.equal(loaded[k].to(original[k].dtype), original[k]) for k in original)
        return {"bfl_tensors": len(bfl), "file_gib": path.stat().st_size / 2**30,
                "family": base.family.name, "variant": base.family.variant,
                "weights_equal": same, "load_s": load_s}


def extrapolate(rows: list[dict], setting: str) -> dict | None:
    by = {(r["double"], r["single"]): r for r in rows
          if r.get("setting") == setting and "s_per_step" in r}
    if not {(1, 1), (2, 1), (1, 2)} <= set(by):
        return None
    base, d, s = by[(1, 1)], by[(2, 1)], by[(1, 2)]
    key = "peak_allocated_gib" if "peak_allocated_gib" in base else "peak_rss_gib"
    per = {"double_s": d["s_per_step"] - base["s_per_step"],
           "single_s": s["s_per_step"] - base["s_per_step"],
           "double_gib": d[key] - base[key], "single_gib": s[key] - base[key]}
    n_d, n_s = FULL
    return {"setting": setting, **per,
            "full_s_per_step": base["s_per_step"] + (n_d - 1) * per["double_s"]
            + (n_s - 1) * per["single_s"],
            "full_gib": base[key] + (n_d - 1) * per["double_gib"]
            + (n_s - 1) * per["single_gib"], "memory": key, "extrapolated": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--blocks", default=BLOCKS)
    parser.add_argument("--full", action="store_true", help="19:38 blocks (a GPU)")
    parser.add_argument("--single-file", action="store_true")
    parser.add_argument("--chroma", action="store_true", help="Chroma1-HD's transformer")
    parser.add_argument("--limit-gib", type=float, default=22.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "flux_step.json"))
    args = parser.parse_args()
    if args.child:
        report.limit_address_space(args.limit_gib)
        setting, blocks = args.child.split("@")
        double, single = map(int, blocks.split(":"))
        print(json.dumps(step(setting, double, single, args.steps, args.chroma)))
        return
    if args.single_file:
        result = single_file()
        print(json.dumps(result, indent=2))
        report.write(HERE / "results" / "flux_single_file.json", result)
        return

    blocks = [f"{FULL[0]}:{FULL[1]}"] if args.full else args.blocks.split(",")
    rows = []
    for setting in args.settings.split(","):
        for block in blocks:
            d, s = map(int, block.split(":"))
            rows.append(report.child_row(
                __file__, f"{setting}@{block}",
                ["--steps", str(args.steps), "--limit-gib", str(args.limit_gib)]
                + (["--chroma"] if args.chroma else []),
                {"setting": setting, "double": d, "single": s}))
            print(json.dumps(rows[-1]), flush=True)
    extrapolated = [e for s in args.settings.split(",") if (e := extrapolate(rows, s))]
    if args.chroma and args.out == str(HERE / "results" / "flux_step.json"):
        args.out = str(HERE / "results" / "chroma_step.json")
    result = {"benchmark": "chroma_step" if args.chroma else "flux_step", "steps": args.steps,
              "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "limit_gib": args.limit_gib, "rows": rows, "extrapolated": extrapolated}
    report.table(f"{'Chroma1-HD' if args.chroma else 'FLUX.1-dev'} transformer (width 3072) "
                 f"LoRA step, 4096 image + 512 text "
                 f"tokens, batch 1, torch {torch.__version__}",
                 [("setting", "setting", "<10"), ("double", "double", ">6"),
                  ("single", "single", ">6"), ("s/step", "s_per_step", ">8.1f"),
                  ("peak RSS GiB", "peak_rss_gib", ">12.2f"),
                  ("peak CUDA GiB", "peak_allocated_gib", ">13.2f"),
                  ("failed", "failed", "<40")], rows)
    if extrapolated:
        report.table("per block (differences) and the full 19 + 38 blocks, EXTRAPOLATED",
                     [("setting", "setting", "<10"), ("s/double", "double_s", ">9.1f"),
                      ("s/single", "single_s", ">9.1f"),
                      ("GiB/double", "double_gib", ">10.2f"),
                      ("GiB/single", "single_gib", ">10.2f"),
                      ("full s/step", "full_s_per_step", ">11.0f"),
                      ("full GiB", "full_gib", ">9.1f")], extrapolated)
    report.write(args.out, result)


if __name__ == "__main__":
    main()
