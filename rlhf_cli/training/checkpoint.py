"""Resumable checkpoints, written atomically, safetensors for weights, `weights_only` loading.

A checkpoint `checkpoint-<step>/` holds:
    model/                      the model in Hugging Face format (a PEFT adapter folder for adapters)
    <name>.safetensors          extra modules (e.g. a value head)
    optimizer.pt, scheduler.pt  optimizer/scheduler state (tensors and numbers only; loaded weights_only)
    rng_state_<rank>.json/.safetensors   Python/NumPy and torch RNG states of every process
    trainer_state.json          step counters, data position, controller state; written last

It is written to `checkpoint-<step>.tmp/` and renamed when complete, so a folder named
`checkpoint-<step>` without `trainer_state.json` can only come from outside; it is reported and skipped.
"""

import json
import logging
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_model_folder(model, folder: Path, tokenizer=None) -> None:
    """The model as `transformers`/`peft` load it: config + safetensors (+ tokenizer files)."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


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
) -> Path:
    """Write checkpoint-<step> from every process (each saves its RNG), then publish it by rename."""
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
    if accelerator.is_main_process:
        save_model_folder(accelerator.unwrap_model(model), tmp / "model", tokenizer)
        for name, module in (extra_modules or {}).items():
            save_file(_module_state(accelerator.unwrap_model(module)), tmp / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def rotate_checkpoints(output_dir: Path, limit: int | None) -> None:
    if limit is None:
        return
    for _, path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def load_weights_into(model, folder: Path) -> None:
    """Load a checkpoint's model folder into an already-built model (full weights or a PEFT adapter)."""
    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    state = load_file(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    untied_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if untied_missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {untied_missing}, unexpected {unexpected}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def load_checkpoint(
    path: Path, accelerator, model, optimizer, scheduler, extra_modules: dict[str, torch.nn.Module] | None = None
) -> dict[str, Any]:
    """Restore everything save_checkpoint wrote; returns the trainer state."""
    load_weights_into(accelerator.unwrap_model(model), path / "model")
    for name, module in (extra_modules or {}).items():
        accelerator.unwrap_model(module).load_state_dict(load_file(path / f"{name}.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank = accelerator.process_index
    rng_json = path / f"rng_state_{rank}.json"
    if rng_json.exists():
        set_rng_state(json.loads(rng_json.read_text()), load_file(path / f"rng_state_{rank}.safetensors"))
    else:
        log.warning("%s has no RNG state for process %d (different number of processes?)", path, rank)
    return json.loads((path / STATE_FILE).read_text())
