"""LLM training data: read data.jsonl (or metadata.csv), check it, and tokenize with the mask.

One example per line, in one of three shapes (a file may mix them):
  {"prompt": "...", "response": "..."}          an instruction and its answer
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}
  {"text": "..."}                               plain text, every token trained
metadata.csv holds the same as columns `prompt,response` or `text`.

Tokenizing renders the conversation with the tokenizer's chat template and masks the loss to
the assistant's tokens (and the end-of-turn token that teaches stopping), unless
llm.train_on_prompt. No library does this for an arbitrary template: transformers'
`return_assistant_tokens_mask` needs `{% generation %}` markers that real templates (Qwen's,
Llama's) lack. So the template renders each growing prefix of the conversation, which tells
the answers' characters from the prompt's; a template that does not render a conversation as
a growing prefix (Qwen3's, which drops earlier turns' thinking) has its answers found in the
one rendering of the whole conversation (lorapipe.llm.chat). The whole text is then tokenized
once, as at inference, and each token is trained or not by where its first character is.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorapipe.core import outputs
from lorapipe.core.errors import LorapipeError
from lorapipe.core.findings import DatasetError, Finding, HasFindings, decode_text, read_data_file
from lorapipe.llm.chat import family_of, strip_thinking

DATA_FILE = "data.jsonl"
CSV_FILE = "metadata.csv"
ROLES = ("system", "user", "assistant")
CACHE_FILE = "tokens.safetensors"  # in data/cache, as the image task's latents.safetensors
# One example is one line. A line past this is refused before it is parsed: far beyond any
# llm.max_length (a token is a few bytes), and parsing and tokenizing a 50 MB line took 66 s
# and 9 GiB only to refuse it later.
MAX_LINE_CHARS = 1 << 20


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object hook: a key given twice is an error, not a silent last-one-wins."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


@dataclass
class Example:
    line: int  # in data.jsonl (or metadata.csv, whose header is line 1)
    messages: list[dict] | None = None  # chat (prompt/response becomes user + assistant)
    text: str | None = None  # plain text

    def to_json(self) -> str:
        """The canonical form: what usable.csv and the processed data hold, and what
        duplicates and the held-out split are judged by."""
        body = {"messages": self.messages} if self.messages is not None else {"text": self.text}
        return json.dumps(body, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, line: int, text: str) -> Example:
        body = json.loads(text)
        return cls(line, body.get("messages"), body.get("text"))


@dataclass
class Tokenized:
    ids: list[int]
    trained: list[bool]  # per token: is it in the loss
    truncated: bool = False
    length_before: int = 0  # tokens before truncation
    text: str = ""  # the rendered example the ids were made from


@dataclass
class LlmReport(HasFindings):
    """validate's result: the same summary and findings as for images, plus token counts."""

    rows: int = 0
    usable: list[Example] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per usable example
    trained_tokens: int = 0

    def summary(self) -> dict:
        out = {"rows": self.rows, "usable": len(self.usable),
               "rows_with_errors": self.rows - len(self.usable) if self.rows else 0,
               "errors": len(self.errors), "warnings": len(self.warnings)}
        if self.lengths:
            out["tokens"] = {"min": min(self.lengths), "median": statistics.median(self.lengths),
                             "mean": round(statistics.fmean(self.lengths), 1),
                             "max": max(self.lengths), "total": sum(self.lengths),
                             "trained": self.trained_tokens}
        return out


# -- reading ------------------------------------------------------------------------------
def data_file(folder: str | Path) -> Path:
    """data.jsonl, else metadata.csv; a DatasetError naming both when neither is there."""
    folder = Path(folder)
    for name in (DATA_FILE, CSV_FILE):
        if (folder / name).exists():
            return folder / name
    raise DatasetError("DATA_MISSING", f"{folder} has neither {DATA_FILE} nor {CSV_FILE}; "
                       "task_type llm reads one example per line from data.jsonl "
                       "(prompt/response, messages or text)", file=DATA_FILE)


