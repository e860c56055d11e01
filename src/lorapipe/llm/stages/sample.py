"""sample, LLM task: each of sample.prompts answered by the base and by the LoRA (loaded with
PeftModel.from_pretrained, as users load it), greedily and sampled; samples.md (side by
side), samples.json, the table drawn for `dvc plots` (samples/dvclive), and TensorBoard's
text tab."""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.core import threads
from lorapipe.core.errors import LorapipeError


def run(params, args) -> int:
    import torch
    from dvclive import Live
    from peft import PeftModel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from lorapipe.core import outputs, quantize
    from lorapipe.core.tracking import sample_run_name
    from lorapipe.llm.adapter import ADAPTER_FILE, scale_lora, training_run
    from lorapipe.llm.models import KEEP, load_llm
    from lorapipe.llm.sampling import GenerationSettings, base_and_lora, to_image, to_markdown

    if not (Path(args.lora) / ADAPTER_FILE).exists():
        raise LorapipeError(f"{args.lora} holds no {ADAPTER_FILE}; run the train stage first")
    if not torch.cuda.is_available():
        torch.set_num_threads(threads.share(0)[0])
    model, tokenizer = load_llm(params.model.base)
    # model.quantize as the training ran it: bitsandbytes' layers before the LoRA, fp8 after
    quantize.before_adapter(model, params.model.quantize, torch.float32, KEEP)
    model = PeftModel.from_pretrained(model, args.lora)
    quantize.after_adapter(model, params.model.quantize, torch.float32, KEEP)
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
        # the answers as a picture, for `dvc plots show` and `dvc plots diff` (dvc.yaml plots)
        live = Live(str(tmp / "dvclive"), dvcyaml=False, save_dvc_exp=False)
        live.log_image("samples.png", to_image(rows, settings, f"base beside LoRA: "
                                                             f"{params.model.base}"))
        live.make_summary()
    with outputs.atomic_dir(Path(args.logs) / sample_run_name(training_run(Path(args.lora)))
                            ) as tmp:
        writer = SummaryWriter(str(tmp))
        writer.add_text("samples", markdown, 0)
        writer.close()
    print(f"sample: {len(rows)} prompts answered by base and LoRA ({', '.join(settings.modes)}, "
          f"{settings.max_new_tokens} new tokens) -> {args.out}/samples.md")
    return 0
