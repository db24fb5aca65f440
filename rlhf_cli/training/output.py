"""The output folder of a run: refuse to clobber an earlier run, write the resolved config and run info,
and compare a resumed run's config with the one it was started with.

Layout (DESIGN.md): config.yaml, run_info.json, metrics.jsonl, checkpoint-<step>/ and the final
model in Hugging Face format at the top.
"""

import hashlib
import json
import logging
import platform
import shutil
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

import rlhf_cli
from rlhf_cli.config.loader import to_dict
from rlhf_cli.errors import UserError

log = logging.getLogger(__name__)

# Files that say "a run lives here": a run that got going logs metrics (or, for `rlhf eval`, writes its
# report; a finished stage its marker). config.yaml and run_info.json alone are what a start that failed
# before training (a bad model path, say) leaves behind: that folder may be reused as it is.
RUN_MARKERS = ("metrics.jsonl", "eval.json", "stage_complete.json")
# What rlhf writes at the top of a folder: a folder with other files and none of these is not ours to delete.
OUTPUT_FILES = (*RUN_MARKERS, "config.yaml", "run_info.json", "samples.jsonl", "recipe_runs.jsonl")
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "tokenizers", "safetensors")


def holds_run(folder: Path) -> bool:
    return any((folder / m).exists() for m in RUN_MARKERS) or any(folder.glob("checkpoint-*"))


def holds_rlhf_output(folder: Path) -> bool:
    return holds_run(folder) or any((folder / m).exists() for m in OUTPUT_FILES)


def prepare_output_dir(folder: str | Path, resume: bool, overwrite: bool) -> Path:
    """Make the folder ready: new, resumed or cleared. Nothing is deleted unless --overwrite, and
    --overwrite deletes only a folder that holds rlhf output (never a folder of other files, nor the
    current folder or one that contains it)."""
    folder = Path(folder)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one.")
    check_output_path(folder)
    if folder.exists() and holds_run(folder) and not (resume or overwrite):
        raise UserError(
            f"output_dir: {folder} already holds a run. Pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output-dir."
        )
    if overwrite and folder.exists():
        _check_deletable(folder)
        try:
            shutil.rmtree(folder)
        except OSError as err:
            raise UserError(f"output_dir: --overwrite could not delete {folder} ({_reason(err)}); "
                            "delete it yourself or choose another --output-dir.") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".rlhf-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir: cannot write to {folder} ({_reason(err)}); choose another --output-dir.") from None
    return folder


def check_output_path(folder: str | Path) -> None:
    """Refuse an output folder that is a file or lies under one (`some_file/out`). Reads only, so every
    process of a launch can call it before anything is created."""
    folder = Path(folder)
    blocker = _file_in_the_way(folder)
    if blocker == folder:
        raise UserError(f"output_dir: {folder} exists and is not a folder; choose another --output-dir.")
    if blocker is not None:
        raise UserError(
            f"output_dir: {folder} cannot be created: {blocker} is a file, not a folder. "
            "Choose another --output-dir (or move that file)."
        )


def _file_in_the_way(folder: Path) -> Path | None:
    """`folder` itself or the nearest of its parents that exists but is not a folder, if any."""
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            return None if path.is_dir() else path
    return None


def _check_deletable(folder: Path) -> None:
    resolved, cwd = folder.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(
            f"output_dir: {folder} is the current folder or contains it; --overwrite will not delete it. "
            "Choose a subfolder as --output-dir."
        )
    if any(folder.iterdir()) and not holds_rlhf_output(folder):
        raise UserError(
            f"output_dir: {folder} holds files but no rlhf run (no config.yaml, metrics.jsonl or checkpoint-*); "
            "--overwrite deletes only earlier runs. Choose another --output-dir (a new or empty folder)."
        )


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


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


def record_loaded_model(folder: Path, description: dict) -> None:
    """run_info.json gets what was loaded (class, dtype, attention kernel): `auto` and null settings
    resolve only at load time, and a run is reproduced from what it really ran with."""
    path = folder / "run_info.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "model": description}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# --resume with another config than the run's: what changed, and what makes resuming meaningless
# ---------------------------------------------------------------------------------------------

