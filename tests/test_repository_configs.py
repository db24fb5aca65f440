"""Every YAML under configs/ and recipes/ loads and validates (the alignment-handbook lesson): stage
configs as their stage, recipes (files with `stages:`) as recipes -- every stage's config with its
overrides and placeholders."""

from pathlib import Path

import pytest
from conftest import run_in_process

from rlhf_cli.cli import candidate_stages
from rlhf_cli.config.loader import build_stage, infer_stage, load_raw
from rlhf_cli.recipe import is_recipe_file, load_recipe

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(
    p for folder in ("configs", "recipes") for p in (REPO / folder).rglob("*.y*ml")
    if "accelerate" not in p.parts
)
RECIPES = [p for p in YAMLS if is_recipe_file(p)]
STAGE_CONFIGS = [p for p in YAMLS if p not in RECIPES]


def test_there_are_configs():
    assert any(p.name == "quickstart-sft.yaml" for p in STAGE_CONFIGS)
    assert any(p.parent.name == "quickstart" and p.name == "recipe.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates(path):
    recipe = load_recipe(path)
    for stage in recipe.stages:  # every config file a recipe names is in the repository, not elsewhere
        assert REPO in stage.config_file.resolve().parents, stage.config_file


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_validates(path):
    stage = infer_stage(path)
    assert stage is not None, f"{path} should declare `stage:` so `rlhf validate` needs no guess"
    assert stage in candidate_stages(load_raw(path))
    build_stage(stage, load_raw(path), str(path))


def test_cli_validate_passes_on_every_yaml(monkeypatch, capsys):
    """`rlhf validate FILE` through the real CLI, in this process (a subprocess each is ~4 s of
    interpreter and import time; tests/test_cli.py runs `rlhf validate` as a subprocess)."""
    for path in YAMLS:
        code, stderr = run_in_process(monkeypatch, capsys, "validate", str(path))
        assert code == 0, f"{path}: {stderr}"
