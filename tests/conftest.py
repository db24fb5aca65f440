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


TINY_SFT_CONFIG = """\
stage: sft
model:
  model_name_or_path: builtin:tiny-gpt2
data:
  dataset_name: builtin:reviews
  dataset_format: text
  max_length: 96
  max_train_samples: 6000
  max_eval_samples: 64
training:
  output_dir: {out}
  learning_rate: 5e-3
  warmup_steps: 10
  lr_scheduler_type: cosine
  per_device_train_batch_size: 32
  max_steps: 150
  logging_steps: 50
  save_steps: 1000
"""


@pytest.fixture(scope="session")
def tiny_sft_model(tmp_path_factory) -> Path:
    """builtin:tiny-gpt2 taught the built-in reviews for 150 steps (~30 s): a policy that writes
    review-like text, so RL tests start where real RLHF starts (from an SFT model)."""
    folder = tmp_path_factory.mktemp("tiny-sft")
    config = folder / "sft.yaml"
    config.write_text(TINY_SFT_CONFIG.format(out=folder / "out"))
    result = run_cli("sft", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"
