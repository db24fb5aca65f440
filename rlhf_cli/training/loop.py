"""The shared supervised loop of `rlhf sft` and `rlhf reward`.

One linear loop: fetch the micro-batches of one optimizer step -> forward/backward each (loss
normalised by the items of the whole step, across processes) -> clip -> step -> log / evaluate /
checkpoint. The data order is a pure function of (seed, micro-batch index), so a run resumed from
step s sees exactly the batches an uninterrupted run sees after s.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.errors import UserError
from rlhf_cli.training.accel import replica_checksum
from rlhf_cli.training.cadence import RunCadence
from rlhf_cli.training.checkpoint import load_checkpoint, save_checkpoint
from rlhf_cli.training.metrics import MetricsWriter
from rlhf_cli.training.optim import make_optimizer, make_scheduler, total_steps
from rlhf_cli.training.optimizer_step import micro_batch, optimizer_step
from rlhf_cli.training.progress import StepProgress
from rlhf_cli.training.sharding import check_shardable

log = logging.getLogger(__name__)


class Objective(Protocol):
    """What a stage plugs into the loop."""

    def num_items(self, batch: dict) -> int:
        """Items the loss averages over in this micro-batch (trainable tokens, pairs, ...)."""

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(sum of the per-item losses, metric sums). Keys named min_*/max_* are reduced by min/max."""

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Metric sums of a logging window -> the logged metrics (means, accuracies...)."""


@dataclass
class BatchOrder:
    """Micro-batch m of process `rank`: a deterministic slice of a per-epoch permutation."""

    num_rows: int
    batch_size: int
    world_size: int
    rank: int
    seed: int
    _cache: dict = field(default_factory=dict)

    @property
    def batches_per_epoch(self) -> int:
        # drop the tail so every process runs the same number of steps
        return self.num_rows // (self.batch_size * self.world_size)

    def indices(self, micro_batch: int) -> list[int]:
        epoch, b = divmod(micro_batch, self.batches_per_epoch)
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = {epoch: torch.randperm(self.num_rows, generator=generator).tolist()}
        start = (b * self.world_size + self.rank) * self.batch_size
        return self._cache[epoch][start : start + self.batch_size]


def _reduce(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Sum (or min/max) metric sums over processes."""
    if accelerator.num_processes == 1:
        return dict(sums)
    out = {}
    for key, value in sums.items():
        op = "min" if key.startswith("min_") else "max" if key.startswith("max_") else "sum"
        t = torch.tensor(float(value), device=accelerator.device)
        if op == "sum":
            out[key] = accelerator.reduce(t, "sum").item()
        else:
            gathered = accelerator.gather(t.reshape(1))
            out[key] = (gathered.min() if op == "min" else gathered.max()).item()
    return out


def _accumulate(into: dict[str, float], sums: dict[str, float]) -> None:
    for key, value in sums.items():
        if key.startswith("min_"):
            into[key] = min(into.get(key, math.inf), value)
        elif key.startswith("max_"):
            into[key] = max(into.get(key, -math.inf), value)
        else:
            into[key] = into.get(key, 0.0) + value


def loss_fault(accelerator, loss: float) -> str | None:
    """Why this step's loss is unusable (NaN/inf, on any process), agreed by every process; None when finite."""
    local = 0.0 if math.isfinite(loss) else 1.0
    if accelerator.num_processes > 1:
        local = accelerator.reduce(torch.tensor(local, device=accelerator.device), "max").item()
    if local:
        return f"the loss is {loss} (NaN/inf)" if not math.isfinite(loss) else "the loss is NaN/inf on another process"
    return None


def nonfinite_message(fault: str, step: int, output_dir: Path, option: str) -> str:
    """The one line a run stopped by a numerical fault ends with: what, where, the last good checkpoint, what to do."""
    from rlhf_cli.training.checkpoint_scan import latest_checkpoint

    last = latest_checkpoint(output_dir)
    where = f"the last good checkpoint is {last} (resume with --resume)" if last else "no checkpoint was written yet"
    return (f"step {step}: {fault}; the run stopped without saving the broken weights, {where}. "
            f"Lower training.learning_rate, check the data and rewards, or set {option}: true to skip such batches.")


