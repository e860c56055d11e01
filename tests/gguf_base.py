"""A GGUF of a tiny builtin base, for llama.cpp to apply lorapipe's adapter GGUF to.

llama.cpp's own convert_hf_to_gguf.py is not a package (it lives in llama.cpp's source tree),
so the tests write the base here with the gguf library, as that converter writes a Qwen2 or
Llama model: its hyperparameter keys, a byte-level BPE vocabulary, the tensors by gguf's
name map, and for Llama the q/k rows in llama.cpp's interleaved rotary order (written out
below from the layout, not with lorapipe's own permutation, so a wrong one shows).
"""

from __future__ import annotations

from pathlib import Path

ARCH = {"qwen2": ("QWEN2", "qwen2"), "llama": ("LLAMA", "llama-bpe")}


def interleave_rotary(rows, heads: int):
    """Each head's rows reordered from transformers' halves (x0..x{d/2-1}, y0..) to llama.cpp's
    pairs (x0, y0, x1, y1, ...)."""
    import torch

    d = rows.shape[0] // heads
    order = [h * d + half * (d // 2) + i for h in range(heads) for i in range(d // 2)
             for half in (0, 1)]
    return rows[torch.tensor(order)]


def write_base(model, tokenizer, path: Path) -> Path:
    import gguf
    import numpy as np

    config = model.config
    arch_name, pre = ARCH[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) for m in tokenizer.backend_tokenizer.model.get_merges()]
                            if hasattr(tokenizer.backend_tokenizer.model, "get_merges") else
                            _merges(tokenizer))
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if config.model_type == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = interleave_rotary(tensor, heads if "q_proj" in key else kv_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        writer.add_tensor(name, tensor.float().contiguous().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _merges(tokenizer) -> list[str]:
    import json

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
