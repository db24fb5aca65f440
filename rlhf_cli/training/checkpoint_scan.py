"""Which checkpoints a run folder holds, which of them are damaged, and which one a resume starts from.

A folder named `checkpoint-<step>` without `trainer_state.json` (written last, before the rename of
`checkpoint-<step>.tmp/`: checkpoint.py) can only come from outside; it is reported and skipped. A
complete-looking checkpoint whose files are damaged (a truncated safetensors or .pt file, a missing weights
file, an unreadable trainer_state.json: a disk that filled up, a copy cut short) is found by
`checkpoint_problem` before anything loads it, reported by file, and skipped by `resume_checkpoint`.
"""

import json
import logging
import re
import shutil
import struct
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Incomplete ones are reported and left out."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        if path.name.endswith(".tmp") and path.is_dir():
            log.warning("%s is a save that never finished (the process stopped while writing it); skipping it.", path)
            continue
        match = CHECKPOINT_RE.match(path.name)
        if not match or not path.is_dir():
            continue
        if not (path / STATE_FILE).is_file():
            log.warning("%s is incomplete (no %s); skipping it.", path, STATE_FILE)
            continue
        found.append((int(match.group(1)), path))
    return sorted(found)


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, or None: its header (8-byte little-endian length, then
    JSON with each tensor's data offsets) must parse and its data must end exactly where the file does.
    Reads the header only, so it is cheap for any size of file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes, shorter than a safetensors header)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"{path} is truncated ({size} bytes; its header alone says {8 + length})"
            header = json.loads(f.read(length))
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError):
        return f"{path} is not a safetensors file (its header is not valid JSON)"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a JSON object)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return f"{path} is not a safetensors file (a tensor entry has no data_offsets)"
    expected = 8 + length + end
    if expected != size:
        what = "truncated" if size < expected else "longer than its header says"
        return f"{path} is {what} ({size} bytes; its header says {expected})"
    return None


def torch_file_problem(path: Path) -> str | None:
    """What is wrong with a `torch.save` file (a zip archive), or None. Opening the archive reads its
    central directory at the end of the file, which a truncated file has lost."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    except zipfile.BadZipFile:
        return f"{path} is truncated or damaged (not a complete torch.save archive)"
    return None


def weights_files(model_dir: Path) -> list[Path] | str:
    """The weights files of a checkpoint's model folder, or what is missing."""
    for name in ("adapter_model.safetensors", "model.safetensors", "diffusion_pytorch_model.safetensors"):
        if (model_dir / name).is_file():
            return [model_dir / name]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is not a valid shard index"
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            return f"{model_dir / missing[0]} is missing (listed in {index.name})"
        return [model_dir / s for s in shards]
    return f"{model_dir} holds no weights (no adapter_model.safetensors, model.safetensors or diffusion_pytorch_model.safetensors)"


def checkpoint_problem(path: Path, required: tuple[str, ...] = ()) -> str | None:
    """What makes a complete-looking checkpoint unusable (the first missing or damaged file), or None.

    `required`: files beyond the ones every checkpoint has, e.g. PPO's `value_head.safetensors`.
    Checks what `load_checkpoint` reads: trainer_state.json, the model weights, optimizer.pt,
    scheduler.pt, extra modules and RNG states -- headers and sizes only, no tensor is loaded."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except OSError as err:
        return f"{state_file} cannot be read ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return f"{state_file} is damaged (not a JSON object with a step)"
    weights = weights_files(path / "model")
    if isinstance(weights, str):
        return weights
    for name in ("optimizer.pt", "scheduler.pt", *required):
        if not (path / name).is_file():
            return f"{path / name} is missing"
    for file in ("optimizer.pt", "scheduler.pt"):
        if problem := torch_file_problem(path / file):
            return problem
    for file in [*weights, *sorted(path.glob("*.safetensors"))]:
        if problem := safetensors_problem(file):
            return problem
    for file in sorted(path.glob("rng_state_*.json")):
        try:
            json.loads(file.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return f"{file} is damaged (not valid JSON)"
    return None


def resume_checkpoint(
    output_dir: Path, required: tuple[str, ...] = (), report: bool = True
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete, undamaged checkpoint (None if there is none) and the newer damaged ones
    that were passed over, each with what is wrong with it (logged when `report`)."""
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path, required)
        if problem is None:
            return path, damaged
        if report:
            log.warning("%s is damaged: %s; skipping it.", path, problem)
        damaged.append((path, problem))
    return None, damaged


def latest_checkpoint(output_dir: Path, required: tuple[str, ...] = ()) -> Path | None:
    """The newest checkpoint a run can resume from (damaged ones are reported and skipped)."""
    return resume_checkpoint(output_dir, required)[0]


def set_aside_damaged(path: Path) -> Path:
    """Rename a damaged checkpoint to `checkpoint-<step>.damaged` (kept for inspection, never listed,
    rotated or resumed from again); returns the new path."""
    target = path.with_name(f"{path.name}.damaged")
    number = 2
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{number}")
        number += 1
    path.rename(target)
    return target


def rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for _, path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)