def read_examples(folder: str | Path) -> tuple[list[Example], list[Finding], int]:
    """(examples that are well-formed, findings, rows read). A file that cannot be read at
    all raises DatasetError."""
    path = data_file(folder)
    try:
        text = decode_text(read_data_file(path))
    except DatasetError as exc:  # its message speaks of metadata.csv and spreadsheets
        if exc.finding.code != "CSV_ENCODING":
            raise
        raise DatasetError("ENCODING", f"{path.name} " + str(exc).replace(
            "metadata.csv", path.name), file=path.name) from None
    if path.name == CSV_FILE:
        return _read_csv(text)
    examples, findings, rows = [], [], 0
    # JSON Lines ends a line at \n only: U+2028, U+0085 and the like are text inside strings
    # (str.splitlines would cut there and shift every later line number)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        rows += 1
        body, problem = _json_line(line, number)
        if problem is not None:
            findings.append(problem)
            continue
        example, problems = _parse(body, number)
        findings += problems
        if example is not None:
            examples.append(example)
    if not rows:
        raise DatasetError("DATA_EMPTY", f"{path.name} has no examples; add one JSON object "
                           "per line", file=path.name)
    return examples, findings, rows


def _json_line(line: str, number: int) -> tuple[object, Finding | None]:
    """One line of data.jsonl parsed, or the finding that says why it cannot be."""
    if len(line) > MAX_LINE_CHARS:
        return None, _error("LINE_TOO_LONG", f"{len(line) / 2**20:.1f} M characters on one "
                            f"line, more than the {MAX_LINE_CHARS >> 20} M an example may "
                            "hold; split it into several examples", number)
    try:
        return json.loads(line, object_pairs_hook=_no_duplicate_keys), None
    except _DuplicateKey as exc:
        return None, _error("DUPLICATE_KEY", f"the key {exc.args[0]!r} appears twice in one "
                            "object, and only one value can be kept; remove the other", number)
    except json.JSONDecodeError as exc:
        return None, _error("JSON_ERROR", f"not valid JSON: {exc.msg} at column "
                            f"{exc.colno}; one JSON object per line", number)
    except RecursionError:
        return None, _error("JSON_ERROR", "not usable JSON: nested too deeply; an example "
                            "is an object of strings and a list of messages", number)
    except ValueError as exc:  # an integer of more than 4300 digits, and the like
        return None, _error("JSON_ERROR", f"not usable JSON: {exc}", number)


def _read_csv(text: str) -> tuple[list[Example], list[Finding], int]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = {c.strip().lower() for c in reader.fieldnames or []}
    if not ({"prompt", "response"} <= columns or "text" in columns):
        raise DatasetError("CSV_HEADER", f"{CSV_FILE} needs columns prompt,response or text "
                           f"(found: {', '.join(sorted(columns)) or 'nothing'})", file=CSV_FILE)
    examples, findings, rows = [], [], 0
    for record in reader:
        rows += 1
        extra = [c for c in record.get(None) or [] if c.strip()]  # DictReader's restkey
        if extra:
            cells = " | ".join(repr(c) for k, c in record.items() if k) + " | " + " | ".join(
                map(repr, extra))
            findings.append(Finding(
                "error", "EXTRA_CELLS", f"{CSV_FILE} line {reader.line_num} has {len(extra)} "
                f"more cell(s) than its header has columns ({cells}): a field was split at a "
                "comma; put a field that contains commas in double quotes", row=reader.line_num,
                file=CSV_FILE))
            continue
        body = {k.strip().lower(): v for k, v in record.items() if k and v is not None}
        if {"prompt", "response"} <= columns:
            body.pop("text", None)
        example, problems = _parse(body, reader.line_num, csv_row=True)
        findings += problems
        if example is not None:
            examples.append(example)
    return examples, findings, rows


def _error(code: str, message: str, line: int) -> Finding:
    return Finding("error", code, message, row=line, file=DATA_FILE)


