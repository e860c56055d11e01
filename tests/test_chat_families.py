"""The chat families' loss masks: for each tiny chat builtin (its real model's template and
tokenizer rules), the trained text of a two-turn chat, written out here as the real model
renders it; the tokens are the whole rendering's, as at inference, with each answer's prompt
exactly the generation prompt's tokens; Qwen3's thinking kept or stripped; a template that
cannot be rendered prefix-stably refused with its family named; each builtin trains."""

from __future__ import annotations

import pytest

from conftest import LLM, LLM_EXAMPLE, llm_encoded, train_in
from lorapipe.llm import data
from lorapipe.llm.models import load_tokenizer

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "What colour is snow?", "Answer: white.", "And coal?", \
    "Answer: black."


def chat(*turns, system: bool = True) -> data.Example:
    roles = (["system"] if system else []) + ["user", "assistant"] * 2
    texts = ([SYSTEM] if system else []) + list(turns or (Q1, A1, Q2, A2))
    return data.Example(1, [{"role": r, "content": c} for r, c in zip(roles, texts, strict=True)])


def masked(example, tokenizer, **kw):
    tok = data.tokenize(example, tokenizer, 512, False, False, **kw)
    return tok, [i for i, t in zip(tok.ids, tok.trained, strict=True) if t]


def assert_inference_tokens(example, tokenizer, tok):
    """The ids are the whole rendering's tokens, and before each answer stand exactly the
    tokens of its generation prompt, untrained, as the model reads them when it answers."""
    assert tok.ids == tokenizer(tok.text, add_special_tokens=False)["input_ids"]
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(example.messages[:i], tokenize=False,
                                               add_generation_prompt=True,
                                               date_string=data.FIXED_DATE)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tok.ids[:len(ids)] == ids
        assert tok.trained[len(ids)], "the answer starts right after its prompt"
        if i == 2:  # the first answer: nothing before it is trained
            assert not any(tok.trained[:len(ids)])


def test_llama_3_trains_the_answers_and_eot_with_one_bos_and_a_fixed_date():
    tokenizer = load_tokenizer("builtin:tiny-llama3")
    example = chat()
    tok, trained = masked(example, tokenizer)
    assert tokenizer.decode(trained) == "Answer: white.<|eot_id|>Answer: black.<|eot_id|>"
    assert tok.text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat colour is snow?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAnswer: white.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd coal?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAnswer: black.<|eot_id|>")
    assert tok.ids.count(tokenizer.bos_token_id) == 1 and tok.ids[0] == tokenizer.bos_token_id
    assert_inference_tokens(example, tokenizer, tok)


def test_qwen3_keeps_the_last_answers_thinking_or_strips_every_one(monkeypatch):
    tokenizer = load_tokenizer("builtin:tiny-qwen3")
    example = chat(Q1, "<think>It is cold.</think>" + A1, Q2, "<think>It is dark.</think>" + A2)
    tok, trained = masked(example, tokenizer, thinking="keep")
    # the template drops an earlier turn's thinking (as at inference, where the history has
    # none) and renders the last one's
    assert tokenizer.decode(trained) == ("Answer: white.<|im_end|>\n<think>\nIt is dark.\n"
                                         "</think>\n\nAnswer: black.<|im_end|>\n")
    assert_inference_tokens(example, tokenizer, tok)
    tok, trained = masked(example, tokenizer, thinking="strip")
    assert tokenizer.decode(trained) == ("Answer: white.<|im_end|>\n<think>\n\n</think>\n\n"
                                         "Answer: black.<|im_end|>\n")
    assert "It is" not in tok.text
    # Qwen3's template is not prefix-stable (an answer that is last gets a thinking block
    # that it loses once a later turn follows): the answers were found by their turn ends,
    # which a template of no known family has not
    from lorapipe.llm import chat as families

    monkeypatch.setattr(families, "FAMILIES", ())
    with pytest.raises(data.DatasetError, match="of no family lorapipe knows"):
        data.segments(example, tokenizer)


