"""task_type llm: the tiny model and its tokenizer, the data rules, the loss mask, training
through the shared loop, the adapter as peft and vLLM read it (checked against the real
Qwen2.5-0.5B architecture, built on the meta device), merging, a real overfitting run and
early stop, resume to the same bytes, and 2 processes against 1."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLM, REPO, llm_encoded, make_params, run_dirs, train_in
from lorapipe.llm import data
from lorapipe.llm.models import build_tiny_llm, tiny_tokenizer

ADAPTER = "adapter_model.safetensors"


def chat(*turns: tuple[str, str]) -> data.Example:
    return data.Example(1, [{"role": r, "content": c} for r, c in turns])


def trained_text(example: data.Example, tokenizer, **kw) -> tuple[str, str]:
    """(the trained tokens, all tokens) decoded."""
    tok = data.tokenize(example, tokenizer, kw.pop("max_length", 256),
                        kw.pop("train_on_prompt", False), kw.pop("truncate", False))
    trained = [i for i, t in zip(tok.ids, tok.trained, strict=True) if t]
    return tokenizer.decode(trained), tokenizer.decode(tok.ids)


# -- the model and the tokens ---------------------------------------------------------------
def test_tiny_llm_is_seeded_and_qwen2_shaped():
    a, tokenizer = build_tiny_llm()
    b, _ = build_tiny_llm()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))
    assert a.config.model_type == "qwen2" and a.config.tie_word_embeddings
    assert a.config.num_key_value_heads < a.config.num_attention_heads  # grouped-query
    text = "What colour is the sun? Answer: yellow."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
    assert tokenizer.decode(tokenizer("ünïcödé ✓")["input_ids"]) == "ünïcödé ✓"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # ChatML


def test_the_loss_mask_covers_the_answers_and_their_end_of_turn():
    tokenizer = tiny_tokenizer()
    example = chat(("system", "Be brief."), ("user", "What colour is snow?"),
                   ("assistant", "Answer: white."), ("user", "And coal?"),
                   ("assistant", "Answer: black."))
    trained, whole = trained_text(example, tokenizer)
    assert trained == "Answer: white.<|im_end|>\nAnswer: black.<|im_end|>\n"
    assert whole == tokenizer.apply_chat_template(example.messages, tokenize=False)
    trained, whole = trained_text(example, tokenizer, train_on_prompt=True)
    assert trained == whole
    text = data.Example(1, text="plain text is trained whole")
    assert trained_text(text, tokenizer)[0] == "plain text is trained whole<|im_end|>"
    # truncation cuts the answer's tail and keeps the prompt
    cut, _ = trained_text(chat(("user", "Hi"), ("assistant", "a b c d e f g h")), tokenizer,
                          max_length=18, truncate=True)
    assert "a b c d e f g h".startswith(cut) and 0 < len(cut) < 15


def test_a_tokenizer_without_chat_template_trains_the_response_after_the_prompt():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    trained, whole = trained_text(chat(("user", "Q?"), ("assistant", "A.")), tokenizer)
    assert (trained, whole) == ("A.<|im_end|>", "Q?\nA.<|im_end|>")
    with pytest.raises(data.DatasetError, match="no chat template"):
        data.tokenize(chat(("system", "s"), ("user", "Q"), ("assistant", "A")), tokenizer,
                      256, False, False)


# -- validate: one bad input each -----------------------------------------------------------
GOOD = '{"prompt": "What is one plus one?", "response": "Answer: two."}'
BAD_LINES = {
    "JSON_ERROR": ('{"prompt": "x", "response": "y"', r"line 2 .*not valid JSON"),
    "NOT_OBJECT": ('["a list"]', r"line 2 .*expected a JSON object, got list"),
    "MISSING_FIELD": ('{"prompt": "only a prompt"}', r"line 2 .*has \"prompt\" but no "
                                                     r"\"response\""),
    "EMPTY_FIELD": ('{"prompt": "x", "response": "  "}', r"line 2 .*\"response\" is empty"),
    "AMBIGUOUS": ('{"text": "t", "prompt": "p", "response": "r"}', r"both 'prompt' and "
                                                                    r"'text'"),
    "BAD_ROLE": ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", '
                 '"content": "a"}]}', r"messages\[1\] has role 'bot'"),
    "DUPLICATE": (GOOD, r"line 2 .*the same example as line 1"),
    "TOO_LONG": ('{"prompt": "x", "response": "' + "word " * 300 + '"}',
                 r"line 2 .*tokens, more than llm.max_length 256"),
}


def validate_stage(folder: Path, root: Path, **overrides) -> subprocess.CompletedProcess:
    make_params(root, **{**LLM, "data__dir": str(folder), **overrides})
    return subprocess.run(
        [sys.executable, "-m", "stages.validate", "--images", str(folder), "--report",
         "report.json", "--usable", "usable.csv"], cwd=root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


@pytest.mark.parametrize("code", sorted(BAD_LINES))
def test_validate_reports_each_bad_example_by_line(tmp_path, code):
    folder = tmp_path / "data"
    folder.mkdir()
    line, message = BAD_LINES[code]
    (folder / "data.jsonl").write_text(f"{GOOD}\n{line}\n{GOOD.replace('one', 'two')}\n")
    before = (folder / "data.jsonl").read_bytes()
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "error", False)
    found = [f for f in report.errors if f.code == code]
    assert len(found) == 1 and found[0].row == 2, [str(f) for f in report.findings]
    assert re.search(message, str(found[0])), str(found[0])
    assert [e.line for e in report.usable] == [1, 3]
    assert (folder / "data.jsonl").read_bytes() == before  # raw data never modified


def test_the_validate_stage_fails_on_bad_examples_and_skips_them_on_request(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "data.jsonl").write_text(f"{GOOD}\nnot json\n")
    failed = validate_stage(folder, tmp_path)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "error JSON_ERROR: line 2 data.jsonl: not valid JSON" in failed.stdout
    assert "set validate.on_error: skip" in failed.stderr
    skipped = validate_stage(folder, tmp_path, validate__on_error="skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "tokens per example min" in skipped.stdout
    usable = (tmp_path / "usable.csv").read_text().splitlines()
    assert usable[0] == "line,example" and len(usable) == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["usable"] == 1 and report["tokens"]["trained"] > 0


def test_validate_truncates_on_request_and_reads_metadata_csv(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "metadata.csv").write_text(
        'prompt,response\n"What is one plus one?","Answer: two."\n'
        f'"Tell a long one.","{"word " * 300}"\n', encoding="utf-8")
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "truncate", False)
    assert [f.code for f in report.findings] == ["TRUNCATED"]
    assert len(report.usable) == 2 and max(report.lengths) == 256
    (folder / "metadata.csv").write_text("question,answer\nq,a\n")
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "error", False)
    assert [f.code for f in report.findings] == ["CSV_HEADER"]
    (folder / "metadata.csv").unlink()
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "error", False)
    assert [f.code for f in report.findings] == ["DATA_MISSING"]
    (folder / "data.jsonl").write_bytes(GOOD.replace("one", "caf\xe9").encode("latin-1"))
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "error", False)
    [finding] = report.findings
    assert finding.code == "ENCODING" and "data.jsonl not UTF-8: byte 0xe9 on line 1" in str(
        finding)


def test_task_type_refuses_what_the_other_task_cannot_honour(tmp_path):
    from lorapipe.core.params import ParamsError

    with pytest.raises(ParamsError) as info:
        make_params(tmp_path, **{**LLM, "model__base": "builtin:tiny-sd",
                                 "lora__text_encoder": True, "lora__targets": "kohya"})
    message = str(info.value)
    assert "model.base builtin:tiny-sd is a Stable Diffusion model but task_type is llm" in message
    assert "lora.text_encoder is for task_type sd" in message
    assert "lora.targets preset kohya is not one of task_type llm's: attn, all-linear" in message
    with pytest.raises(ParamsError, match="is a language model but task_type is sd"):
        make_params(tmp_path, model__base="builtin:tiny-llm")
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ParamsError, match="holds only pickle weights"):
        make_params(tmp_path, **{**LLM, "model__base": str(folder)})


# -- training, the adapter, merging ---------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, llm_cache):
    """60 steps on the example set, with a merged copy."""
    root = tmp_path_factory.mktemp("llm_run")
    result = train_in(root, llm_cache, root / "health.md", **LLM, train__max_steps=60,
                      train__validation__every=20, train__sample_every=30, llm__merge=True)
    return root, result


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_llm_trains_and_its_adapter_reloads_exactly_in_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, result = trained
    summary = result.summary
    assert summary["model"]["family"] == "llm:qwen2"
    assert summary["loss"]["train"] < 0.5 * summary["fixed_loss_start"]  # it learned
    assert summary["health"]["status"] == "healthy"
    metrics = {p.relative_to(root / "dvclive/plots/metrics").as_posix()
               for p in (root / "dvclive/plots/metrics").rglob("*.tsv")}
    assert {"loss/current.tsv", "loss/average.tsv", "lr/lora.tsv", "loss/train/fixed.tsv",
            "loss/validation/step_average.tsv", "perplexity/validation.tsv"} <= metrics
    samples = sorted(p.name for p in (root / "dvclive/samples").iterdir())
    assert samples == ["step_000000.md", "step_000030.md", "step_000060.md"]
    assert "| greedy |" in (root / "dvclive/samples/step_000060.md").read_text()

    ids = torch.tensor([tiny_tokenizer()("<|im_start|>user\nWhat colour is snow?<|im_end|>\n"
                                         "<|im_start|>assistant\n")["input_ids"]])
    want = logits(result.models["model"], ids)
    reloaded = PeftModel.from_pretrained(build_tiny_llm()[0], str(root / "lora"))
    torch.testing.assert_close(logits(reloaded, ids), want, rtol=0, atol=1e-6)
    base = logits(build_tiny_llm()[0], ids)
    assert (want - base).abs().max() > 0.1  # the LoRA changes the answer
    from lorapipe.llm.adapter import scale_lora

    scale_lora(reloaded, 0.0)  # sample.lora_scale 0: the base model
    torch.testing.assert_close(logits(reloaded, ids), base, rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(root / "lora/merged", local_files_only=True)
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-4, atol=1e-4)
    assert (root / "lora/merged/tokenizer.json").exists()


def test_the_adapter_fits_vllm_and_the_real_qwen2_5_architecture(trained):
    """Checked against Qwen2.5-0.5B-Instruct's config, built without weights: the adapter's
    keys are the real model's, layer numbers aside; its config passes what vLLM's
    PEFTHelper requires (r within max_lora_rank's default 16, bias none, no
    modules_to_save, no DoRA) and its key names parse as vLLM's parse_fine_tuned_lora_name
    expects (base_model.model.<module>.lora_A/B.weight)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root, _ = trained
    config = json.loads((root / "lora/adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4 and config["bias"] == "none"
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # sorted
    assert config["modules_to_save"] is None and not config["use_dora"]
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "builtin:tiny-llm"
    keys = set(load_file(str(root / "lora" / ADAPTER)))
    assert all(re.fullmatch(r"base_model\.model\.model\.layers\.\d+\.self_attn\."
                            r"[qkvo]_proj\.lora_[AB]\.weight", k) for k in keys)

    from lorapipe.llm.models import QWEN2_5_0_5B

    real = Qwen2Config(**QWEN2_5_0_5B)
    with torch.device("meta"):
        model = get_peft_model(Qwen2ForCausalLM(real), LoraConfig(
            r=4, target_modules=config["target_modules"], task_type="CAUSAL_LM"))
    real_keys = set(get_peft_model_state_dict(model))

    def pattern(k):
        return re.sub(r"layers\.\d+\.", "layers.N.", k)

    assert {pattern(k) for k in keys} == {pattern(k) for k in real_keys}


def test_lora_init_continues_an_adapter_and_refuses_another_shape(tmp_path, trained,
                                                                  llm_cache):
    from lorapipe.core.errors import LorapipeError

    root, result = trained
    first = json.loads((root / "dvclive/metrics.json").read_text())["loss"]["train"]
    cont = tmp_path / "continued"
    cont.mkdir()
    out = train_in(cont, llm_cache, **LLM, train__max_steps=10, train__validation__every=10,
                   lora__init=str(root / "lora"))
    fixed = [float(line.split("\t")[1]) for line in
             (cont / "dvclive/plots/metrics/loss/train/fixed.tsv").read_text().splitlines()[1:]]
    assert fixed[0] == pytest.approx(first, rel=1e-5)  # starts where the first run ended
    assert out.summary["step"] == 10
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(LorapipeError, match="does not fit this LoRA"):
        train_in(other, llm_cache, **LLM, lora__rank=8, lora__init=str(root / "lora"))


def test_all_linear_also_trains_the_mlp(tmp_path, llm_cache):
    result = train_in(tmp_path, llm_cache, **LLM, train__max_steps=2, lora__targets="all-linear")
    names = {n for n, _ in result.models["model"].named_modules() if n.endswith("lora_A")}
    kinds = {n.split(".")[-2] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"}  # peft's all-linear: every Linear but the output head


def test_a_local_hugging_face_folder_is_a_base(tmp_path, llm_cache):
    """save_pretrained's layout (safetensors), loaded offline; the same model as the builtin,
    so the same training gives the same adapter tensors."""
    model, tokenizer = build_tiny_llm()
    folder = tmp_path / "tiny-llm-folder"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    builtin, local = run_dirs(tmp_path, "builtin", "local")
    train_in(builtin, llm_cache, **LLM, train__max_steps=5)
    cache = llm_encoded(LLM["data__dir"], tmp_path / "cache")
    from lorapipe.llm.data import load_token_cache, save_token_cache

    tokens = load_token_cache(cache)
    tokens.meta["base"] = str(folder)  # encode records the base it tokenized for
    save_token_cache(tokens, cache)
    result = train_in(local, cache, **{**LLM, "model__base": str(folder)}, train__max_steps=5)
    assert result.summary["model"]["family"] == "llm:qwen2"
    a, b = (load_file(str(root / "lora" / ADAPTER)) for root in (builtin, local))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_matches_and_bf16_keeps_the_lora_in_fp32(tmp_path, llm_cache):
    plain, checkpointed, half = run_dirs(tmp_path, "plain", "checkpointed", "half")
    steps = {**LLM, "train__max_steps": 4, "lora__targets": "all-linear"}
    train_in(plain, llm_cache, **steps)
    train_in(checkpointed, llm_cache, **steps, train__gradient_checkpointing=True)
    a, b = (load_file(str(root / "lora" / ADAPTER)) for root in (plain, checkpointed))
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-6)
    result = train_in(half, llm_cache, **steps, train__mixed_precision="bf16")
    model = result.models["model"]
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert torch.bfloat16 in {p.dtype for p in model.parameters() if not p.requires_grad}
    assert result.summary["fixed_loss_end"] < result.summary["fixed_loss_start"]


def test_nan_guard_stops_and_keeps_the_last_good_adapter(tmp_path, llm_cache):
    from lorapipe.core.training import Diverged

    with pytest.raises(Diverged) as exc:
        train_in(tmp_path, llm_cache, **{**LLM, "train__learning_rate": 1e12},
                 train__max_grad_norm=0.0, train__max_steps=30)
    assert "non-finite at step" in str(exc.value)
    metrics = json.loads((tmp_path / "dvclive/metrics.json").read_text())
    assert metrics["health"]["status"] == "diverged"
    saved = load_file(str(tmp_path / "lora" / ADAPTER))
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


def test_the_params_stage_names_what_the_task_does_not_read(tmp_path):
    make_params(tmp_path, **LLM)
    out = subprocess.run([sys.executable, "-m", "stages.params", "--params", "params.yaml",
                          "--out", "params.txt"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "task_type llm: not read: validate.min_side" in out.stdout
    assert "sample.width" in out.stdout and "train.sample_prompts" not in out.stdout


# -- a real overfitting run -----------------------------------------------------------------
@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    """20 prompts whose answers are random letters: nothing to generalise, so a LoRA with
    room to memorise (all-linear, rank 16) first learns the format, then the codes."""
    folder = tmp_path_factory.mktemp("codes")
    rng = random.Random(0)
    lines = [json.dumps({"prompt": f"Code {i}?", "response": "Answer: " + "".join(
        rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) + "."}) for i in range(20)]
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder, llm_encoded(folder, folder / "cache")


OVERFIT = {**LLM, "train__learning_rate": 2e-3, "lora__targets": "all-linear",
           "lora__rank": 16, "lora__alpha": 16, "train__validation__split": 0.25,
           "train__validation__every": 25}


def test_an_overfitting_run_is_diagnosed_and_early_stop_keeps_the_best_step(tmp_path, codes):
    folder, cache = codes
    settings = {**OVERFIT, "data__dir": str(folder)}
    full, stopped, short = run_dirs(tmp_path, "full", "stopped", "short")
    run = train_in(full, cache, full / "health.md", **settings,
                   train__max_steps=500)
    assert run.summary["health"]["status"] == "overfitting", (full / "health.md").read_text()
    best = run.summary["best_step"]
    assert 50 <= best <= 200
    assert "add more varied examples" in (full / "health.md").read_text()

    patience = 3
    early = train_in(stopped, cache, **settings, train__max_steps=500,
                     train__early_stop__patience=patience)
    assert early.summary["early_stop"] == {"stopped": True, "best_step": best,
                                           "saved_step": best}
    assert early.summary["step"] == best + patience * 25
    # the saved adapter is the best step's: a run that ends there saves the same tensors
    train_in(short, cache, **settings, train__max_steps=best)
    a, b = load_file(str(stopped / "lora" / ADAPTER)), load_file(str(short / "lora" / ADAPTER))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- resume and processes -------------------------------------------------------------------
def stage(root: Path, cache: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--cache", str(cache), "--out", "lora",
         "--live", "dvclive", "--logs", "logs", "--checkpoints", "ckpt", "--health",
         "health.md"], cwd=root, env={**os.environ, "PYTHONPATH": str(REPO), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


# packed (llm.packing): its layout of each batch must be as deterministic as the batch
RESUME = {**LLM, "train__max_steps": 300, "train__checkpoint_every": 150,
          "train__validation__every": 50, "train__sample_every": 100, "train__cpu_threads": 1,
          "llm__packing": True}
SAME_FILES = ("lora/" + ADAPTER, "lora/adapter_config.json", "dvclive/metrics.json",
              "dvclive/plots/metrics/loss/current.tsv", "dvclive/plots/metrics/lr/lora.tsv",
              "dvclive/plots/metrics/loss/validation/step_average.tsv",
              "dvclive/samples/step_000100.md", "dvclive/samples/step_000300.md")


def test_a_killed_llm_run_resumes_to_the_same_bytes(tmp_path, llm_cache):
    straight, killed = run_dirs(tmp_path, "straight", "killed")
    for root in (straight, killed):
        make_params(root, **RESUME)
    finish(stage(straight, llm_cache))
    proc = stage(killed, llm_cache)
    deadline = time.time() + 120
    while not (killed / "ckpt/step_0000150").exists():
        assert proc.poll() is None and time.time() < deadline, "finished before the checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "lora").exists()
    out = finish(stage(killed, llm_cache))
    assert "resumed from" in out and "at step 150" in out
    for name in SAME_FILES:
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name


def test_two_llm_processes_match_one_at_the_same_global_batch(tmp_path, llm_cache):
    """Two processes packing their shards (llm.packing) against one unpacked."""
    multi, single = run_dirs(tmp_path, "multi", "single")
    common = {**LLM, "train__max_steps": 16, "train__validation__every": 8,
              "train__grad_accum": 2}
    make_params(multi, **common, train__num_processes=2, train__batch_size=2,
                llm__packing=True)
    make_params(single, **common, train__num_processes=1, train__batch_size=4)
    out = finish(stage(multi, llm_cache))
    finish(stage(single, llm_cache))
    assert "launching 2 processes" in out and "x 2 process(es) = global batch 8" in out
    a, b = (load_file(str(root / "lora" / ADAPTER)) for root in (multi, single))
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-5)

    def curve(root):
        rows = (root / "dvclive/plots/metrics/loss/current.tsv").read_text().splitlines()[1:]
        return [float(r.split("\t")[1]) for r in rows]

    assert len(curve(multi)) == 16
    assert curve(multi) == pytest.approx(curve(single), abs=1e-5)


# -- packing --------------------------------------------------------------------------------
def test_pack_fills_few_even_rows_within_the_length_and_is_deterministic():
    from lorapipe.llm.packing import pack

    lengths = [120, 15, 40, 40, 33, 90, 7, 60]
    rows = pack(lengths, 256)
    assert sorted(i for row in rows for i in row) == list(range(8))  # each example once
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert len(rows) == 2  # 405 tokens: two rows of 256 suffice
    assert max(sum(lengths[i] for i in row) for row in rows) <= 205  # even, not 256 + 149
    assert pack(lengths, 256) == rows and pack([256, 256], 256) == [[0], [1]]


@pytest.mark.parametrize("base", ["builtin:tiny-llm", "builtin:tiny-qwen3",
                                  "builtin:tiny-gemma3", "builtin:tiny-mistral"])
def test_a_packed_row_gives_each_example_its_unpacked_logits(base):
    """Position ids restarting per example and no mask: transformers' block-diagonal causal
    mask (Gemma 3's sliding window too); an example attending to the one before it would
    move its logits."""
    from lorapipe.llm.models import load_llm

    model, tokenizer = load_llm(base)
    texts = ["What colour is snow? Answer: white.", "two plus two is four", "a b c"]
    rows = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
    with torch.no_grad():
        alone = [model(input_ids=r[None]).logits[0] for r in rows]
        # no key/value cache, as in training: transformers reads packing from the position
        # ids only without one
        packed = model(input_ids=torch.cat(rows)[None],
                       position_ids=torch.cat([torch.arange(len(r)) for r in rows])[None],
                       attention_mask=None, use_cache=False).logits[0]
    at = 0
    for row, want in zip(rows, alone, strict=True):
        torch.testing.assert_close(packed[at:at + len(row)], want, rtol=0, atol=1e-5)
        at += len(row)


def test_packing_trains_as_unpacked_on_the_same_batches(tmp_path, llm_cache, capsys):
    """The same examples per step in fewer rows: the same loss per step and the same LoRA,
    within floating-point summation order; healthy."""
    packed, unpacked = run_dirs(tmp_path, "packed", "unpacked")
    runs = {root: train_in(root, llm_cache, **LLM, train__max_steps=40, train__batch_size=8,
                           llm__packing=root == packed) for root in (packed, unpacked)}
    out = capsys.readouterr().out
    assert re.search(r"llm\.packing: an epoch's batches in [\d,]+ token slots \(\d+% padding\) "
                     r"instead of [\d,]+ unpacked", out)

    def curve(root):
        rows = (root / "dvclive/plots/metrics/loss/current.tsv").read_text().splitlines()[1:]
        return [float(r.split("\t")[1]) for r in rows]

    assert len(curve(packed)) == 40
    assert curve(packed) == pytest.approx(curve(unpacked), rel=1e-5)
    a, b = (load_file(str(root / "lora" / ADAPTER)) for root in runs)
    for key, value in b.items():
        torch.testing.assert_close(a[key], value, rtol=0, atol=1e-5)
    assert all(r.summary["health"]["status"] == "healthy" for r in runs.values())


# -- the DVC workflow -----------------------------------------------------------------------
def readme_llm_line() -> list[str]:
    """The exact command README's "Train an LLM LoRA" gives for the builtin example."""
    import shlex

    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if line.startswith("dvc exp run -S task_type=llm -S model.base=builtin:tiny-llm")]
    assert len(lines) == 1
    return shlex.split(lines[0])


def test_the_readme_llm_line_runs_the_pipeline_and_params_rerun_what_they_touch(tmp_path):
    from conftest import assert_plots_load, git_copy, ran, set_param

    root, sh = git_copy(tmp_path / "repo")
    out = sh(*readme_llm_line(), "-n", "llm")
    assert ran(out) == ["params", "validate", "preprocess", "encode", "train", "sample"]
    assert "validate: 38 rows, 38 usable" in out
    assert "train: llm:qwen2 base builtin:tiny-llm" in out
    shown = sh("dvc", "exp", "show", "--csv")
    header, row = shown.splitlines()[0].split(","), next(
        r for r in shown.splitlines() if r.startswith("llm,"))
    assert dict(zip(header, row.split(","), strict=False))["health.status"] == "healthy"
    samples = json.loads((root / "samples/samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["What colour is grass?",
                                              "What is one plus three?",
                                              "Give the opposite of big."]
    assert (root / "models/lora" / ADAPTER).exists()
    # dvc plots show: every plot loads, the LLM's lr and perplexity among them
    charts = assert_plots_load(root, sh)
    assert {"dvclive/plots/metrics/lr/lora.tsv", "dvclive/plots/metrics/perplexity/train.tsv",
            "dvclive/plots/metrics/perplexity/validation.tsv",
            "samples/dvclive/plots/images/samples.png"} <= set(charts)

    # the workspace now holds the experiment: each llm key reruns the stages that read it
    set_param(root, "llm.temperature", 0)
    set_param(root, "llm.merge", "true")
    set_param(root, "llm.export_gguf", "true")
    set_param(root, "llm.packing", "true")
    assert ran(sh("dvc", "repro")) == ["params", "train", "sample"]
    assert (root / "models/lora/merged/config.json").exists()
    assert (root / "models/lora/adapter-f16.gguf").exists()
    assert "models/lora/adapter-f16.gguf" in (root / "reports/compatibility.md").read_text()
    assert "greedy only" in (root / "samples/samples.md").read_text()
    set_param(root, "llm.train_on_prompt", "true")
    set_param(root, "llm.thinking", "strip")
    out = sh("dvc", "repro")
    # validate's token counts change, its usable rows do not: preprocess stays
    assert ran(out) == ["params", "validate", "encode", "train", "sample"]
    # switching the task back: every stage after params must rerun
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("task_type: llm", "task_type: sd"))
    status = json.loads(sh("dvc", "status", "--json").strip().splitlines()[-1])
    assert {"validate", "preprocess", "encode", "train", "sample"} <= set(status)
