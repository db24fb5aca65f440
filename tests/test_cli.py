"""The `rlhf` command as a user runs it: help, validate, exit codes, messages without tracebacks."""

from pathlib import Path

import pytest

from rlhf_cli.config.reference import markdown_reference
from rlhf_cli.config.schema import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in (*STAGES, "validate"):
        assert command in result.stdout


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_shows_config_keys_with_their_help(cli, stage):
    result = cli(stage, "--help")
    assert result.returncode == 0
    assert "--set KEY=VALUE" in result.stdout and "--resume" in result.stdout
    assert "--allow-config-change" in result.stdout
    assert "Dtype the weights are loaded in" in result.stdout or stage in ("eval", "ddpo")
    assert "Sampling temperature" in result.stdout or stage in ("sft", "reward", "dpo", "ddpo")
    assert "DDIM eta" in result.stdout or stage != "ddpo"
    assert "beta" in result.stdout or stage != "dpo"


def test_validate_ok_and_typo(cli, write_yaml):
    ok = write_yaml("ok.yaml", "stage: ppo\nreward:\n  function: builtin:sentiment\n")
    result = cli("validate", str(ok))
    assert result.returncode == 0, result.stderr
    assert "valid `rlhf ppo` config" in result.stdout
    typo = write_yaml("typo.yaml", "ppo:\n  kl_coeff: 0.1\n")
    result = cli("validate", str(typo))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: ppo.kl_coeff: unknown key; did you mean ppo.kl_coef?"


def test_validate_refuses_an_empty_file(cli, write_yaml):
    """An empty file used to validate as an `rlhf sft` config of all defaults."""
    empty = write_yaml("empty.yaml", "# nothing here yet\n")
    result = cli("validate", str(empty))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: {empty}: the config file is empty")


def test_validate_infers_stage_from_sections(cli, write_yaml):
    result = cli("validate", str(write_yaml("sft.yaml", "data:\n  packing: true\n")))
    assert result.returncode == 0 and "rlhf sft" in result.stdout


def test_user_errors_exit_2_without_traceback(cli, tmp_path, write_yaml):
    for args in (
        ("sft", str(tmp_path / "missing.yaml")),
        ("sft", str(write_yaml("bad.yaml", "training: {seed: -3}\n"))),
        ("sft", str(write_yaml("ok.yaml", "{}\n")), "--set", "training.seed"),
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_unknown_command_and_option_exit_2(cli):
    assert cli("sfty").returncode == 2
    assert cli("sft", "--bogus").returncode == 2


def test_config_reference_doc_is_current():
    """docs/config-reference.md is generated from the field metadata; regenerate it when this fails:
    python -m rlhf_cli.config.reference > docs/config-reference.md"""
    assert (REPO / "docs" / "config-reference.md").read_text() == markdown_reference()