def _parse(body, line: int, csv_row: bool = False) -> tuple[Example | None, list[Finding]]:
    """One record to an Example, or the findings that say why it is not one."""
    file = CSV_FILE if csv_row else DATA_FILE

    def bad(code, message):
        return None, [Finding("error", code, message, row=line, file=file)]

    if not isinstance(body, dict):
        return bad("NOT_OBJECT", f"expected a JSON object, got {type(body).__name__}")
    shapes = [k for k in ("messages", "prompt", "text") if k in body]
    if not shapes:
        return bad("MISSING_FIELD", "needs \"prompt\" and \"response\", \"messages\" or "
                   f"\"text\" (found: {', '.join(map(repr, body)) or 'nothing'})")
    if len(shapes) > 1:
        return bad("AMBIGUOUS", f"has both {shapes[0]!r} and {shapes[1]!r}; keep one shape")
    if "text" in body:
        if not isinstance(body["text"], str) or not body["text"].strip():
            return bad("EMPTY_FIELD", "\"text\" is empty or not a string")
        if problem := _text_problem(body["text"]):
            return bad("BAD_TEXT", f"\"text\" {problem}")
        return Example(line, text=body["text"]), []
    if "prompt" in body:
        for name in ("prompt", "response"):
            if name not in body:
                return bad("MISSING_FIELD", f"has \"prompt\" but no \"{name}\"")
            if not isinstance(body[name], str) or not body[name].strip():
                return bad("EMPTY_FIELD", f"\"{name}\" is empty or not a string")
            if problem := _text_problem(body[name]):
                return bad("BAD_TEXT", f"\"{name}\" {problem}")
        return Example(line, [{"role": "user", "content": body["prompt"]},
                              {"role": "assistant", "content": body["response"]}]), []
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        return bad("EMPTY_FIELD", "\"messages\" must be a non-empty list of "
                   "{\"role\", \"content\"} objects")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            calls = " (tool calls are not trained: give the answer as content)" if (
                isinstance(message, dict) and "tool_calls" in message) else ""
            return bad("MISSING_FIELD", f"messages[{i}] needs \"role\" and \"content\"{calls}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return bad("BAD_ROLE", f"messages[{i}] has role {role!r}; roles are "
                       + ", ".join(ROLES))
        if role == "system" and i:
            return bad("BAD_ROLE", f"messages[{i}] is a system message; only the first may be")
        if not isinstance(content, str) or not content.strip():
            return bad("EMPTY_FIELD", f"messages[{i}] ({role}) has empty content")
        if problem := _text_problem(content):
            return bad("BAD_TEXT", f"messages[{i}] ({role}) {problem}")
        if clean and clean[-1]["role"] == role:
            return bad("BAD_ROLE", f"messages[{i-1}] and messages[{i}] are both {role}; "
                       "user and assistant turns alternate")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "assistant":
        return bad("BAD_ROLE", f"the last message is {clean[-1]['role']}, not assistant: "
                   "there is no answer to train on")
    if clean[0]["role"] == "assistant" or (clean[0]["role"] == "system"
                                           and len(clean) > 1 and clean[1]["role"] != "user"):
        return bad("BAD_ROLE", "the conversation must open with a user message (after an "
                   "optional system message)")
    return Example(line, clean), []


def _text_problem(text: str) -> str | None:
    """Why no tokenizer can take `text`, or None: a lone surrogate (a JSON escape such as
    \\ud800 without its pair) is a str that cannot be encoded as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character "
                f"{exc.start}, half of a character that no tokenizer can encode; fix the "
                "\\u escape (a pair such as \\ud83d\\ude00, or the character itself)")
    return None


# -- tokenizing ---------------------------------------------------------------------------
class TemplateFailed(LorapipeError):
    """model.base's chat template raised on one conversation."""


def _template_name(tokenizer) -> str:
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    if (folder / "chat_template.jinja").is_file():
        return str(folder / "chat_template.jinja")
    if (folder / "tokenizer_config.json").is_file():
        return f"the chat_template of {folder / 'tokenizer_config.json'}"
    return "model.base's chat template"


# Llama 3.x's templates write "Today Date: <date_string>" into every system header, from
# strftime_now() unless date_string is given: the day of the run would change the tokens (and
# the token cache's bytes). Given, fixed to the date Llama 3.1's own template falls back to.
FIXED_DATE = "26 Jul 2024"


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    if not messages:
        return ""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation,
                                             date_string=FIXED_DATE)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        # a template's raise_exception() (Gemma's "System role not supported"), its sandbox
        # refusing an attribute (SecurityError), or a template that is broken
        raise TemplateFailed(f"{_template_name(tokenizer)} failed on this conversation: "
                             f"{type(exc).__name__}: {exc}") from None


def _messages(example: Example, thinking: str) -> list[dict]:
    """The conversation as the template gets it: llm.thinking strip drops each answer's
    <think>...</think> blocks."""
    if thinking != "strip":
        return example.messages
    return [{**m, "content": strip_thinking(m["content"])} if m["role"] == "assistant" else m
            for m in example.messages]


