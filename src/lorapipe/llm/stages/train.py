"""train, LLM task: its recipe (lorapipe.llm.training.LlmRecipe) in the shared loop."""

from __future__ import annotations


def recipe_class():
    from lorapipe.llm.training import LlmRecipe

    return LlmRecipe
