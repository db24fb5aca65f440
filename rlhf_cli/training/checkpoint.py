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
Which checkpoints a run folder holds, which are damaged and which one a resume starts from:
`checkpoint_scan.py`.
"""

import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_cli.errors import UserError
from rlhf_cli.models.adapters import save_model_folder
from rlhf_cli.training.checkpoint_scan import STATE_FILE, rotate_checkpoints, weights_files
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

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


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
        files = weights_files(folder)
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