def segments(example: Example, tokenizer, thinking: str = "keep") -> list[tuple[str, bool]]:
    """The example's text in pieces, each (text, is it the answer)."""
    eos = tokenizer.eos_token or ""
    if example.text is not None:
        return [(example.text + eos, True)]
    if not tokenizer.chat_template:
        if any(m["role"] == "system" for m in example.messages) or len(example.messages) > 2:
            raise DatasetError("NO_CHAT_TEMPLATE", f"line {example.line}: model.base's "
                               "tokenizer has no chat template, so multi-turn or system "
                               "messages cannot be rendered; use prompt/response or text")
        return [(example.messages[0]["content"] + "\n", False),
                (example.messages[1]["content"] + eos, True)]
    messages = _messages(example, thinking)
    pieces = _by_prefixes(messages, tokenizer)
    if pieces is None:
        pieces = _by_turn_ends(messages, tokenizer)
    if pieces is None:
        family = family_of(tokenizer.chat_template)
        raise DatasetError(
            "CHAT_TEMPLATE", f"model.base's chat template ({family.name}) renders this "
            "conversation's earlier turns differently once a later turn follows (Mistral "
            "v0.3's moves the system message into the last user turn), so its answers cannot "
            "be told from the prompt as the model saw it; give each answer its own example "
            "(the turns before it as its prompt), drop the system message, or use the text "
            "shape", file=DATA_FILE)
    return [(text, trained) for text, trained in pieces if text]


def _by_prefixes(messages: list[dict], tokenizer) -> list[tuple[str, bool]] | None:
    """Pieces from each growing prefix's rendering; None if the renderings are not prefixes
    of one another."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        answer = message["role"] == "assistant"
        before = _render(tokenizer, messages[:i], generation=answer) if i or answer else ""
        after = _render(tokenizer, messages[:i + 1], generation=False)
        if not (before.startswith(done) and after.startswith(before)):
            return None
        pieces += [(before[len(done):], False), (after[len(before):], answer)]
        done = after
    return pieces


def _by_turn_ends(messages: list[dict], tokenizer) -> list[tuple[str, bool]] | None:
    """Pieces from the whole conversation's one rendering: each answer runs from where its
    generation prompt ends (that prompt rendered alone must be a prefix of the whole) through
    its family's turn-closing token and the newlines after it, and must hold the answer's
    text. None if the template is of no known family or a turn is not found so."""
    family = family_of(tokenizer.chat_template)
    turn_end = tokenizer.eos_token if family.turn_end == "eos" else family.turn_end
    if not turn_end:
        return None
    whole = _render(tokenizer, messages, generation=False)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation=True)
        start = len(prompt)
        end = whole.find(turn_end, start)
        if start < done or not whole.startswith(prompt) or end < 0:
            return None
        end += len(turn_end)
        while whole.startswith("\n", end):
            end += 1
        if strip_thinking(message["content"]).strip() not in whole[start:end]:
            return None
        pieces += [(whole[done:start], False), (whole[start:end], True)]
        done = end
    return pieces + [(whole[done:], False)]


def tokenize(example: Example, tokenizer, max_length: int, train_on_prompt: bool,
             truncate: bool, thinking: str = "keep") -> Tokenized:
    """Token ids and the loss mask. Longer than max_length: cut from the end when
    `truncate` (the response loses its tail), else returned whole (validate reports it)."""
    pieces = segments(example, tokenizer, thinking)
    # the tokenizer's own BOS (Llama's; Qwen's has none) once, at the start, unless the chat
    # template writes it itself
    add_specials = example.messages is None or not tokenizer.chat_template
    text = "".join(piece for piece, _ in pieces)
    if tokenizer.is_fast:
        # the whole text at once, as the model reads it at inference (a SentencePiece
        # tokenizer gives a piece tokenized alone a leading space it does not have in
        # place); a token is in the loss when its first character is in an answer
        encoded = tokenizer(text, add_special_tokens=add_specials, return_offsets_mapping=True)
        starts = list(accumulate((len(piece) for piece, _ in pieces[:-1]), initial=0))
        ids = encoded["input_ids"]
        trained = [pieces[bisect_right(starts, a) - 1][1] or train_on_prompt
                   for a, _ in encoded["offset_mapping"]]
    else:  # a slow tokenizer has no offsets: piece by piece
        ids, trained = [], []
        for piece, answer in pieces:
            piece_ids = tokenizer(piece, add_special_tokens=add_specials)["input_ids"]
            add_specials = False
            ids += piece_ids
            trained += [answer or train_on_prompt] * len(piece_ids)
    length = len(ids)
    if truncate and length > max_length:
        ids, trained = ids[:max_length], trained[:max_length]
    return Tokenized(ids, trained, length > len(ids), length, text)


def check_lengths(examples: list[Example], tokenizer, max_length: int, too_long: str,
                  train_on_prompt: bool, thinking: str = "keep"
                  ) -> tuple[list[Example], list[Finding], list[int], int]:
    """Token lengths against llm.max_length: (examples that fit or were cut, findings,
    their lengths, their trained tokens)."""
    kept, findings, lengths, trained = [], [], [], 0
    specials = special_strings(tokenizer)
    for example in examples:
        try:
            tok = tokenize(example, tokenizer, max_length, train_on_prompt,
                           truncate=too_long == "truncate", thinking=thinking)
        except TemplateFailed as exc:
            findings.append(_error("CHAT_TEMPLATE", f"{exc}; change the example or use a base "
                                   "whose template takes it", example.line))
            continue
        except DatasetError as exc:  # a conversation its template cannot be masked in
            if exc.finding.code != "CHAT_TEMPLATE":
                raise
            findings.append(_error("CHAT_TEMPLATE", str(exc), example.line))
            continue
        if not tok.truncated and (lost := round_trip_problem(tok, tokenizer, specials)):
            findings.append(_error("TOKENIZER_LOSSY", lost, example.line))
            continue
        if tok.length_before > max_length and too_long == "error":
            findings.append(_error("TOO_LONG", f"{tok.length_before} tokens, more than "
                                   f"llm.max_length {max_length}; shorten it, raise "
                                   "llm.max_length or set llm.too_long: truncate", example.line))
            continue
        if not any(tok.trained):
            findings.append(_error("NOTHING_TRAINED", f"the prompt alone fills llm.max_length "
                                   f"{max_length} tokens, so no answer token is left to train "
                                   "on; shorten the prompt or raise llm.max_length",
                                   example.line))
            continue
        if tok.truncated:
            findings.append(Finding("warning", "TRUNCATED", f"{tok.length_before} tokens, cut to "
                                    f"llm.max_length {max_length} (llm.too_long: truncate)",
                                    row=example.line, file=DATA_FILE))
        kept.append(example)
        lengths.append(len(tok.ids))
        trained += sum(tok.trained)
    return kept, findings, lengths, trained


def special_strings(tokenizer) -> list[str]:
    """The special and added tokens' strings, which decoding may drop."""
    return [*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()]


