"""encode, LLM task: token ids and loss masks of every example, by model.base's tokenizer and
chat template."""

from __future__ import annotations


def run(params, args) -> int:
    from lorapipe.llm.data import encode_examples, read_processed, save_token_cache
    from lorapipe.llm.models import load_tokenizer

    tokenizer = load_tokenizer(params.model.base)
    cache = encode_examples(read_processed(args.images), tokenizer, params.llm, params.model.base)
    path = save_token_cache(cache, args.out)
    lengths = (cache.offsets[1:] - cache.offsets[:-1]).tolist()
    print(f"encode: {len(cache)} examples -> {path} ({len(cache.ids)} tokens, "
          f"{int(cache.trained.sum())} trained; longest {max(lengths)} of llm.max_length "
          f"{params.llm.max_length})" + (f"; {cache.meta['truncated']} truncated"
                                         if cache.meta["truncated"] else ""))
    return 0
