"""The adapter as a llama.cpp LoRA GGUF (llm.export_gguf): what llama-cli/llama-server's
--lora, Ollama's ADAPTER and LM Studio load on a GGUF base.

Written with the gguf library, the package llama.cpp's own convert_lora_to_gguf.py writes
with, and as that converter writes it: general.type "adapter", adapter.type "lora",
adapter.lora.alpha, and per adapted Linear the tensors `<gguf name>.weight.lora_a` (rank x in)
and `.lora_b` (out x rank), named by gguf's tensor-name map for the base's architecture.
What that converter does on top of the map is done here too, and only that: Llama's q/k rows
are permuted as its base converter permutes the weights (llama.cpp's rotary layout), which
for W = B A permutes B's rows; token_embd's lora_a is stored transposed. The converter itself
is not a package (it lives in llama.cpp's source tree), so it cannot be called.
Light at import (the params stage's compatibility report names the files): torch, numpy and
gguf are imported where the tensors are written.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.core.errors import LorapipeError

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

# transformers' model_type -> llama.cpp's architecture (conversion/llama.py registers
# MistralForCausalLM as LLAMA; SmolLM2 is a Llama). Only those whose export was compared
# tensor for tensor with convert_lora_to_gguf.py's output: others (Phi-3's fused qkv_proj,
# Gemma 3's multimodal models) are refused with the converter to use instead.
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3",
                 "gemma3_text": "GEMMA3"}
PERMUTED = ("LLAMA",)  # LlamaModel.undo_permute


def file_name(kind: str) -> str:
    return f"adapter-{kind}.gguf"


def formats(value: bool | list[str]) -> list[str]:
    """llm.export_gguf as the list of types to write: true = f16, as llama.cpp's converter."""
    if value is True:
        return ["f16"]
    return list(dict.fromkeys(value)) if isinstance(value, list) else []


def refusal(adapter_config: dict, base_config: dict) -> str | None:
    """Why llama.cpp cannot take this adapter on this base, with what to do; None if it can.
    From convert_lora_to_gguf.py's refusals and llama.cpp's adapter loader."""
    kind = adapter_config.get("peft_type", "LORA")
    if kind != "LORA":
        return (f"llama.cpp loads LoRA adapters only (lora_a/lora_b pairs), not {kind}; use "
                "lora.method lora, or llm.merge: true and convert the merged model")
    if adapter_config.get("use_dora"):
        return ("llama.cpp has no DoRA (convert_lora_to_gguf.py stops at lora_magnitude_vector); "
                "use lora.method lora, or llm.merge: true and convert the merged model")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        return "llama.cpp's adapters hold no bias; train without one (lora.bias none)"
    if adapter_config.get("modules_to_save"):
        return ("llama.cpp's adapters hold lora_a/lora_b only, not whole modules "
                f"(modules_to_save {adapter_config['modules_to_save']})")
    model_type = base_config.get("model_type")
    if model_type not in ARCHITECTURES:
        return (f"lorapipe knows llama.cpp's tensor names for {', '.join(sorted(ARCHITECTURES))}"
                f" bases, not {model_type!r}; convert the adapter folder with llama.cpp's "
                "convert_lora_to_gguf.py --base <the base's folder>")
    targets = adapter_config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    embeddings = [t for t in targets if t.split(".")[-1] in ("embed_tokens", "lm_head")]
    if embeddings and base_config.get("tie_word_embeddings"):
        return (f"the base ties its input and output embeddings and llama.cpp ignores a LoRA "
                f"on them (convert_lora_to_gguf.py: \"lm_head is present in adapter, but is "
                f"ignored in base model\"); leave {', '.join(embeddings)} out of lora.targets")
    return None


def tensors(state: dict, base_config: dict) -> list[tuple[str, object]]:
    """(GGUF name, tensor) for every lora_A/lora_B of a peft adapter, in llama.cpp's layout."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[base_config["model_type"]])
    names = gguf.get_tensor_name_map(arch, base_config["num_hidden_layers"])
    heads = base_config["num_attention_heads"]
    kv_heads = base_config.get("num_key_value_heads") or heads
    out = []
    parts = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b",
             ".lora_embedding_A": "lora_a", ".lora_embedding_B": "lora_b"}
    for key in sorted(state):
        part = next((p for p in parts if key.endswith(p)), None)
        if part is None:
            raise LorapipeError(f"llm.export_gguf: {key} is not a lora_A or lora_B tensor, "
                                "and llama.cpp's adapters hold nothing else")
        module, gguf_part = key.removeprefix("base_model.model.").removesuffix(part), parts[part]
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise LorapipeError(f"llm.export_gguf: llama.cpp has no tensor for {module} of a "
                                f"{base_config['model_type']} base (gguf's tensor-name map)")
        tensor = state[key].float()
        if gguf_part == "lora_b" and ARCHITECTURES[base_config["model_type"]] in PERMUTED:
            if module.endswith("q_proj"):
                tensor = _permute(tensor, heads)
            elif module.endswith("k_proj"):
                tensor = _permute(tensor, kv_heads)
        if "embedding" in key:
            # peft's embedding LoRA: A is (rank x vocab), B (dim x rank); llama.cpp stores
            # token_embd's lora_a transposed (llm_build_inp_embd)
            tensor = tensor.T if gguf_part == "lora_a" else tensor
        out.append((f"{name}.{gguf_part}", tensor.contiguous()))
    return out


def _permute(rows, heads: int):
    """llama.cpp's LlamaModel.permute on a weight's output rows: each head's two rotary
    halves interleaved."""
    return (rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


def write(folder: Path, base_config: dict, kinds: list[str], name: str) -> list[Path]:
    """adapter-<kind>.gguf in `folder`, beside the peft adapter it is made from."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if problem := refusal(config, base_config):
        raise LorapipeError(f"llm.export_gguf: {problem}")
    pairs = tensors(load_file(str(folder / ADAPTER_FILE)), base_config)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH,
                                         ARCHITECTURES[base_config["model_type"]])]
    written = []
    for kind in kinds:
        qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
                 "f32": gguf.GGMLQuantizationType.F32}[kind]
        path = folder / file_name(kind)
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # the scale llama.cpp applies is alpha / rank, as peft's lora_alpha / r (rsLoRA's
        # alpha / sqrt(r) is already baked into lora_alpha: adapter.bake_rslora)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        writer.add_name(name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, tensor in pairs:
            data = tensor.numpy().astype(np.float32)
            if kind == "f16":
                writer.add_tensor(tensor_name, data.astype(np.float16))
            elif kind == "bf16":
                writer.add_tensor(tensor_name, gguf.quants.quantize(data, qtype),
                                  raw_dtype=qtype)
            else:
                writer.add_tensor(tensor_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        written.append(path)
    return written
