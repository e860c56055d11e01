"""llm.export_gguf: the adapter as a llama.cpp LoRA GGUF, read back with gguf's reader and
checked against llama.cpp's names for the real Qwen2.5-0.5B and Llama-3.2-1B architectures
(built on the meta device), its refusals, and, where llama-cpp-python is installed, applied
by llama.cpp itself to a GGUF of the base: the logits move as peft's do."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import LLM, LLM_EXAMPLE, llm_encoded, make_params, train_in

# llama.cpp's names for a decoder layer's Linears (its llama-arch.cpp LLM_TENSOR_NAMES),
# written out here rather than taken from gguf's map, which the export uses
LLAMA_CPP = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
KINDS = ["f16", "bf16", "f32"]

# meta-llama/Llama-3.2-1B-Instruct's config.json (its shape keys)
LLAMA_3_2_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 64, "max_position_embeddings": 131072, "tie_word_embeddings": True,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """30 steps of all-linear LoRA with every GGUF type, on the Qwen2-shaped tiny-llm and on
    the Llama 3 tiny builtin (whose q/k rows llama.cpp permutes), rsLoRA on the second."""
    out = {}
    for base, extra in (("builtin:tiny-llm", {}), ("builtin:tiny-llama3", {"lora__rslora": True,
                                                                           "lora__rank": 8})):
        root = tmp_path_factory.mktemp(base.split("-", 1)[1])
        cache = llm_encoded(LLM_EXAMPLE, root / "cache", base=base)
        result = train_in(root, cache, **{**LLM, "model__base": base}, train__max_steps=30,
                          lora__targets="all-linear", llm__export_gguf=KINDS, **extra)
        out[base] = root, result
    return out


def read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values()}
    return fields, {t.name: t for t in reader.tensors}


def test_a_run_writes_each_gguf_type_with_llama_cpps_adapter_keys(runs):
    for base, (root, result) in runs.items():
        config = json.loads((root / "lora/adapter_config.json").read_text())
        layers = result.models["model"].config.num_hidden_layers
        want = {f"blk.{i}.{name}.weight.lora_{ab}" for i in range(layers)
                for name in LLAMA_CPP.values() for ab in "ab"}
        for kind, qtype in zip(KINDS, ("F16", "BF16", "F32"), strict=True):
            fields, tensors = read(root / f"lora/adapter-{kind}.gguf")
            assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
            assert fields["general.architecture"] == ("qwen2" if base == "builtin:tiny-llm"
                                                      else "llama")
            assert fields["adapter.lora.alpha"] == pytest.approx(config["lora_alpha"])
            assert set(tensors) == want
            assert {t.tensor_type.name for t in tensors.values()} == {qtype}
        # the compatibility report names the files (and the end-of-train check finds them)
        from lorapipe.llm import compat

        saved = compat.from_files(root / "lora", compat.LlmAdapter("lora", 4, False, "default"))
        assert saved.gguf == ("f16", "bf16", "f32")
        row = next(r for r in compat.rows(saved) if r.client == "llama.cpp/Ollama")
        assert row.status == "ok" and "models/lora/adapter-f16.gguf" in row.reason
        # rsLoRA: the scale llama.cpp applies (alpha / rank) is the trained alpha / sqrt(rank)
        lora = result.models["model"].peft_config["default"]
        if lora.use_rslora:
            assert fields["adapter.lora.alpha"] / lora.r == pytest.approx(
                lora.lora_alpha / math.sqrt(lora.r))


def real_adapter(tmp_path, config: dict, model_cls, config_cls, rank: int, rslora: bool):
    """A peft adapter folder with the real architecture's LoRA keys and shapes (the model
    built on the meta device, the tensors random), as lorapipe saves one."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    with torch.device("meta"):
        model = get_peft_model(model_cls(config_cls(**config)), LoraConfig(
            r=rank, lora_alpha=rank, target_modules="all-linear", use_rslora=rslora,
            task_type="CAUSAL_LM"))
    state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
             for i, (k, v) in enumerate(sorted(get_peft_model_state_dict(model).items()))}
    folder = tmp_path / model_cls.__name__
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    from lorapipe.llm.adapter import bake_rslora

    saved = bake_rslora({**model.peft_config["default"].to_dict(),
                         "target_modules": sorted(model.peft_config["default"].target_modules)})
    (folder / "adapter_config.json").write_text(json.dumps(saved, default=str))
    return folder, state


