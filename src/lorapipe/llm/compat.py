"""Where an LLM adapter loads (lorapipe.core.compat): peft, vLLM, llama.cpp/Ollama and
transformers' merge, for lora.method, the exported rank, rsLoRA and the initialisation. Each
rule names the loader it comes from. Light (no torch): the params stage writes the report
before any heavy import; the train stage checks it against the saved adapter_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorapipe.core.compat import Row
from lorapipe.core.params import GGUF_TYPES
from lorapipe.llm import gguf_export

# vLLM's --max-lora-rank: its default and the values it accepts (vllm/config/lora.py,
# MaxLoRARanks)
VLLM_DEFAULT_RANK = 16
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LlmAdapter:
    method: str  # lora.method
    rank: int  # as exported (PiSSA/OLoRA: 2 x lora.rank)
    rslora: bool  # trained with rsLoRA (exported with its scale in lora_alpha)
    init_weights: str
    # what the saved adapter_config.json adds that some clients refuse: "bias" (a trained
    # bias), "modules_to_save" (whole modules); lorapipe sets neither, so the end-of-train
    # check would catch a peft that wrote them
    extras: tuple[str, ...] = ()
    gguf: tuple[str, ...] = ()  # the llama.cpp GGUF files' types (llm.export_gguf)


def exported_rank(rank: int, init_weights: str) -> int:
    """PiSSA and OLoRA change the base's weights; the export turns the adapter into a plain
    LoRA of twice the rank on the unchanged base (peft's path_initial_model_for_weight_
    conversion), the rank every client sees."""
    return 2 * rank if init_weights in ("pissa", "olora") else rank


def from_params(params, root: Path) -> LlmAdapter:
    lp = params.lora
    kinds = set(gguf_export.formats(params.llm.export_gguf))
    return LlmAdapter(lp.method, exported_rank(lp.rank, lp.init_weights), lp.rslora,
                      lp.init_weights, gguf=tuple(k for k in GGUF_TYPES if k in kinds))


def from_files(folder: Path, trained: LlmAdapter) -> LlmAdapter:
    """The facts the saved adapter_config.json states (how it was trained comes from
    `trained`: the file no longer says rsLoRA or PiSSA once they are baked in)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    kind = config.get("peft_type", "LORA")
    method = kind.lower() if kind in ("LOHA", "LOKR") else (
        "dora" if config.get("use_dora") else "lora")
    extras = tuple(name for name, present in (
        ("bias", config.get("bias", "none") != "none"),
        ("modules_to_save", bool(config.get("modules_to_save")))) if present)
    kinds = tuple(k for k in GGUF_TYPES
                  if (Path(folder) / gguf_export.file_name(k)).is_file())
    return LlmAdapter(method, int(config["r"]), trained.rslora and not config.get("use_rslora"),
                      trained.init_weights, extras, kinds)


def facts(a: LlmAdapter) -> list[tuple[str, str]]:
    out = [("task", "llm"), ("lora.method", a.method), ("rank as exported", str(a.rank))]
    if a.rslora:
        out.append(("rsLoRA", "trained at alpha / sqrt(rank); exported as a plain "
                              "lora_alpha = alpha * sqrt(rank)"))
    if a.init_weights != "default":
        out.append(("init", f"{a.init_weights}: exported as a LoRA of rank {a.rank} on the "
                            "unchanged base"))
    out.append(("weights", "fp32 (as trained)"))
    return out


def rows(a: LlmAdapter) -> list[Row]:
    return [_peft(a), _vllm(a), _llama_cpp(a), _merge(a)]


def _peft(a: LlmAdapter) -> Row:
    return Row("peft", "ok", f"PeftModel.from_pretrained(base, \"models/lora\") reads every "
               f"peft method ({a.method} included)")


