"""Shared fixtures. Built-in artifacts (the tokenizer) are cached once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m rlhf_cli ARGS` as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rlhf_cli", *args],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def write_yaml(tmp_path):
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return write