def train_loop(
    *,
    accelerator,
    model,
    objective: Objective,
    train_dataset: Dataset,
    collate: Callable[[list], dict],
    training: TrainingConfig,
    output_dir: Path,
    evaluate: Callable[[Any], dict[str, float]] | None,
    resume_from: Path | None,
    metrics: MetricsWriter,
    progress_keys: tuple[str, ...],
    tokenizer=None,
    description: str = "train",
) -> dict[str, Any]:
    """Train `model` for the configured steps; returns the trainer state at the end."""
    # 1. Data order, schedule, optimizer
    order = BatchOrder(
        len(train_dataset), training.per_device_train_batch_size, accelerator.num_processes,
        accelerator.process_index, training.seed,
    )
    if order.batches_per_epoch == 0:
        raise UserError(
            f"the training set has {len(train_dataset)} rows, fewer than one batch "
            f"(per_device_train_batch_size {training.per_device_train_batch_size} x {accelerator.num_processes} "
            "processes); lower the batch size or add data."
        )
    total = total_steps(training, order.batches_per_epoch)
    optimizer = make_optimizer(model.parameters(), training)
    scheduler = make_scheduler(optimizer, training, total)
    check_shardable(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    # 2. Resume
    state: dict[str, Any] = {"step": 0, "totals": {}}
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, optimizer, scheduler)
        metrics.truncate_after(state["step"])
        log.info("resumed from %s at step %d", resume_from, state["step"])
    step, totals = state["step"], state["totals"]

    # 3. The loop, in the shared run skeleton (training/cadence.py: log / evaluate / checkpoint / signals)
    def save(at: int) -> Path:
        return save_checkpoint(output_dir, at, accelerator, model, optimizer, scheduler, {"totals": totals},
                               tokenizer=tokenizer, save_total_limit=training.save_total_limit)

    def evaluate_and_log(at: int) -> None:
        metrics.log(at, evaluate(model))
        model.train()

    accum = training.gradient_accumulation_steps
    progress = StepProgress(total, description, progress_keys, enabled=accelerator.is_main_process, start=step)
    cadence = RunCadence(total=total, training=training, accelerator=accelerator, metrics=metrics,
                         progress=progress, save=save, evaluate=evaluate_and_log if evaluate is not None else None)
    window: dict[str, float] = {}
    window_start = time.perf_counter()
    model.train()
    while step < total:
        micro = [
            {k: v.to(accelerator.device) for k, v in collate([train_dataset[i] for i in order.indices(step * accum + j)]).items()}
            for j in range(accum)
        ]
        local_items = sum(objective.num_items(b) for b in micro)
        all_items = accelerator.reduce(torch.tensor(float(local_items), device=accelerator.device), "sum").item()
        # DDP averages gradients over processes; scaling by world/all_items turns that into a mean per item.
        scale = accelerator.num_processes / max(all_items, 1.0)
        step_sums: dict[str, float] = {}
        step_loss = torch.zeros((), device=accelerator.device)
        for j, batch in enumerate(micro):
            sync = micro_batch(accelerator, model, last=j == accum - 1)
            with sync, accelerator.autocast():
                loss_sum, sums = objective.loss(model, batch)
                accelerator.backward(loss_sum * scale)
            _accumulate(step_sums, sums)
            step_loss = step_loss + loss_sum.detach().float()
        lr = scheduler.get_last_lr()[0]
        fault = loss_fault(accelerator, step_loss.item())  # a NaN loss is a fault under any precision
        outcome = None if fault else optimizer_step(accelerator, optimizer, params, training.max_grad_norm)
        fault = fault or outcome.fault
        if fault:
            if not training.skip_nonfinite_batches:
                raise cadence.fail(nonfinite_message(fault, step + 1, output_dir, "training.skip_nonfinite_batches"))
            log.warning("step %d: %s; skipping the batch (training.skip_nonfinite_batches).", step + 1, fault)
            _accumulate(totals, {"nonfinite_skips": 1.0})
            step_sums = {}
        elif outcome.overflow:  # fp16: the scaler skipped the step and lowered its scale, as designed
            log.debug("step %d: fp16 gradient overflow; the scaler skipped the step and lowered its scale", step + 1)
            _accumulate(totals, {"fp16_overflow_skips": 1.0})
        grad_norm = outcome.grad_norm if outcome is not None and outcome.applied else None
        _accumulate(window, step_sums)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if grad_norm is not None:
            _accumulate(window, {"grad_norm_sum": float(grad_norm), "grad_norm_count": 1.0})

        # 4. Log, evaluate, checkpoint
        row = None
        if cadence.log_due(step):
            reduced = _reduce(accelerator, window)
            _accumulate(totals, {k: v for k, v in reduced.items() if k.startswith("num_")})
            row = objective.finalize(reduced) if reduced else {}  # empty: every batch of the window was skipped
            elapsed = time.perf_counter() - window_start
            for key, value in reduced.items():
                if key.startswith("num_"):
                    row[key] = totals[key]  # cumulative counts, as TRL logs num_tokens
                    row[f"{key.removeprefix('num_')}_per_s"] = value / elapsed if elapsed > 0 else 0.0
            if "grad_norm_count" in reduced:
                row["grad_norm"] = reduced["grad_norm_sum"] / reduced["grad_norm_count"]
            row["learning_rate"] = lr
            for key in ("nonfinite_skips", "fp16_overflow_skips"):
                if key in totals:
                    row[key] = totals[key]
            row["epoch"] = step * accum / order.batches_per_epoch
            window, window_start = {}, time.perf_counter()
        paused = time.perf_counter()  # time spent evaluating and checkpointing is not training throughput
        cadence.after_step(step, row)
        window_start += time.perf_counter() - paused
    cadence.close()

    # 5. Final evaluation and checkpoint (the final model itself is written by the stage)
    if evaluate is not None:
        final_eval = evaluate(model)
        metrics.log(step, final_eval)
        state["eval"] = final_eval
    save(step)
    state.update(step=step, totals=totals, model=model, weights_checksum=replica_checksum(accelerator, model))
    return state
