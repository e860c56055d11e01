"""Malformed LLM data and model folders, as users and other tools produce them: each is a
named finding (file, line, what to do) or a clear refusal, with no traceback, no hang, no
silent loss, and the raw data left as it was."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LLM, REPO, make_params
from lorapipe.llm import data
from lorapipe.llm.models import CHATML, build_tiny_llm, tiny_tokenizer

GOOD = '{"prompt": "What is one plus one?", "response": "two"}'
OTHER = '{"prompt": "What is two plus two?", "response": "four"}'

# code -> (the bad line, a pattern its message must match)
BAD_LINES = {
    "tool call without content": (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": '
        '[{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}',
        "MISSING_FIELD", r"messages\[1\] needs \"role\" and \"content\" \(tool calls"),
    "deep nesting": ("[" * 200_000 + "]" * 200_000, "JSON_ERROR", r"nested too deeply"),
    "huge integer": ('{"prompt": "q", "response": "a", "n": ' + "9" * 5000 + "}",
                     "JSON_ERROR", r"not usable JSON: .*digits"),
    "lone surrogate": ('{"prompt": "a \\ud800 b", "response": "a"}', "BAD_TEXT",
                       r"\"prompt\" holds a lone surrogate \(U\+D800\) at character 2"),
    "duplicate key": ('{"prompt": "q", "response": "four", "response": "five"}',
                      "DUPLICATE_KEY", r"the key 'response' appears twice"),
    "a 2 MB line": ('{"prompt": "q", "response": "' + "x" * (2 << 20) + '"}',
                    "LINE_TOO_LONG", r"2\.0 M characters on one line, .* split it"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_each_malformed_line_is_a_finding_on_its_line(tmp_path, case):
    line, code, message = BAD_LINES[case]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "data.jsonl").write_text(f"{GOOD}\n{line}\n{OTHER}\n", encoding="utf-8",
                                       errors="surrogatepass")
    before = (folder / "data.jsonl").read_bytes()
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "error", False)
    found = [f for f in report.errors if f.code == code]
    assert len(found) == 1 and found[0].row == 2, [str(f) for f in report.findings]
    assert found[0].file == "data.jsonl" and re.search(message, str(found[0])), str(found[0])
    assert [e.line for e in report.usable] == [1, 3]
    assert (folder / "data.jsonl").read_bytes() == before


def test_line_separators_inside_strings_are_text_and_line_numbers_stay_true(tmp_path):
    """U+2028 and U+0085 are legal, unescaped, inside JSON strings; only \\n ends a line."""
    folder = tmp_path / "data"
    folder.mkdir()
    odd = '{"prompt": "one\u2028two\u0085three", "response": "four"}'
    (folder / "data.jsonl").write_text(f"{odd}\n{GOOD}\nnot json\n", encoding="utf-8")
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "error", False)
    assert [e.line for e in report.usable] == [1, 2]
    assert report.usable[0].messages[0]["content"] == "one\u2028two\u0085three"
    assert [(f.code, f.row) for f in report.errors] == [("JSON_ERROR", 3)]


def test_an_unquoted_comma_in_metadata_csv_is_not_cut_silently(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "metadata.csv").write_text("prompt,response\nWhat is two plus two?,"
                                         "\"Answer: four\"\nWhat is two plus two?,Answer: "
                                         "four, I think\n", encoding="utf-8")
    report = data.validate_examples(folder, tiny_tokenizer(), 256, "error", False)
    (extra,) = report.errors
    assert extra.code == "EXTRA_CELLS" and extra.row == 3 and extra.file == "metadata.csv"
    assert "metadata.csv line 3 has 1 more cell(s)" in extra.message
    assert "' I think'" in extra.message and "double quotes" in extra.message
    assert len(report.usable) == 1


def test_a_chat_template_that_raises_names_the_template_and_the_example(tmp_path):
    """Gemma's template raises for a system message; a sandboxed template refuses an unsafe
    attribute (jinja's SecurityError). Each is a finding on the example it failed on."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% if messages[0]['content'] == 'unsafe' %}{{ messages.append(1) }}{% endif %}"
        + CHATML)
    folder = tmp_path / "base"
    tokenizer.save_pretrained(folder)
    tokenizer = type(tokenizer).from_pretrained(folder)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    system = json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]})
    unsafe = '{"prompt": "unsafe", "response": "a"}'
    (data_dir / "data.jsonl").write_text(f"{GOOD}\n{system}\n{unsafe}\n")
    report = data.validate_examples(data_dir, tokenizer, 256, "error", False)
    found = {f.row: f for f in report.errors}
    assert set(found) == {2, 3} and {f.code for f in found.values()} == {"CHAT_TEMPLATE"}
    assert str(folder / "chat_template.jinja") in found[2].message
    assert "System role not supported" in found[2].message
    assert "SecurityError" in found[3].message
    assert [e.line for e in report.usable] == [1]