# Keys that change where a run writes and how often it logs, saves or evaluates, not what it computes.
IGNORED_ON_RESUME = (
    "training.output_dir", "training.logging_steps", "training.eval_steps", "training.save_steps",
    "training.save_total_limit", "training.report_to", "training.run_name", "training.per_device_eval_batch_size",
    "ppo.sample_steps", "ppo.num_sample_rows", "peft.save_merged",
)
# The length of the run: extending it is what --resume is often for.
RUN_LENGTH_KEYS = ("training.max_steps", "training.num_train_epochs", "ppo.total_episodes")
# Keys whose change leaves the checkpoint meaningless (refused unless --allow-config-change), by reason.
# A key ending in "." is a prefix (a whole section); EVAL_ONLY_DATA keys of that section only change evaluation.
MEANINGLESS_ON_RESUME = {
    "model.model_name_or_path": "the checkpoint holds weights of another model",
    "model.revision": "the checkpoint holds weights of another model",
    "model.tokenizer_name_or_path": "token ids would mean other tokens",
    "peft.use_peft": "the checkpoint holds other trainable weights (full model vs adapter)",
    "peft.lora_r": "the checkpoint's adapter has another shape",
    "peft.lora_target_modules": "the checkpoint's adapter sits on other layers",
    "peft.lora_alpha": "the same adapter weights would compute another update",
    "data.": "the checkpoint's data position counts through the old data",
    "training.seed": "the data order is drawn from the seed",
    "training.per_device_train_batch_size": "the checkpoint's data position counts batches of the old size",
    "training.gradient_accumulation_steps": "the checkpoint's data position counts batches of the old size",
    "ppo.num_mini_batches": "the rollout batch (and the data position) is sized by it",
    "grpo.num_generations": "the rollout batch (and the data position) is sized by it",
    "grpo.steps_per_generation": "the rollout batch (and the data position) is sized by it",
    "rloo.num_generations": "the rollout batch (and the data position) is sized by it",
    "rloo.steps_per_generation": "the rollout batch (and the data position) is sized by it",
}
EVAL_ONLY_DATA = ("data.dataset_test_split", "data.max_eval_samples")
# Changed keys whose new value a resumed run does not use: the checkpoint's state wins (said in the warning).
# (only with ppo.adaptive_kl: a fixed coefficient is configuration and the new value applies)
CHECKPOINT_WINS = {"ppo.kl_coef": "with ppo.adaptive_kl the checkpoint's adapted coefficient is restored (ppo/kl.py)"}


@dataclass
class ConfigChanges:
    """How the config a run resumes with differs from the run's config.yaml (`key: old -> new` texts)."""

    meaningless: list[str] = field(default_factory=list)  # each with its reason
    run_length: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.meaningless or self.run_length or self.other)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _meaningless_reason(key: str) -> str | None:
    if key in EVAL_ONLY_DATA:
        return None
    for pattern, reason in MEANINGLESS_ON_RESUME.items():
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)):
            return reason
    return None


def read_run_config(folder: Path) -> dict | None:
    """The run's config.yaml as a mapping, or None when it is missing or unreadable."""
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def resume_config_changes(old: dict, stage: str, config: Any) -> ConfigChanges:
    """Compare a run's config.yaml with the config it resumes with (both resolved, every key).

    A key that only one side has (added or removed by another version of rlhf) is no change, as for
    `rlhf run` (recipe/runner.py)."""
    new = flatten(json.loads(json.dumps(to_dict(stage, config), default=str)))
    old = flatten(old)
    changes = ConfigChanges()
    for key in sorted(set(old) & set(new)):
        if old[key] == new[key] or key in IGNORED_ON_RESUME:
            continue
        text = f"{key}: {_shown(old[key])} -> {_shown(new[key])}"
        if key in RUN_LENGTH_KEYS:
            changes.run_length.append(text)
        elif (reason := _meaningless_reason(key)) is not None:
            changes.meaningless.append(f"{text} ({reason})")
        elif key in CHECKPOINT_WINS and new.get("ppo.adaptive_kl"):
            changes.other.append(f"{text} (no effect: {CHECKPOINT_WINS[key]})")
        else:
            changes.other.append(text)
    return changes


def check_resume_config(
    folder: Path, stage: str, config: Any, checkpoint: Path, allow_change: bool, report: bool = True
) -> ConfigChanges | None:
    """Say which keys differ from the run's config.yaml (when `report`: the main process); refuse
    (UserError) a config of another stage, and changes that leave the checkpoint meaningless unless
    `allow_change` (--allow-config-change). Returns the changes (None without a config.yaml)."""
    old = read_run_config(folder)
    if old is None:
        if report:
            log.warning("--resume: %s has no readable config.yaml; the config cannot be compared with the run's.", folder)
        return None
    if old.get("stage", stage) != stage:
        raise UserError(
            f"--resume: {folder} holds an `rlhf {old['stage']}` run, not `rlhf {stage}`; its checkpoints cannot "
            f"continue as `rlhf {stage}`. Choose another --output-dir (or --overwrite to replace that run)."
        )
    changes = resume_config_changes(old, stage, config)
    if changes.meaningless and not allow_change:
        listed = "; ".join(changes.meaningless)
        raise UserError(
            f"--resume: the config differs from the one {folder} was started with, in ways that make its "
            f"checkpoint {checkpoint.name} meaningless: {listed}. Put those keys back (the run's config is "
            f"{folder / 'config.yaml'}), start a new run (another --output-dir, or --overwrite), or pass "
            "--allow-config-change to resume anyway."
        )
    if not report:
        return changes
    for text in changes.meaningless:
        log.warning("--resume --allow-config-change: %s", text)
    for text in changes.run_length:
        log.info("--resume: run length changed: %s", text)
    for text in changes.other:
        applies = "" if "(no effect:" in text else " (applies from here on)"
        log.warning("--resume: config changed since %s: %s%s", checkpoint.name, text, applies)
    return changes


def keep_previous_config(folder: Path, checkpoint: Path) -> Path | None:
    """Before a resumed run with a changed config writes its config.yaml, keep the old one as
    `config.<checkpoint>.yaml`: the config the run had up to that checkpoint."""
    source = folder / "config.yaml"
    if not source.is_file():
        return None
    target = folder / f"config.{checkpoint.name}.yaml"
    shutil.copyfile(source, target)
    return target
