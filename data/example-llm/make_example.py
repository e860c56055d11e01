"""Write data.jsonl: the builtin tiny LLM's example instruction set (deterministic).

    python data/example-llm/make_example.py

Short questions whose answers all take one format, "Answer: <word>." The random-weight
tiny model knows nothing; a LoRA trained on this set visibly learns the format (its samples
open with "Answer:" and stop after the full stop), which is what the example is for. All
three shapes of data.jsonl appear: prompt/response, chat messages (one with a system
message, one with two turns) and plain text.
"""

from __future__ import annotations

import json
from pathlib import Path

NUMBERS = "zero one two three four five six seven eight nine ten".split()
COLOURS = {"the sun": "yellow", "grass": "green", "the sky": "blue", "snow": "white",
           "coal": "black", "a heart": "red", "the moon": "white", "a tree": "green",
           "a fish": "orange", "a bird": "blue"}
OPPOSITES = {"big": "small", "hot": "cold", "yes": "no", "first": "last", "upper": "lower",
             "true": "false", "before": "after", "plus": "minus"}
SYSTEM = "You answer in one word."


def examples() -> list[dict]:
    out = []
    for a in range(6):
        for b in range(5):
            if (a + b) % 2 == 0 or a + b > 8:
                continue
            out.append({"prompt": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                        "response": f"Answer: {NUMBERS[a + b]}."})
    for thing, colour in COLOURS.items():
        out.append({"prompt": f"What colour is {thing}?", "response": f"Answer: {colour}."})
    for word, opposite in OPPOSITES.items():
        out.append({"messages": [{"role": "user", "content": f"Give the opposite of {word}."},
                                 {"role": "assistant", "content": f"Answer: {opposite}."}]})
    out.append({"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What colour is a star?"},
        {"role": "assistant", "content": "Answer: white."}]})
    out.append({"messages": [
        {"role": "user", "content": "What is one plus one?"},
        {"role": "assistant", "content": "Answer: two."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Answer: four."}]})
    for n in range(1, 5):
        out.append({"text": f"Question: what is {NUMBERS[n]} times one? Answer: {NUMBERS[n]}."})
    return out


def main() -> None:
    lines = [json.dumps(e, ensure_ascii=False) for e in examples()]
    path = Path(__file__).with_name("data.jsonl")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} examples to {path}")


if __name__ == "__main__":
    main()
