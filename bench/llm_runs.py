"""What the LLM training benches share: a Qwen2.5-0.5B-shaped base folder (random weights,
fewer layers; nothing downloaded), a set of short real-looking chats, and one lorapipe
training run through its own loop (as `dvc repro`'s train stage runs it), in this process."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def base_folder(folder: Path, layers: int) -> Path:
    """Qwen2.5-0.5B-Instruct's widths and vocabulary with `layers` of its 24 decoder layers,
    seeded, saved as a Hugging Face folder with the builtin tokenizer (whose words are whole
    tokens, about as many per sentence as Qwen's own)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lorapipe.llm.models import QWEN2_5_0_5B, tiny_tokenizer

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = Qwen2Config(**{**QWEN2_5_0_5B, "num_hidden_layers": layers},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


THINGS = {"sun": "yellow", "snow": "white", "coal": "black", "sky": "blue", "grass": "green",
          "moon": "grey", "fish": "orange", "heart": "red", "tree": "green", "cat": "black"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def short_chats(folder: Path, n: int, seed: int = 0, max_turns: int = 2) -> Path:
    """data.jsonl of `n` short chats, one or two turns (at most `max_turns`), some with a
    system message: the length spread of everyday instruction data (a few to a few dozen
    tokens per turn)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "Give a short answer."})
        for _ in range(min(rng.choice((1, 1, 2)), max_turns)):
            if rng.random() < 0.5:
                thing = rng.choice(list(THINGS))
                q, a = f"What colour is the {thing}?", f"The {thing} is {THINGS[thing]}."
                if rng.random() < 0.4:
                    a += " " + " ".join(f"It is {THINGS[t]} like the {t}." for t in
                                        rng.sample(list(THINGS), rng.randint(1, 4)))
            else:
                x, y = rng.randrange(5), rng.randrange(5)
                q = f"What is {NUMBERS[x]} plus {NUMBERS[y]}?"
                a = f"{NUMBERS[x]} plus {NUMBERS[y]} equals {NUMBERS[x + y]}."
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        lines.append(json.dumps({"messages": messages}))
    (folder / "data.jsonl").write_text("\n".join(sorted(set(lines))) + "\n")
    return folder


def lorapipe_run(root: Path, data_dir: Path, base: str, **overrides) -> dict:
    """Validate's reader, encode's tokenizing and the train stage's loop on `data_dir`, with
    params.yaml's values and these {"section__key": value} overrides; the run's summary and
    timing."""
    from lorapipe.core.training import Paths, run
    from lorapipe.llm.data import encode_examples, read_examples, save_token_cache
    from lorapipe.llm.models import load_tokenizer
    from lorapipe.tasks import load_params, stage

    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    settings = {"task_type": "llm", "model__base": base, "data__dir": str(data_dir),
                "train__checkpoint_every": 0, "train__sample_every": 0, **overrides}
    for dotted, value in settings.items():
        *path, key = dotted.split("__")
        node = params
        for part in path:
            node = node[part]
        node[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    p = load_params(root / "params.yaml")
    examples, _, _ = read_examples(data_dir)
    cache = root / "cache"
    tokens = encode_examples(examples, load_tokenizer(base), p.llm, base)
    save_token_cache(tokens, cache)
    result = run(p, Paths(cache, root / "lora", root / "dvclive", root / "logs", root / "ckpt",
                          None, root / "examples.csv"), stage(p, "train").recipe_class())
    trained = [int(tokens.example(i)[1][1:].sum()) for i in range(len(tokens))]
    return {"summary": result.summary, "timing": result.timing,
            "trained_tokens_per_example": sum(trained) / len(trained)}