def _vllm(a: LlmAdapter) -> Row:
    # vllm/lora/peft_helper.py PEFTHelper: reads r and lora_alpha (LoRA only), and
    # _validate_features refuses use_dora, modules_to_save and a bias
    if a.extras:
        return Row("vLLM", "no", f"the adapter has {' and '.join(a.extras)}, which "
                   "vllm/lora/peft_helper.py refuses (\"vLLM only supports modules_to_save being "
                   "None.\", \"Adapter bias is not supported.\")",
                   "train without them (lorapipe's defaults)")
    if a.method in ("loha", "lokr"):
        return Row("vLLM", "no", f"vLLM serves LoRA adapters only (vllm/lora/peft_helper.py "
                   f"reads r and lora_alpha); {a.method} has neither",
                   "lora.method lora, or llm.merge: true and serve the merged model")
    if a.method == "dora":
        return Row("vLLM", "no", "DoRA not supported (vllm/lora/peft_helper.py: \"vLLM does "
                   "not yet support DoRA.\")",
                   "use lora.method lora, or llm.merge: true and serve the merged model")
    if a.rank > VLLM_RANKS[-1]:
        return Row("vLLM", "no", f"rank {a.rank} is above vLLM's largest --max-lora-rank "
                   f"({VLLM_RANKS[-1]})", f"lora.rank {VLLM_RANKS[-1]} or less")
    if a.rank > VLLM_DEFAULT_RANK:
        flag = next(r for r in VLLM_RANKS if r >= a.rank)
        return Row("vLLM", "caveat", f"rank {a.rank} is above vLLM's default --max-lora-rank "
                   f"({VLLM_DEFAULT_RANK})", f"rank {a.rank} needs `--max-lora-rank {flag}`")
    return Row("vLLM", "ok", "--enable-lora --lora-modules name=models/lora")


def _llama_cpp(a: LlmAdapter) -> Row:
    # llama.cpp convert_lora_to_gguf.py: every tensor must be lora_A or lora_B ("Not a lora_A
    # or lora_B tensor"), and the scale comes from adapter_config.json's lora_alpha (it reads
    # no use_rslora)
    if a.method != "lora" or a.extras:
        kind = ("lora_magnitude_vector (DoRA)" if a.method == "dora" else
                f"{a.method}'s tensors" if a.method != "lora" else " and ".join(a.extras))
        return Row("llama.cpp/Ollama", "no", f"convert_lora_to_gguf.py takes lora_A/lora_B "
                   f"tensors only and stops at {kind}",
                   "lora.method lora, or llm.merge: true and convert the merged model "
                   "(convert_hf_to_gguf.py)")
    strength = (" at the trained strength (rsLoRA's scale baked into adapter.lora.alpha)"
                if a.rslora else "")
    if a.gguf:
        files = ", ".join(f"models/lora/{gguf_export.file_name(k)}" for k in a.gguf)
        return Row("llama.cpp/Ollama", "ok", f"{files} (llm.export_gguf): llama-cli / "
                   f"llama-server --lora on a GGUF of the base, Ollama's ADAPTER{strength}",
                   f"llama-cli -m <base>.gguf --lora {files.split(', ')[0]}")
    if a.rslora:
        return Row("llama.cpp/Ollama", "ok", "convert_lora_to_gguf.py ignores use_rslora; the "
                   "export bakes rsLoRA's scale into lora_alpha, so it runs at the trained "
                   "strength", "llm.export_gguf: true, or convert_lora_to_gguf.py models/lora "
                   "--base <base>")
    return Row("llama.cpp/Ollama", "ok", "convert_lora_to_gguf.py, then Ollama's ADAPTER",
               "llm.export_gguf: true writes the GGUF; or convert_lora_to_gguf.py models/lora "
               "--base <base>")


def _merge(a: LlmAdapter) -> Row:
    # peft's merge_and_unload merges every method (tuners' merge); llm.merge writes it
    return Row("transformers merge", "ok", f"peft's merge_and_unload() merges {a.method} into "
               "the base (llm.merge: true writes models/lora/merged)")
