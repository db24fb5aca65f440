"""The update every online algorithm shares: epochs over a rollout, mini-batches (one optimizer step
each), micro-batches (gradient accumulation), clipping, the NaN/inf policy and the statistics."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.lm.head import TokenStats
from rlhf_cli.online.algorithm import Algorithm, MicroBatch
from rlhf_cli.online.experience import Experience
from rlhf_cli.training.optimizer_step import micro_batch, optimizer_step

log = logging.getLogger(__name__)

# forward(exp, idx, entropy) -> TokenStats of the response tokens (b, T') and values (b, T') or None,
# trimmed to T' columns; entropy is "grad" (in the loss) or "stat" (a statistic, no graph): lm/head.py
Forward = Callable[[Experience, torch.Tensor, str], tuple[TokenStats, torch.Tensor | None]]


class NonFiniteBatch(Exception):
    """NaN/inf found in a rollout's scores, values, log-probs or advantages, before any update
    (the weights are untouched), or in a gradient with `training.skip_nonfinite_batches` off."""


class Updater:
    def __init__(self, model, optimizer, scheduler, accelerator, training: TrainingConfig):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator, self.training = accelerator, training
        self.nonfinite_skips = 0  # rollouts and optimizer steps skipped for NaN/inf (skip_nonfinite_batches)
        self.fp16_overflow_skips = 0  # optimizer steps the fp16 gradient scaler skipped (not faults)

    def update(self, exp: Experience, algorithm: Algorithm, forward: Forward) -> dict[str, float]:
        """algorithm.num_epochs passes over the rollout, each in algorithm.num_mini_batches optimizer steps.

        Sized from the rollout, so any B >= 1 works: each epoch the shuffled rows split into
        min(num_mini_batches, B) near-equal mini-batches, each into micro-batches of at most
        per_device_train_batch_size rows. Statistics are per-token means over the whole update."""
        accelerator, mask = self.accelerator, exp.loss_mask
        rows = len(exp)
        params = [p for p in self.model.parameters() if p.requires_grad]
        sums: dict[str, torch.Tensor] = {}
        tokens = torch.zeros((), device=mask.device)
        self.model.train()
        for _ in range(algorithm.num_epochs):
            order = torch.randperm(rows, device=mask.device)
            for mini_idx in torch.tensor_split(order, min(algorithm.num_mini_batches, rows)):
                micro_batches = self._micro_batches(exp, mini_idx)
                # DDP averages gradients over processes: dividing each process's sum by (all tokens /
                # processes) makes the averaged gradient that of the mean over all tokens
                local_tokens = mask[mini_idx].sum().float()
                all_tokens = accelerator.reduce(local_tokens.clone(), "sum")
                loss_tokens = all_tokens.clamp_min(1) / accelerator.num_processes
                for a, idx in enumerate(micro_batches):
                    sync = micro_batch(accelerator, self.model, last=a == len(micro_batches) - 1)
                    with sync, accelerator.autocast():
                        stats, n = self._micro_step(exp, idx, algorithm, forward, (loss_tokens, local_tokens),
                                                    len(mini_idx))
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value * n
                    tokens = tokens + n
                self._optimizer_step(params)
        means = torch.stack([v / tokens.clamp_min(1) for v in sums.values()])
        means = accelerator.reduce(means, "mean")
        return dict(zip(sums, means.tolist(), strict=True))

    def _micro_batches(self, exp: Experience, mini_idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The mini-batch's rows in micro-batches of per_device_train_batch_size. Which micro-batch a row is
        in does not change the step's gradient (every loss divides by the mini-batch's counts: MicroBatch),
        so where there are several, the rows go longest first (Experience.longest_first): each micro-batch
        is trimmed to its longest row, and a group's rows meet, its prompt run once (lm/shared_prompts.py)."""
        size = self.training.per_device_train_batch_size
        return torch.split(mini_idx if len(mini_idx) <= size else exp.longest_first(mini_idx), size)

    def _micro_step(self, exp: Experience, idx, algorithm: Algorithm, forward: Forward,
                    tokens: tuple[torch.Tensor, torch.Tensor], rows: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward, loss and backward of one micro-batch; returns detached per-token-mean statistics
        and the micro-batch's valid-token count. `tokens`: the mini-batch's valid-token counts (all
        processes' / processes, this process's)."""
        loss_tokens, local_tokens = tokens
        read, values = forward(exp, idx, "grad" if algorithm.entropy_coef else "stat")
        cols = slice(0, read.logprobs.shape[1])  # T' columns: the rest is masked in every row
        mask = exp.loss_mask[idx, cols]
        batch = MicroBatch(idx, cols, read.logprobs, read.entropy, values, mask, loss_tokens, local_tokens, rows)
        loss, stats = algorithm.loss(exp, batch)
        self.accelerator.backward(loss)
        return stats, mask.sum().float()

    def _optimizer_step(self, params) -> None:
        """Clip, step (unless the gradient is NaN/inf), advance the schedule (training/optimizer_step.py)."""
        outcome = optimizer_step(self.accelerator, self.optimizer, params, self.training.max_grad_norm)
        if outcome.fault:  # the same answer on every process: the gradients are all-reduced
            if not self.training.skip_nonfinite_batches:
                raise NonFiniteBatch("the gradient is NaN/inf")
            log.warning("a NaN/inf gradient: skipping this optimizer step (training.skip_nonfinite_batches)")
            self.nonfinite_skips += 1
        elif outcome.overflow:
            log.debug("fp16 gradient overflow: the scaler skipped this step and lowered its scale")
            self.fp16_overflow_skips += 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