def test_gemma_3_puts_the_system_text_in_the_first_user_turn():
    tokenizer = load_tokenizer("builtin:tiny-gemma3")
    example = chat()
    tok, trained = masked(example, tokenizer)
    assert tokenizer.decode(trained) == "Answer: white.<end_of_turn>\nAnswer: black.<end_of_turn>\n"
    assert tok.text == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat colour is snow?<end_of_turn>\n"
        "<start_of_turn>model\nAnswer: white.<end_of_turn>\n<start_of_turn>user\nAnd coal?"
        "<end_of_turn>\n<start_of_turn>model\nAnswer: black.<end_of_turn>\n")
    assert_inference_tokens(example, tokenizer, tok)


def test_mistral_trains_each_answer_after_inst_and_refuses_a_moving_system_message():
    tokenizer = load_tokenizer("builtin:tiny-mistral")
    example = chat(system=False)
    tok, trained = masked(example, tokenizer)
    assert tok.text == ("<s>[INST] What colour is snow?[/INST] Answer: white.</s>"
                        "[INST] And coal?[/INST] Answer: black.</s>")
    # SentencePiece: the answer's leading space is the word boundary "▁Answer", as in the
    # whole text (a piece tokenized alone would get a second one prepended)
    assert tokenizer.convert_ids_to_tokens(trained) == [
        "\u2581Answer", ":", "\u2581white", ".", "</s>", "\u2581Answer", ":", "\u2581black", ".",
        "</s>"]
    assert_inference_tokens(example, tokenizer, tok)
    # Mistral v0.3 writes the system message into the last user turn: with two turns the
    # first answer's prompt is not what the whole conversation renders before it
    with pytest.raises(data.DatasetError, match=r"chat template \(Mistral\) renders this "
                                                r"conversation's earlier turns differently"):
        data.tokenize(chat(), tokenizer, 512, False, False)
    one_turn = data.Example(1, chat().messages[:3])
    tok, trained = masked(one_turn, tokenizer)
    assert tok.text == "<s>[INST] Be brief.\n\nWhat colour is snow?[/INST] Answer: white.</s>"
    # Mistral v0.1's template puts no space before the answer: tokenized alone the answer
    # would get SentencePiece's "▁" that it does not have in place
    tokenizer.chat_template = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
    tok, trained = masked(example, tokenizer)
    assert not tokenizer.convert_ids_to_tokens(trained)[0].startswith("\u2581")
    assert_inference_tokens(example, tokenizer, tok)


def test_smollm2_adds_its_default_system_prompt_untrained():
    tokenizer = load_tokenizer("builtin:tiny-smollm2")
    example = chat(system=False)
    tok, trained = masked(example, tokenizer)
    assert tokenizer.decode(trained) == "Answer: white.<|im_end|>\nAnswer: black.<|im_end|>\n"
    assert tok.text.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat colour is snow?<|im_end|>\n")
    assert_inference_tokens(example, tokenizer, tok)


def test_a_template_of_no_known_family_that_is_not_prefix_stable_is_refused(tmp_path):
    tokenizer = load_tokenizer("builtin:tiny-llm")
    # marks the last message: a rendering of the first turn is not a prefix of the whole
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(data.DatasetError, match=r"chat template \(of no family lorapipe "
                                                r"knows\)"):
        data.tokenize(chat(), tokenizer, 512, False, False)
    (tmp_path / "data.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": '
        '"Hello."}]}\n')
    report = data.validate_examples(tmp_path, tokenizer, 256, "error", False)
    assert [(f.code, f.row) for f in report.errors] == [("CHAT_TEMPLATE", 1)]


@pytest.mark.parametrize("base", ["builtin:tiny-llama3", "builtin:tiny-qwen3",
                                  "builtin:tiny-gemma3", "builtin:tiny-mistral",
                                  "builtin:tiny-smollm2"])
def test_each_chat_builtin_trains_healthy_on_the_example_set(tmp_path, base):
    cache = llm_encoded(LLM_EXAMPLE, tmp_path / "cache", base=base)
    result = train_in(tmp_path, cache, **{**LLM, "model__base": base}, train__max_steps=30)
    assert result.summary["health"]["status"] == "healthy"
    assert result.summary["loss"]["train"] < 0.7 * result.summary["fixed_loss_start"]
