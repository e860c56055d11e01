"""Chat families: what lorapipe needs to know of a chat template beyond rendering it.

A family is told by its template's own markers. What it adds is the token that closes an
assistant turn: when a template does not render a conversation as a growing prefix (Qwen3
drops the thinking of earlier turns and gives only the last answer an empty thinking block),
the answers are found in the one rendering of the whole conversation, each from where its
generation prompt ends to its turn's closing token. Light: no torch, no transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFamily:
    name: str  # as messages name it
    markers: tuple[str, ...]  # all of these in the template tell it
    turn_end: str  # the token that closes an assistant turn ("eos": the tokenizer's)
    thinking: bool = False  # its template renders <think> blocks


FAMILIES = (
    ChatFamily("Llama 3", ("<|start_header_id|>", "<|eot_id|>"), "<|eot_id|>"),
    ChatFamily("Qwen3", ("<|im_start|>", "<think>"), "<|im_end|>", thinking=True),
    ChatFamily("Gemma 3", ("<start_of_turn>",), "<end_of_turn>"),
    ChatFamily("Mistral", ("[INST]",), "eos"),
    ChatFamily("SmolLM2", ("<|im_start|>", "SmolLM"), "<|im_end|>"),
    ChatFamily("ChatML (Qwen2/Qwen2.5)", ("<|im_start|>",), "<|im_end|>"),
)
UNKNOWN = ChatFamily("of no family lorapipe knows", (), "")


def family_of(template: str | None) -> ChatFamily:
    """The first family whose markers are all in the template (the list goes from the
    most specific: Qwen3 and SmolLM2 are ChatML too)."""
    for family in FAMILIES:
        if template and all(m in template for m in family.markers):
            return family
    return UNKNOWN


THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(content: str) -> str:
    """An answer without its <think>...</think> blocks (llm.thinking: strip)."""
    return THINK.sub("", content)
