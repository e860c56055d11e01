"""sample, image task: images from the trained LoRA beside the base model's, and a grid of
them, loaded the way users load the LoRA (pipe.load_lora_weights; LoHa and LoKr through
peft)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lorapipe.core import threads
from lorapipe.core.errors import LorapipeError


def run(params, args) -> int:
    import numpy as np
    import torch
    from diffusers.utils import logging as diffusers_logging
    from dvclive import Live
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from lorapipe.core import outputs, quantize
    from lorapipe.core.tracking import sample_run_name
    from lorapipe.diffusion.lora import adapter_files, load_into, training_run
    from lorapipe.diffusion.models import load_base
    from lorapipe.diffusion.sampling import SampleSettings, sample_grid, seeds_for

    p = params.sample
    if not adapter_files(Path(args.lora)):
        raise LorapipeError(f"{args.lora} holds no LoRA (pytorch_lora_weights.safetensors, or "
                            "per-component peft folders); run the train stage first")
    if not torch.cuda.is_available():
        # always automatic here: sample.* has no thread key, and images are not compared
        # across machines byte for byte the way the trained LoRA is
        torch.set_num_threads(threads.share(0)[0])
    diffusers_logging.set_verbosity_error()  # its "no text-encoder LoRA keys" note is noise
    m = params.model
    base = load_base(m.base, m.config, prediction_type=m.prediction_type,
                     noise_schedule=m.noise_schedule)
    pipe, family = base.pipe, base.family
    if p.width % family.size_multiple or p.height % family.size_multiple:
        raise LorapipeError(
            f"sample.width {p.width} x sample.height {p.height}: {family.title} needs "
            f"multiples of {family.size_multiple}")
    pipe.scheduler = family.sampler(p.scheduler, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    # model.quantize as the training ran it: bitsandbytes' layers before the LoRA, fp8 after
    denoiser, mode = getattr(pipe, family.denoiser), params.model.quantize
    quantize.before_adapter(denoiser, mode, torch.float32)
    load_into(pipe, args.lora)  # exactly as a user loads it
    quantize.after_adapter(denoiser, mode, torch.float32)
    settings = SampleSettings(p.steps, p.guidance_scale, p.negative_prompt, p.width, p.height,
                              p.lora_scale)
    seeds = seeds_for(p.seed, p.images_per_prompt)

    start = time.perf_counter()
    with tqdm(total=len(p.prompts) * len(seeds), desc="sample", unit="pair") as bar:
        grid, images = sample_grid(pipe, p.prompts, seeds, settings, progress=bar,
                                   family=family)
    seconds = time.perf_counter() - start
    with outputs.atomic_dir(args.out) as tmp:
        for index, seed, base, lora in images:
            lora.save(tmp / f"prompt{index:02d}_seed{seed}.png")
            base.save(tmp / f"prompt{index:02d}_seed{seed}_base.png")
        grid.save(tmp / "grid.png")
        (tmp / "prompts.json").write_text(json.dumps(
            {f"prompt{i:02d}": prompt for i, prompt in enumerate(p.prompts)}, indent=2) + "\n")
        live = Live(str(tmp / "dvclive"), dvcyaml=False, save_dvc_exp=False)
        live.log_image("grid.png", grid)  # for `dvc plots show`, beside the loss curves
        live.make_summary()

    with outputs.atomic_dir(Path(args.logs) / sample_run_name(training_run(Path(args.lora)))
                            ) as tmp:
        writer = SummaryWriter(str(tmp))
        writer.add_image("samples/grid", np.asarray(grid), 0, dataformats="HWC")
        writer.close()
    # a family with its own sampler (Flux: flow-matching Euler) names it
    sampler = p.scheduler if family.uses_sample_scheduler else type(pipe.scheduler).__name__
    print(f"sample: {len(images)} base/LoRA pairs for {len(p.prompts)} prompts "
          f"({sampler}, {p.steps} steps, guidance {p.guidance_scale:g}, LoRA scale "
          f"{p.lora_scale:g}) in {seconds:.1f} s -> {args.out}/grid.png")
    return 0

