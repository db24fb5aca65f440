"""Recipes: several stages (sft -> reward -> ppo -> eval) in one YAML, run by `rlhf run` (docs/recipes.md)."""

from rlhf_cli.recipe.runner import plan, run_recipe
from rlhf_cli.recipe.spec import Recipe, RecipeStage, is_recipe_file, load_recipe

__all__ = ["Recipe", "RecipeStage", "is_recipe_file", "load_recipe", "plan", "run_recipe"]