def validate(folder: Path, root: Path, timeout=60, **overrides) -> subprocess.CompletedProcess:
    make_params(root, **{**LLM, "data__dir": str(folder), **overrides})
    return subprocess.run(
        [sys.executable, "-m", "stages.validate", "--images", str(folder), "--report",
         "report.json", "--usable", "usable.csv"], cwd=root, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", ["folder", "fifo", "dev-zero"])
def test_a_data_file_that_is_not_a_file_is_named_and_never_read(tmp_path, kind):
    """A folder called data.jsonl, a FIFO (validate used to wait forever) and a symlink to
    /dev/zero (read forever): one named finding each, through the validate stage."""
    folder = tmp_path / "data"
    folder.mkdir()
    target = folder / "data.jsonl"
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    result = validate(folder, tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    kinds = {"folder": "a folder", "fifo": "a FIFO (named pipe)", "dev-zero": "a device"}
    assert f"DATA_NOT_FILE: data.jsonl: {target} is {kinds[kind]}, not a file" in result.stdout


@pytest.fixture(scope="module")
def saved_tiny_llm(tmp_path_factory) -> Path:
    model, tokenizer = build_tiny_llm()
    folder = tmp_path_factory.mktemp("llm") / "tiny-llm-folder"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_tokenizer_that_cannot_hold_the_text_is_refused(tmp_path, saved_tiny_llm):
    """A Qwen folder without tokenizer.json loads, with an empty vocabulary: it trained on 4
    tokens per example instead of 33, exit 0."""
    base = tmp_path / "base"
    shutil.copytree(saved_tiny_llm, base)
    whole = validate(REPO / "data" / "example-llm", tmp_path, model__base=str(base))
    assert whole.returncode == 0, whole.stdout + whole.stderr  # the full folder is fine
    (base / "tokenizer.json").unlink()
    result = validate(REPO / "data" / "example-llm", tmp_path, model__base=str(base))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error TOKENIZER_LOSSY: line 1 data.jsonl: model.base's tokenizer does not hold " \
           "this example's text" in result.stdout, result.stdout
    assert "without tokenizer.json" in result.stdout


def test_a_model_folder_with_its_own_code_is_refused_before_any_load(tmp_path,
                                                                     saved_tiny_llm):
    """An auto_map asks transformers to run the folder's Python (in a terminal: a [y/N]
    prompt, four times). Refused at the params check; the planted code never runs."""
    base = tmp_path / "base"
    shutil.copytree(saved_tiny_llm, base)
    marker = tmp_path / "planted-code-ran"
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import Qwen2ForCausalLM as EvilLM\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilLM"}
    (base / "config.json").write_text(json.dumps(config))
    from lorapipe.core.params import ParamsError

    with pytest.raises(ParamsError, match="config.json has an auto_map"):
        make_params(tmp_path, **{**LLM, "model__base": str(base)})  # written, then checked
    checked = subprocess.run(
        [sys.executable, "-m", "stages.params", "--params", "params.yaml", "--out", "ok.txt"],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "LORAPIPE_WARM": "0"})
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert "config.json has an auto_map" in checked.stderr and "never does" in checked.stderr
    from lorapipe.llm.models import load_tokenizer

    with pytest.raises(Exception, match="auto_map"):
        load_tokenizer(str(base))
    assert not marker.exists()


def test_a_diffusers_folder_whose_text_encoder_has_its_own_code_is_refused(tmp_path):
    """The image task's folders too: transformers loads their text encoders and tokenizers."""
    from lorapipe.tasks import model_source_problem

    base = tmp_path / "sd"
    (base / "text_encoder").mkdir(parents=True)
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (base / "text_encoder" / "config.json").write_text('{"model_type": "clip_text_model"}')
    assert model_source_problem(base, "sd") is None
    (base / "text_encoder" / "config.json").write_text(
        '{"model_type": "x", "auto_map": {"AutoModel": "evil.Model"}}')
    problem = model_source_problem(base, "sd")
    assert "'sd/text_encoder': its config.json has an auto_map" in problem
