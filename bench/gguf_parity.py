"""lorapipe's adapter GGUF against llama.cpp's own tools, for every tiny LLM builtin.

    python bench/gguf_parity.py --llama-cpp <a llama.cpp source tree>

Needs a llama.cpp checkout (its convert_lora_to_gguf.py, convert_hf_to_gguf.py, conversion/
and gguf-py/; llama-cpp-python's sdist holds one under vendor/llama.cpp) and, for the second
check, llama-cpp-python installed. Per builtin (Qwen2, Llama 3, Qwen3, Gemma 3, Mistral):

1. a 30-step all-linear LoRA through lorapipe's train loop with llm.export_gguf f16, bf16,
   f32; llama.cpp's convert_lora_to_gguf.py run on the same peft folder; every tensor
   compared (name, type, shape, bytes) and the metadata keys listed where they differ;
2. the base converted by convert_hf_to_gguf.py (its BPE pre-tokenizer check told the scheme:
   the tiny vocabularies hash to nothing it knows) and llama.cpp run on it with and without
   lorapipe's adapter GGUF, its logits against transformers' and peft's on the same tokens.

Prints what it finds and writes bench/results/gguf_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import llm_runs  # noqa: E402
import report  # noqa: E402

REPO = HERE.parent
# each builtin's llama.cpp pre-tokenizer scheme (tokenizer.ggml.pre)
BUILTINS = {"builtin:tiny-llm": "qwen2", "builtin:tiny-llama3": "llama-bpe",
            "builtin:tiny-qwen3": "qwen2", "builtin:tiny-gemma3": "default",
            "builtin:tiny-mistral": "default"}
KINDS = ("f32", "f16", "bf16")

def convert_base(llama_cpp: Path, folder: Path, pre: str, out: Path) -> None:
    """convert_hf_to_gguf.py in a child Python, its pre-tokenizer check answered."""
    script = (f"import runpy, sys\nsys.path[:0] = [{str(llama_cpp / 'gguf-py')!r}, "
              f"{str(llama_cpp)!r}]\nimport conversion.base as base\n"
              f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}\n"
              "def no_spm(self):\n    raise FileNotFoundError('no tokenizer.model')\n"
              "base.TextModel._create_vocab_sentencepiece = no_spm\n"
              f"sys.argv = [{str(llama_cpp / 'convert_hf_to_gguf.py')!r}, {str(folder)!r}, "
              f"'--outtype', 'f32', '--outfile', {str(out)!r}]\n"
              f"runpy.run_path({str(llama_cpp / 'convert_hf_to_gguf.py')!r}, "
              "run_name='__main__')\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def tensors_and_fields(path: Path):
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values()
              if not f.name.startswith("GGUF.")}
    return {t.name: (t.tensor_type.name, list(t.shape), np.asarray(t.data).tobytes())
            for t in reader.tensors}, fields


def one(base: str, pre: str, llama_cpp: Path, work: Path) -> dict:
    import numpy as np
    import torch
    from peft import PeftModel

    from lorapipe.llm.models import load_llm

    root = work / base.split(":")[1]
    llm_runs.lorapipe_run(root, REPO / "data" / "example-llm", base, train__max_steps=30,
                          train__learning_rate=3e-3, lora__targets="all-linear",
                          llm__export_gguf=list(KINDS))
    lora = root / "lora"
    model, tokenizer = load_llm(base)
    folder = root / "base"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = {"base": base}
    env = {**os.environ, "PYTHONPATH": f"{llama_cpp / 'gguf-py'}:{llama_cpp}"}
    for kind in KINDS:
        ref = root / f"converter-{kind}.gguf"
        subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), str(lora),
                        "--base", str(folder), "--outtype", kind, "--outfile", str(ref)],
                       check=True, capture_output=True, env=env)
        theirs, their_fields = tensors_and_fields(ref)
        ours, our_fields = tensors_and_fields(lora / f"adapter-{kind}.gguf")
        out[f"{kind}_tensors_identical"] = theirs == ours
        out[f"{kind}_tensors"] = len(ours)
        out[f"{kind}_fields_differing"] = {k: [their_fields.get(k), our_fields.get(k)]
                                          for k in their_fields.keys() | our_fields.keys()
                                          if their_fields.get(k) != our_fields.get(k)}
    try:
        from llama_cpp import Llama
    except ImportError:
        return {**out, "llama_cpp": "not installed"}
    convert_base(llama_cpp, folder, pre, root / "base-f32.gguf")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is snow?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hf_base = model(torch.tensor([ids])).logits[0].numpy()
        hf_lora = PeftModel.from_pretrained(model, str(lora)).eval()(
            torch.tensor([ids])).logits[0].numpy()

    def logits(**kw):
        llm = Llama(model_path=str(root / "base-f32.gguf"), n_ctx=128, logits_all=True,
                    verbose=False, n_threads=2, **kw)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    cpp_base = logits()
    out["base_max_abs_diff"] = float(np.abs(cpp_base - hf_base).max())
    out["lora_change_max"] = float(np.abs(hf_lora - hf_base).max())
    for kind in KINDS:
        cpp_lora = logits(lora_path=str(lora / f"adapter-{kind}.gguf"))
        out[f"{kind}_lora_max_abs_diff"] = float(np.abs(cpp_lora - hf_lora).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp", required=True, type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorapipe-gguf-parity-"))
    rows = [one(base, pre, args.llama_cpp.resolve(), work) for base, pre in BUILTINS.items()]
    for row in rows:
        print(json.dumps(row))
    report.write(HERE / "results" / "gguf_parity.json", {"runs": rows})


if __name__ == "__main__":
    main()
