"""preprocess, LLM task: the usable examples in their canonical form (chat messages or
text), for encode to tokenize with the base model's tokenizer and chat template."""

from __future__ import annotations

from lorapipe.core.errors import LorapipeError


def run(params, args) -> int:
    from lorapipe.llm.data import read_usable, write_processed

    examples = read_usable(args.usable)
    if not examples:
        raise LorapipeError(f"{args.usable} lists no usable examples")
    write_processed(examples, args.out)
    chats = sum(e.messages is not None for e in examples)
    print(f"preprocess: {len(examples)} examples ({chats} chat, {len(examples) - chats} "
          f"text) -> {args.out}/data.jsonl")
    return 0
