"""The tiny chat builtins: one per chat family users tune, each the real architecture class
at tiny widths (seeded, built from code) with a tokenizer that behaves as the real one does
where the loss mask depends on it: the same kind of tokenizer (byte-level BPE for Llama 3,
Qwen3 and SmolLM2; SentencePiece-style BPE with byte fallback for Gemma 3 and Mistral), the
same special tokens, the same BOS rule, and the real model's chat template, verbatim
(lorapipe.llm.chat_templates).

builtin:tiny-llm (Qwen2.5's architecture and ChatML) is lorapipe.llm.models' own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lorapipe.llm import chat_templates

SEED = 0
EMBED_STD = 0.2  # as builtin:tiny-llm's (lorapipe.llm.models.TINY_EMBED_STD: why wide)
SPACE = "\u2581"  # SentencePiece's word boundary

# Words every builtin tokenizer (builtin:tiny-llm's too) knows whole (anything else falls back
# to bytes): the example set's vocabulary and the words most instructions are made of.
TINY_WORDS = """
the a an of to and in is it you that for on with as are be this was have or at by from
not what which when how why who where can will do does your my me i we they he she there
answer question reply user assistant system please give write tell say list name make
colour color shape word words letter letters number numbers count sentence short long
red blue green yellow purple orange pink black white grey brown
circle square triangle star heart moon sun cat dog fish bird tree house car
one two three four five six seven eight nine ten zero plus minus times equals
first last next before after reverse upper lower case opposite big small hot cold
yes no true false ok sure done
""".split()


@dataclass(frozen=True)
class TinyChat:
    """One builtin: its tokenizer's special tokens and rules, and its model's class."""

    name: str
    family: str  # lorapipe.llm.chat family name
    specials: tuple[str, ...]  # in id order, first in the vocabulary
    bos: str | None  # added at the start when a text is tokenized (None: no BOS)
    eos: str  # the tokenizer's eos_token
    pad: str
    template: str
    stops: tuple[str, ...]  # generation stops at any of these
    byte_level: bool  # byte-level BPE; else SentencePiece-style with byte fallback
    prefix_space: bool = False  # SentencePiece's "prepend ▁" (Llama 2 / Mistral)
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    build: Callable[[dict], torch.nn.Module] | None = None


def _byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(byte_chars)}
    space = bytes_to_unicode()[ord(" ")]
    return vocab, _merge_words(vocab, [space + w for w in _forms()] + _forms())


def _sentencepiece_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for char in [SPACE] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(char, len(vocab))
    return vocab, _merge_words(vocab, [SPACE + w for w in _forms()] + _forms())


def _forms() -> list[str]:
    return [f for w in TINY_WORDS for f in (w, w.capitalize())]


def _merge_words(vocab: dict[str, int], words: list[str]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for form in words:
        merged = form[0]
        vocab.setdefault(merged, len(vocab))
        for char in form[1:]:
            vocab.setdefault(char, len(vocab))
            if (merged, char) not in merges:
                merges.append((merged, char))
            merged += char
            vocab.setdefault(merged, len(vocab))
    return merges


def tokenizer(spec: TinyChat) -> PreTrainedTokenizerFast:
    vocab, merges = _byte_level_vocab() if spec.byte_level else _sentencepiece_vocab()
    # the special tokens first, as the real vocabularies number them
    ids = {s: i for i, s in enumerate(spec.specials)}
    vocab = {**ids, **{t: i + len(ids) for t, i in vocab.items() if t not in ids}}
    for token in spec.added:
        vocab[token] = len(vocab)
    if spec.byte_level:
        bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
    else:
        bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                   unk_token="<unk>" if "<unk>" in ids else None))
        if spec.prefix_space:  # Llama 2 / Mistral: a "▁" before the first word
            bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE,
                                                         prepend_scheme="first", split=False)
        else:  # Gemma: spaces become "▁", nothing prepended
            bpe.normalizer = normalizers.Replace(" ", SPACE)
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if spec.prefix_space:
            steps.append(decoders.Strip(" ", 1, 0))
        bpe.decoder = decoders.Sequence(steps)
    if spec.bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, vocab[spec.bos])])
    out = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        unk_token="<unk>" if "<unk>" in ids else None,
        additional_special_tokens=[s for s in spec.specials
                                   if s not in (spec.bos, spec.eos, spec.pad, "<unk>")],
        model_max_length=512)
    if spec.added:
        out.add_tokens(list(spec.added))
    out.chat_template = spec.template
    return out


# the tiny widths of every builtin (builtin:tiny-llm's): 2 layers, 4 query heads sharing 2
# key/value heads, 16 per head
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def _llama(ids: dict, tie: bool, rope_theta: float) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**SHAPE, **ids, tie_word_embeddings=tie,
                                        rope_theta=rope_theta, rms_norm_eps=1e-5))


BUILTINS = {spec.name: spec for spec in (
    TinyChat("builtin:tiny-llama3", "Llama 3",
             ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
             bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
             template=chat_templates.LLAMA_3_2, stops=("<|eot_id|>", "<|end_of_text|>"),
             byte_level=True, build=lambda ids: _llama(ids, True, 500000.0)),
    TinyChat("builtin:tiny-qwen3", "Qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
             bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=chat_templates.QWEN3,
             stops=("<|im_end|>", "<|endoftext|>"), byte_level=True,
             added=("<think>", "</think>"),
             build=lambda ids: Qwen3ForCausalLM(Qwen3Config(
                 **SHAPE, **ids, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6))),
    TinyChat("builtin:tiny-gemma3", "Gemma 3",
             ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
             bos="<bos>", eos="<eos>", pad="<pad>", template=chat_templates.GEMMA_3,
             stops=("<eos>", "<end_of_turn>"), byte_level=False,
             build=lambda ids: Gemma3ForCausalLM(Gemma3TextConfig(
                 **SHAPE, **ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                 layer_types=["sliding_attention", "sliding_attention"],
                 tie_word_embeddings=True))),
    TinyChat("builtin:tiny-mistral", "Mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
             bos="<s>", eos="</s>", pad="</s>", template=chat_templates.MISTRAL_V0_3,
             stops=("</s>",), byte_level=False, prefix_space=True,
             build=lambda ids: MistralForCausalLM(MistralConfig(
                 **SHAPE, **ids, tie_word_embeddings=False, sliding_window=None,
                 rope_theta=1000000.0))),
    TinyChat("builtin:tiny-smollm2", "SmolLM2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
             bos=None, eos="<|im_end|>", pad="<|im_end|>", template=chat_templates.SMOLLM2,
             stops=("<|im_end|>",), byte_level=True,
             build=lambda ids: _llama(ids, True, 100000.0)),
)}


def build(name: str):
    """(model, tokenizer) of a tiny chat builtin; seeded: the same weights every time."""
    spec = BUILTINS[name]
    tok = tokenizer(spec)
    stops = [tok.convert_tokens_to_ids(s) for s in spec.stops]
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
           "eos_token_id": stops[0] if len(stops) == 1 else stops,
           "bos_token_id": tok.bos_token_id}
    torch.manual_seed(SEED)
    model = spec.build(ids)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, EMBED_STD)
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0.0, EMBED_STD)
    model.generation_config.eos_token_id = ids["eos_token_id"]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model.eval(), tok
