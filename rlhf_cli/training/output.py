"""The output folder of a run: refuse to clobber an earlier run, write the resolved config and run info.

Layout (DESIGN.md): config.yaml, run_info.json, metrics.jsonl, checkpoint-<step>/ and the final
model in Hugging Face format at the top.
"""

import hashlib
import json
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

import rlhf_cli
from rlhf_cli.config.loader import to_dict
from rlhf_cli.errors import UserError

RUN_MARKERS = ("config.yaml", "metrics.jsonl")  # files that say "a run lives here"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "tokenizers", "safetensors")


def holds_run(folder: Path) -> bool:
    return any((folder / m).exists() for m in RUN_MARKERS) or any(folder.glob("checkpoint-*"))


def prepare_output_dir(folder: str | Path, resume: bool, overwrite: bool) -> Path:
    """Make the folder ready: new, resumed or cleared. Nothing is deleted unless --overwrite."""
    folder = Path(folder)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one.")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output_dir: {folder} exists and is not a folder.")
    if folder.exists() and holds_run(folder) and not (resume or overwrite):
        raise UserError(
            f"output_dir: {folder} already holds a run. Pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output-dir."
        )
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def config_hash(stage: str, config: Any) -> str:
    text = json.dumps(to_dict(stage, config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str]:
    versions = {"rlhf-cli": rlhf_cli.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_run_files(folder: Path, stage: str, config: Any) -> None:
    """config.yaml (feed it back to `rlhf <stage>` to reproduce the run) and run_info.json."""
    text = yaml.safe_dump(to_dict(stage, config), sort_keys=False)
    (folder / "config.yaml").write_text(text)
    info = {"stage": stage, "config_hash": config_hash(stage, config), "versions": package_versions()}
    (folder / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
