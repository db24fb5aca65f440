"""Resumable checkpoints, written atomically, safetensors for weights, `weights_only` loading.

A checkpoint `checkpoint-<step>/` holds:
    model/                      the model in Hugging Face format (a PEFT adapter folder for adapters)
    <name>.safetensors          extra modules (e.g. a value head)
    optimizer.pt, scheduler.pt  optimizer/scheduler state (tensors and numbers only; loaded weights_only);
                                under FSDP the whole optimizer state keyed by parameter name; under
                                DeepSpeed only which ZeRO stage and how many processes wrote the checkpoint:
    deepspeed/                  (DeepSpeed only) the engine's own checkpoint, each process's optimizer shard
    rng_state_<rank>.json/.safetensors   Python/NumPy and torch RNG states of every process
    trainer_state.json          step counters, data position, controller state; written last

It is written to `checkpoint-<step>.tmp/` and renamed when complete, so a folder named
`checkpoint-<step>` without `trainer_state.json` can only come from outside; it is reported and skipped.
A complete-looking checkpoint whose files are damaged (a truncated safetensors or .pt file, a missing
weights file, an unreadable trainer_state.json: a disk that filled up, a copy cut short) is found by
`checkpoint_problem` before anything loads it, reported by file, and skipped by `resume_checkpoint`.
"""

