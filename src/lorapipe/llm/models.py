"""LLM base models: builtin:tiny-llm (built from code), or a local Hugging Face folder.

The tiny model is Qwen2-shaped (grouped-query attention, SwiGLU MLP, RMSNorm, tied
embeddings: the architecture of Qwen2.5-0.5B-Instruct), with tiny widths and a fixed seed,
so a LoRA trained on it has the module names of the real one. Its tokenizer is a byte-level
BPE (Qwen's and GPT-2's scheme) whose merges are made here from a word list, with a ChatML
chat template (Qwen's), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lorapipe.core.errors import LorapipeError
from lorapipe.core.params import BUILTIN_PREFIX
from lorapipe.llm import tiny
from lorapipe.llm.model_files import llm_source_problem
from lorapipe.llm.tiny import TINY_WORDS

TINY_LLM = "builtin:tiny-llm"
TINY_SEED = 0
TINY_EMBED_STD = 0.2
END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2.5-0.5B-Instruct's architecture (its config.json's shape keys): the tests check the
# adapter's names against it and bench/llm_step.py times a LoRA step on it, built without
# weights
QWEN2_5_0_5B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                "max_position_embeddings": 32768, "tie_word_embeddings": True,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}

# Qwen2.5's ChatML template, without its default system message and tool calls: each
# message is <|im_start|>role\ncontent<|im_end|>\n; the generation prompt opens an
# assistant turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)



def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template."""
    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {c: i for i, c in enumerate(byte_chars)}
    merges: list[tuple[str, str]] = []
    space = bytes_to_unicode()[ord(" ")]  # "Ġ": a word after a space
    for word in TINY_WORDS:
        for form in (word, space + word, word.capitalize(), space + word.capitalize()):
            merged = form[0]
            for char in form[1:]:
                if (merged, char) not in merges:
                    merges.append((merged, char))
                merged += char
                vocab.setdefault(merged, len(vocab))
    for special in (END_OF_TEXT, IM_START, IM_END):
        vocab[special] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=IM_END, pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END], model_max_length=512)
    tokenizer.chat_template = CHATML
    return tokenizer


def build_tiny_llm() -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A Qwen2-shaped causal LM small enough to train in seconds on 2 CPU cores. Seeded:
    identical weights every time, on every machine with the same torch."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(TINY_SEED)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Real LLMs' trained embeddings give logits spanning tens; random ones at the usual
        # init (std 0.02) give logits within +-1.3 (|final norm| 8 x |row| 0.16), which caps
        # what any LoRA can learn at a loss near log(vocab). Wider rows uncap it.
        model.model.embed_tokens.weight.normal_(0.0, TINY_EMBED_STD)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_tokenizer(base: str, root: Path | None = None):
    """Only the tokenizer of model.base: what validate needs to count tokens."""
    if base == TINY_LLM:
        return tiny_tokenizer()
    if base in tiny.BUILTINS:
        return tiny.tokenizer(tiny.BUILTINS[base])
    path = _local(base, root)
    try:
        # never the folder's own code (llm_source_problem refused auto_map already)
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LorapipeError(f"model.base: cannot load the tokenizer of {base!r}: {exc}") from None


# what model.quantize leaves as it is: the output head (tied to the input embeddings in
# many models) and the embeddings, as transformers' bitsandbytes integration and QLoRA do
KEEP = (r"(^|\.)lm_head$", r"embed_tokens")


def load_llm(base: str, root: Path | None = None):
    """(model, tokenizer) of model.base, on the CPU in fp32, in eval mode."""
    if base == TINY_LLM:
        return build_tiny_llm()
    if base in tiny.BUILTINS:
        return tiny.build(base)
    path = _local(base, root)
    tokenizer = load_tokenizer(base, root)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=torch.float32,
            trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LorapipeError(f"model.base: cannot load the causal LM in {base!r}: {exc}") from None
    if tokenizer.pad_token is None:  # Llama-style tokenizers have none; padding is masked
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _local(base: str, root: Path | None) -> Path:
    if base.startswith(BUILTIN_PREFIX):
        raise LorapipeError(f"model.base: {base} is not a language model; with task_type llm "
                            f"use {TINY_LLM}, another of {', '.join(tiny.BUILTINS)} or a local "
                            "Hugging Face folder")
    path = (root or Path.cwd()) / base
    problem = llm_source_problem(path, base)
    if problem:
        raise LorapipeError(f"model.base: {problem}")
    return path