@pytest.mark.parametrize("arch", ["qwen2.5-0.5b", "llama-3.2-1b"])
def test_the_gguf_names_and_shapes_are_llama_cpps_for_the_real_architecture(tmp_path, arch):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lorapipe.llm import gguf_export
    from lorapipe.llm.models import QWEN2_5_0_5B

    config, model_cls, config_cls = {
        "qwen2.5-0.5b": (QWEN2_5_0_5B, Qwen2ForCausalLM, Qwen2Config),
        "llama-3.2-1b": (LLAMA_3_2_1B, LlamaForCausalLM, LlamaConfig)}[arch]
    folder, state = real_adapter(tmp_path, config, model_cls, config_cls, 16, rslora=True)
    base_config = config_cls(**config).to_dict()
    gguf_export.write(folder, base_config, ["f32"], "test")
    fields, tensors = read(folder / "adapter-f32.gguf")
    assert fields["general.architecture"] == ("qwen2" if arch.startswith("qwen") else "llama")
    assert fields["adapter.lora.alpha"] == pytest.approx(16 * math.sqrt(16))  # rsLoRA baked
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    dims = {"attn_q": (hidden, hidden), "attn_k": (hidden, kv), "attn_v": (hidden, kv),
            "attn_output": (hidden, hidden), "ffn_gate": (hidden, inter),
            "ffn_up": (hidden, inter), "ffn_down": (inter, hidden)}
    assert len(tensors) == config["num_hidden_layers"] * 7 * 2
    for i in range(config["num_hidden_layers"]):
        for module, name in LLAMA_CPP.items():
            d_in, d_out = dims[name]
            a = tensors[f"blk.{i}.{name}.weight.lora_a"]
            b = tensors[f"blk.{i}.{name}.weight.lora_b"]
            # gguf's reader gives ggml's order (innermost first): lora_a is rank x in in
            # torch, [in, rank] here; llama.cpp's loader checks exactly these
            assert list(a.shape) == [d_in, 16] and list(b.shape) == [16, d_out]
            kind = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) \
                else "mlp"
            peft_b = state[f"base_model.model.model.layers.{i}.{kind}.{module}.lora_B.weight"]
            got_b = torch.from_numpy(b.data.copy()).reshape(d_out, 16)
            if arch.startswith("llama") and module in ("q_proj", "k_proj"):
                # Llama: B's rows in llama.cpp's rotary order, head by head
                from gguf_base import interleave_rotary

                heads = config["num_attention_heads"] if module == "q_proj" \
                    else config["num_key_value_heads"]
                peft_b = interleave_rotary(peft_b, heads)
            torch.testing.assert_close(got_b, peft_b, rtol=0, atol=0)


def test_what_llama_cpp_cannot_load_is_refused_before_training(tmp_path, llm_cache):
    from lorapipe.core.errors import LorapipeError
    from lorapipe.core.params import ParamsError
    from lorapipe.llm import gguf_export

    with pytest.raises(ParamsError, match="llm.export_gguf: llama.cpp loads LoRA adapters "
                                          "only, not lora.method dora"):
        make_params(tmp_path, **LLM, lora__method="dora", llm__export_gguf=True)
    with pytest.raises(ParamsError, match="must be a list of f16, bf16, f32, got 'q4'"):
        make_params(tmp_path, **LLM, llm__export_gguf=["f16", "q4"])
    # the tiny base ties its embeddings, as Qwen2.5-0.5B and Llama 3.2 do
    with pytest.raises(LorapipeError, match="ties its input and output embeddings .* leave "
                                            "lm_head out of lora.targets"):
        train_in(tmp_path, llm_cache, **LLM, lora__targets=["q_proj", "lm_head"],
                 llm__export_gguf=True)
    assert not (tmp_path / "lora").exists()
    base = {"model_type": "qwen2", "tie_word_embeddings": True}
    assert "bias" in gguf_export.refusal({"peft_type": "LORA", "bias": "all"}, base)
    assert "modules_to_save" in gguf_export.refusal(
        {"peft_type": "LORA", "modules_to_save": ["score"]}, base)
    assert "not 'gpt2'" in gguf_export.refusal({"peft_type": "LORA"}, {"model_type": "gpt2"})
    assert gguf_export.refusal({"peft_type": "LORA", "target_modules": ["q_proj"]}, base) is None


def test_llama_cpp_applies_the_adapter_as_peft_does(runs, tmp_path):
    """llama.cpp itself (llama-cpp-python) on a GGUF of the base, with and without each
    adapter GGUF: its logits equal transformers' for the base and peft's with the adapter."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import numpy as np
    from gguf_base import write_base
    from peft import PeftModel

    from lorapipe.llm.models import load_llm

    for base, (root, _) in runs.items():
        model, tokenizer = load_llm(base)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is snow?"}],
                                            add_generation_prompt=True, tokenize=False)
        ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hf_base = model(torch.tensor([ids])).logits[0].numpy()
            hf_lora = PeftModel.from_pretrained(model, str(root / "lora")).eval()(
                torch.tensor([ids])).logits[0].numpy()
        gguf_base = write_base(load_llm(base)[0], tokenizer, tmp_path / f"{base[8:]}.gguf")

        def logits(gguf_base=gguf_base, ids=ids, **kw):
            llm = llama_cpp.Llama(model_path=str(gguf_base), n_ctx=128, logits_all=True,
                                  verbose=False, n_threads=2, **kw)
            llm.eval(ids)
            return np.array(llm.scores[:len(ids)])

        cpp_base = logits()
        np.testing.assert_allclose(cpp_base, hf_base, atol=2e-3, rtol=0)
        assert np.abs(hf_lora - hf_base).max() > 1.0  # the LoRA moves the logits
        for kind, atol in (("f32", 2e-3), ("f16", 1e-2), ("bf16", 5e-2)):
            cpp_lora = logits(lora_path=str(root / f"lora/adapter-{kind}.gguf"))
            np.testing.assert_allclose(cpp_lora, hf_lora, atol=atol, rtol=0)