def round_trip_problem(tok: Tokenized, tokenizer, specials: list[str]) -> str | None:
    """Why the tokens do not hold the example's text, or None. Compared without the
    `specials` (special_strings), whitespace and Unicode compatibility forms, which
    tokenizers may normalise; what is left must come back. A Qwen folder without
    tokenizer.json loads a tokenizer with an empty vocabulary: 33 tokens of an example
    became 4, and it trained with exit 0."""
    def bare(text: str) -> str:
        for special in specials:
            text = text.replace(special, "")
        return "".join(unicodedata.normalize("NFKC", text).split())

    want, got = bare(tok.text), bare(tokenizer.decode(tok.ids, skip_special_tokens=True))
    if want == got:
        return None
    return (f"model.base's tokenizer does not hold this example's text: it reads back as "
            f"{got[:60]!r} ({len(got)} of its {len(want)} characters, not counting spaces, "
            f"from {want[:40]!r}); "
            "its files are incomplete (a folder without tokenizer.json?) or it lacks these "
            "characters. Use the base's full tokenizer files (save_pretrained writes them)")


def validate_examples(folder: str | Path, tokenizer, max_length: int, too_long: str,
                      train_on_prompt: bool, thinking: str = "keep") -> LlmReport:
    """Every check of the data, in the order a user fixes them; never writes in `folder`."""
    report = LlmReport()
    try:
        examples, report.findings, report.rows = read_examples(folder)
    except DatasetError as exc:
        report.findings.append(exc.finding)
        return report
    seen: dict[str, int] = {}
    unique = []
    for example in examples:
        canonical = example.to_json()
        if canonical in seen:
            report.findings.append(_error("DUPLICATE", f"the same example as line "
                                          f"{seen[canonical]}; keep one", example.line))
            continue
        seen[canonical] = example.line
        unique.append(example)
    try:
        report.usable, found, report.lengths, report.trained_tokens = check_lengths(
            unique, tokenizer, max_length, too_long, train_on_prompt, thinking)
    except DatasetError as exc:
        report.findings.append(exc.finding)
        return report
    report.findings += found
    report.findings.sort(key=lambda f: (f.row or 0))
    return report


