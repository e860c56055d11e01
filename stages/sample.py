"""sample: images from the trained LoRA beside the base model's, and a grid of them
(task_type llm: answers to sample.prompts, base beside LoRA).

    python -m stages.sample --lora models/lora --out samples --logs logs/sample
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorapipe import threads
from lorapipe.cli import run_stage
from lorapipe.errors import LorapipeError
from lorapipe.params import load_params


def sample_llm(params, args) -> int:
    """task_type llm: each of sample.prompts answered by the base and by the LoRA (loaded
    with PeftModel.from_pretrained, as users load it), greedily and sampled; samples.md
    (side by side), samples.json, and TensorBoard's text tab."""
    import torch
    from peft import PeftModel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from lorapipe import outputs
    from lorapipe.llm.adapter import ADAPTER_FILE, scale_lora, training_run
    from lorapipe.llm.models import load_llm
    from lorapipe.llm.sampling import GenerationSettings, base_and_lora, to_markdown
    from lorapipe.tracking import sample_run_name

    if not (Path(args.lora) / ADAPTER_FILE).exists():
        raise LorapipeError(f"{args.lora} holds no {ADAPTER_FILE}; run the train stage first")
    if not torch.cuda.is_available():
        torch.set_num_threads(threads.share(0)[0])
    model, tokenizer = load_llm(params.model.base)
    model = PeftModel.from_pretrained(model, args.lora)
    scale_lora(model, params.sample.lora_scale)
    settings = GenerationSettings.from_params(params.llm, params.sample.seed)
    with tqdm(total=len(params.sample.prompts) * 2 * len(settings.modes), desc="sample",
              unit="answer") as bar:
        rows = base_and_lora(model, tokenizer, params.sample.prompts, settings, progress=bar)
    markdown = to_markdown(rows, settings, f"base beside LoRA: {params.model.base}")
    with outputs.atomic_dir(args.out) as tmp:
        (tmp / "samples.md").write_text(markdown, encoding="utf-8")
        (tmp / "samples.json").write_text(json.dumps(
            {"settings": vars(settings) | {"modes": settings.modes}, "samples": rows},
            indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with outputs.atomic_dir(Path(args.logs) / sample_run_name(training_run(Path(args.lora)))
                            ) as tmp:
        writer = SummaryWriter(str(tmp))
        writer.add_text("samples", markdown, 0)
        writer.close()
    print(f"sample: {len(rows)} prompts answered by base and LoRA ({', '.join(settings.modes)}, "
          f"{settings.max_new_tokens} new tokens) -> {args.out}/samples.md")
    return 0


def main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sample", description=__doc__)
    parser.add_argument("--lora", required=True, help="folder with the trained LoRA")
    parser.add_argument("--out", required=True, help="folder for the images and grid.png")
    parser.add_argument("--logs", required=True, help="TensorBoard folder for the grid")
    args = parser.parse_args(argv)
    params = load_params()  # checked before the heavy imports below
    p = params.sample
    threads.register()  # shares the CPU with the other lorapipe runs (lorapipe.threads)
    if params.task_type == "llm":
        return sample_llm(params, args)

    import numpy as np
    import torch
    from diffusers.utils import logging as diffusers_logging
    from dvclive import Live
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from lorapipe import outputs
    from lorapipe.lora import DIFFUSERS_FILE, training_run
    from lorapipe.models import load_pipeline
    from lorapipe.sampling import SampleSettings, make_scheduler, sample_grid, seeds_for
    from lorapipe.tracking import sample_run_name

    if not (Path(args.lora) / DIFFUSERS_FILE).exists():
        raise LorapipeError(f"{args.lora} holds no {DIFFUSERS_FILE}; run the train stage first")
    if not torch.cuda.is_available():
        # always automatic here: sample.* has no thread key, and images are not compared
        # across machines byte for byte the way the trained LoRA is
        torch.set_num_threads(threads.share(0)[0])
    diffusers_logging.set_verbosity_error()  # its "no text-encoder LoRA keys" note is noise
    pipe = load_pipeline(params.model.base, params.model.config)
    pipe.scheduler = make_scheduler(p.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(args.lora)  # exactly as a user loads it
    settings = SampleSettings(p.steps, p.guidance_scale, p.negative_prompt, p.width, p.height,
                              p.lora_scale)
    seeds = seeds_for(p.seed, p.images_per_prompt)

    start = time.perf_counter()
    with tqdm(total=len(p.prompts) * len(seeds), desc="sample", unit="pair") as bar:
        grid, images = sample_grid(pipe, p.prompts, seeds, settings, progress=bar)
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
    print(f"sample: {len(images)} base/LoRA pairs for {len(p.prompts)} prompts "
          f"({p.scheduler}, {p.steps} steps, guidance {p.guidance_scale:g}, LoRA scale "
          f"{p.lora_scale:g}) in {seconds:.1f} s -> {args.out}/grid.png")
    return 0


if __name__ == "__main__":
    run_stage("sample", main, warm_start=True)