import json
import logging
import os
import random
import re
import shutil
import struct
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_cli.errors import UserError
from rlhf_cli.models.adapters import save_model_folder
from rlhf_cli.training.sharding import (
    adapter_state_for_model,
    full_model_state,
    is_sharded,
    load_full_model_state,
    load_optimizer_state,
    optimizer_state,
    zero_stage,
)

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    accelerator,
    model,
    optimizer,
    scheduler,
    state: dict[str, Any],
    extra_modules: dict[str, torch.nn.Module] | None = None,
    tokenizer=None,
    save_total_limit: int | None = None,
    trained: torch.nn.Module | None = None,
) -> Path:
    """Write checkpoint-<step> from every process (each saves its RNG), then publish it by rename.
    `trained`: the prepared module whose parameters the optimizer holds, where that is more than `model`
    (the online stages' policy with its value head); FSDP names the optimizer state by it."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    plain, tensors = rng_state()
    rank = accelerator.process_index
    (tmp / f"rng_state_{rank}.json").write_text(json.dumps(plain))
    save_file(tensors, tmp / f"rng_state_{rank}.safetensors")
    gathered = full_model_state(accelerator, model)  # FSDP, ZeRO-3: the whole weights (collective); else None
    gathered_extra = {name: full_model_state(accelerator, module) for name, module in (extra_modules or {}).items()}
    if zero_stage(accelerator):  # the engine writes its sharded optimizer state itself, every process its part
        accelerator.deepspeed_engine_wrapped.engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        optimizer_saved = {"deepspeed": _deepspeed_engine(accelerator)}
    else:
        optimizer_saved = optimizer_state(accelerator, trained or model, optimizer)
    if accelerator.is_main_process:
        save_model_folder(accelerator.unwrap_model(model), tmp / "model", tokenizer, gathered)
        for name, module in (extra_modules or {}).items():
            weights = gathered_extra[name]
            save_file(weights if weights is not None else _module_state(accelerator.unwrap_model(module)),
                      tmp / f"{name}.safetensors")
        torch.save(optimizer_saved, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    _test_pause()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        rotate_checkpoints(output_dir, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def _test_pause() -> None:
    """Tests set RLHF_TEST_SLOW_SAVE=<seconds> to kill a process inside a save (every file written
    but trainer_state.json, before the rename)."""
    seconds = os.environ.get("RLHF_TEST_SLOW_SAVE")
    if seconds:
        print(f"RLHF_TEST_SLOW_SAVE: pausing {seconds}s inside the save", file=sys.stderr, flush=True)
        time.sleep(float(seconds))


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


def _weights_files(model_dir: Path) -> list[Path] | str:
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
    weights = _weights_files(path / "model")
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


def load_weights_into(model, folder: Path, accelerator=None) -> None:
    """Load a checkpoint's model folder into an already-built model (full weights or a PEFT adapter);
    with `accelerator`, `model` is the prepared model (each process keeps its shard under FSDP).

    Weights that do not fit the model (another model or adapter shape than the checkpoint's: a config
    changed with --allow-config-change) are a UserError naming the folder."""
    adapter = folder / "adapter_model.safetensors"
    plain = accelerator is None or not is_sharded(accelerator)
    if accelerator is not None and plain:
        model = accelerator.unwrap_model(model)
    try:
        if adapter.exists() and not plain:
            module = accelerator.unwrap_model(model)
            load_full_model_state(accelerator, model, adapter_state_for_model(module, load_file(adapter)))
            return
        if adapter.exists():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(adapter))
            return
        files = _weights_files(folder)
        if isinstance(files, str):
            raise UserError(f"{files}; the checkpoint cannot be resumed.")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        missing, unexpected = (model.load_state_dict(state, strict=False) if plain
                               else load_full_model_state(accelerator, model, state))
    except RuntimeError as err:  # shapes that differ: torch's message lists them
        raise _mismatch(folder, str(err).splitlines()[0]) from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    untied_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if untied_missing or unexpected:
        raise _mismatch(folder, f"missing {untied_missing[:3]}, unexpected {unexpected[:3]}")
    if plain and hasattr(model, "tie_weights"):
        model.tie_weights()


def _mismatch(where: Path, detail: str) -> UserError:
    return UserError(
        f"{where} does not fit the model this config builds ({detail}): the model or adapter settings "
        "changed since the checkpoint was written. Resume with the config it was written with, or start "
        "a new run (--overwrite or another --output-dir)."
    )


HYPERPARAMETERS = ("betas", "eps", "weight_decay", "initial_lr")


def _keep_config_hyperparameters(optimizer, scheduler, fresh_groups: list[dict], fresh_base_lrs: list | None) -> None:
    """After loading a checkpoint's optimizer and scheduler, put back the hyperparameters of the config
    the run resumes with (torch restores the checkpoint's, so a changed learning rate would silently
    not apply). The step count, Adam moments and schedule position stay the checkpoint's. With an
    unchanged config every value is the one the checkpoint holds, bit for bit."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        for key in HYPERPARAMETERS:
            if key in fresh:
                group[key] = fresh[key]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if fresh_base_lrs is None or lambdas is None or len(fresh_base_lrs) != len(optimizer.param_groups):
        return
    scheduler.base_lrs = list(fresh_base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(fresh_base_lrs, lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _deepspeed_engine(accelerator) -> dict[str, int] | None:
    """What a DeepSpeed checkpoint can be resumed under: the same ZeRO stage on as many processes."""
    stage = zero_stage(accelerator)
    return {"zero_stage": stage, "processes": accelerator.num_processes} if stage else None


def _described(engine: dict[str, int] | None) -> str:
    if engine is None:
        return "without DeepSpeed"
    return f"under DeepSpeed ZeRO-{engine['zero_stage']} on {engine['processes']} processes"


def load_checkpoint(
    path: Path, accelerator, model, optimizer, scheduler, extra_modules: dict[str, torch.nn.Module] | None = None,
    trained: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Restore everything save_checkpoint wrote; returns the trainer state.

    The optimizer's hyperparameters (learning rate, betas, eps, weight decay) are the config's, not the
    checkpoint's: see _keep_config_hyperparameters."""
    # taken first: DeepSpeed's checkpoint restores its optimizer's hyperparameters with its state
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    fresh_base_lrs = list(scheduler.base_lrs) if hasattr(scheduler, "base_lrs") else None
    optimizer_saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    running = _deepspeed_engine(accelerator)
    written = optimizer_saved.get("deepspeed") if isinstance(optimizer_saved, dict) else None
    if written != running:
        raise UserError(f"{path} was written {_described(written)}, and this run is {_described(running)}: "
                        "resume it as it was launched (the same accelerate config), or start a new run "
                        "(--overwrite or another --output-dir).")
    if running is None:
        load_weights_into(model, path / "model", accelerator)
    else:  # the engine's own checkpoint holds the weights and this process's part of the optimizer state
        accelerator.deepspeed_engine_wrapped.engine.load_checkpoint(
            str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    engine_held = {id(p) for p in accelerator.unwrap_model(trained or model).parameters()} if running else set()
    for name, module in (extra_modules or {}).items():
        if engine_held and all(id(p) in engine_held for p in module.parameters()):
            continue  # part of the engine's module: its checkpoint has restored it
        try:
            missing, unexpected = load_full_model_state(accelerator, module, load_file(path / f"{name}.safetensors"))
            if missing or unexpected:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        except RuntimeError as err:
            raise _mismatch(path / f"{name}.safetensors", str(err).splitlines()[0]) from None
    try:
        if running is None:
            load_optimizer_state(accelerator, trained or model, optimizer, optimizer_saved)
    except (ValueError, RuntimeError) as err:  # another number or shape of trainable parameters
        raise _mismatch(path / "optimizer.pt", str(err).splitlines()[0]) from None
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _keep_config_hyperparameters(optimizer, scheduler, fresh_groups, fresh_base_lrs)
    rank = accelerator.process_index
    rng_json = path / f"rng_state_{rank}.json"
    if rng_json.exists():
        set_rng_state(json.loads(rng_json.read_text()), load_file(path / f"rng_state_{rank}.safetensors"))
    else:
        log.warning("%s has no RNG state for process %d (different number of processes?)", path, rank)
    return json.loads((path / STATE_FILE).read_text())