def prompt_text(prompt: str, tokenizer) -> str:
    """A sample prompt as the model sees it at generation: a user turn and the opened
    assistant turn (chat template), else the prompt and a newline, as in training."""
    if tokenizer.chat_template:
        return _render(tokenizer, [{"role": "user", "content": prompt}], generation=True)
    return prompt + "\n"


# -- the processed examples and the token cache -------------------------------------------
def read_usable(path: str | Path) -> list[Example]:
    """validate's usable.csv (line, canonical example)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != {"line", "example"}:
        raise LorapipeError(f"{path} lists images, not task_type llm examples; rerun the "
                            "validate stage (dvc repro) after switching task_type")
    return [Example.from_json(int(r["line"]), r["example"]) for r in rows]


def write_processed(examples: list[Example], folder: str | Path) -> None:
    """data/processed/data.jsonl: the canonical examples, each with its source line."""
    lines = [json.dumps({"line": e.line, **json.loads(e.to_json())}, ensure_ascii=False)
             for e in examples]
    with outputs.atomic_dir(folder) as tmp:
        (tmp / DATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_processed(folder: str | Path) -> list[Example]:
    path = Path(folder) / DATA_FILE
    if not path.exists():
        raise LorapipeError(f"{path} not found; with task_type llm the preprocess stage writes "
                            "it (dvc repro)")
    out = []
    for text in path.read_text(encoding="utf-8").splitlines():
        body = json.loads(text)
        out.append(Example(body["line"], body.get("messages"), body.get("text")))
    return out


@dataclass
class TokenCache:
    """Every example's token ids and loss mask (flat, with offsets), and what made them."""

    ids: torch.Tensor  # int64, all examples end to end
    trained: torch.Tensor  # bool, per token
    offsets: torch.Tensor  # int64, example i is [offsets[i], offsets[i+1])
    keys: list[str]  # canonical JSON per example: the held-out split hashes it
    lines: list[int]
    meta: dict

    def __len__(self) -> int:
        return len(self.keys)

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.offsets[i].item(), self.offsets[i + 1].item()
        return self.ids[a:b], self.trained[a:b]


def encode_examples(examples: list[Example], tokenizer, p, base: str) -> TokenCache:
    ids, trained, offsets, truncated = [], [], [0], 0
    for example in examples:
        tok = tokenize(example, tokenizer, p.max_length, p.train_on_prompt,
                       truncate=p.too_long == "truncate", thinking=p.thinking)
        if len(tok.ids) > p.max_length:
            raise LorapipeError(f"data line {example.line} has {len(tok.ids)} tokens, more "
                                f"than llm.max_length {p.max_length}; rerun validate "
                                "(dvc repro) to check the data against it")
        ids += tok.ids
        trained += tok.trained
        offsets.append(len(ids))
        truncated += tok.truncated
    return TokenCache(torch.tensor(ids, dtype=torch.int64), torch.tensor(trained),
                      torch.tensor(offsets, dtype=torch.int64),
                      [e.to_json() for e in examples], [e.line for e in examples],
                      {"task": "llm", "base": base, "truncated": truncated,
                       "max_length": p.max_length, "train_on_prompt": p.train_on_prompt,
                       "thinking": p.thinking})


def save_token_cache(cache: TokenCache, folder: str | Path) -> Path:
    path = Path(folder) / CACHE_FILE
    metadata = {"keys": json.dumps(cache.keys, ensure_ascii=False),
                "lines": json.dumps(cache.lines), "meta": json.dumps(cache.meta),
                "base": cache.meta["base"]}
    with outputs.atomic_dir(folder) as tmp:
        save_file({"ids": cache.ids, "trained": cache.trained.to(torch.uint8),
                   "offsets": cache.offsets}, str(tmp / CACHE_FILE), metadata=metadata)
        outputs.canonical_safetensors(tmp / CACHE_FILE)
    return path


def load_token_cache(folder: str | Path) -> TokenCache:
    path = Path(folder) / CACHE_FILE
    tensors, meta = outputs.read_safetensors(path, "run the encode stage first")
    if "ids" not in tensors:
        raise LorapipeError(f"{path} holds image latents, not token ids; rerun the pipeline "
                            "(dvc repro) after switching task_type")
    return TokenCache(tensors["ids"], tensors["trained"].bool(), tensors["offsets"],
                      json.loads(meta["keys"]), json.loads(meta["lines"]), json.loads(meta["meta"]))
