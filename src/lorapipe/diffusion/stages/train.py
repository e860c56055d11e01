"""train, image task: its recipe (lorapipe.diffusion.recipe.DiffusionRecipe) in the shared
loop."""

from __future__ import annotations


def recipe_class():
    from lorapipe.diffusion.recipe import DiffusionRecipe

    return DiffusionRecipe
