"""Every YAML under configs/ and recipes/ loads and validates (the alignment-handbook lesson)."""

from pathlib import Path

import pytest

from rlhf_cli.cli import candidate_stages
from rlhf_cli.config.loader import build_stage, infer_stage, load_raw

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(
    p for folder in ("configs", "recipes") for p in (REPO / folder).rglob("*.y*ml")
    if "accelerate" not in p.parts
)


def test_there_are_configs():
    assert any(p.name == "quickstart-sft.yaml" for p in YAMLS)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_validates(path):
    stage = infer_stage(path)
    assert stage is not None, f"{path} should declare `stage:` so `rlhf validate` needs no guess"
    assert stage in candidate_stages(load_raw(path))
    build_stage(stage, load_raw(path), str(path))


def test_cli_validate_passes_on_every_yaml(cli):
    for path in YAMLS:
        result = cli("validate", str(path))
        assert result.returncode == 0, f"{path}: {result.stderr}"
