"""What an online algorithm is to the engine: how experience becomes advantages, and the loss of a
micro-batch. Everything else (sampling, forwards, mini-batches, optimizer steps) is shared.

An algorithm is one small class (ppo/algorithm.py, online/grpo.py, online/rloo.py):

    uses_critic          values are computed and trained (a value head or a separate critic)
    uses_reference       reference log-probs are needed (False: no reference model is loaded)
    num_epochs           passes over each rollout batch
    num_mini_batches     optimizer steps per pass
    prepare(exp, ctx)    -> statistics; sets exp.advantages (and exp.returns for a critic)
    loss(exp, batch)     -> (scalar loss to backward, per-token-mean statistics)
    finish(exp, stats)   after the update (e.g. the adaptive KL controller)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_cli.lm.masking import masked_mean, masked_sum


@dataclass
class MicroBatch:
    """One micro-batch of an update, as the loss sees it (b rows, T' <= T columns).

    `tokens`: the valid-token count of the whole mini-batch over all processes, divided by the
    number of processes (DDP averages gradients, so dividing each process's summed loss by it gives
    the gradient of the mean over every token); `local_tokens`: the mini-batch's valid tokens on this
    process alone; `rows`: the mini-batch's rows on this process."""

    idx: Tensor  # (b,) rows of the experience
    cols: slice  # the first T' response columns: the rest is padding in every one of these rows
    logprobs: Tensor  # (b, T') log-probs of the response tokens at the sampling temperature, with grad
    entropy: Tensor  # (b, T') at the sampling temperature; with grad only if the algorithm's entropy_coef > 0
    values: Tensor | None  # (b, T') with grad (algorithms with a critic)
    mask: Tensor  # (b, T') bool: the loss mask
    tokens: Tensor  # () see above
    local_tokens: Tensor  # () the mini-batch's valid tokens on this process
    rows: int

    def take(self, x: Tensor) -> Tensor:
        """Rows and columns of a (B, T) experience tensor for this micro-batch."""
        return x[self.idx, self.cols]


class Algorithm:
    uses_critic = False
    num_epochs = 1
    num_mini_batches = 1
    entropy_coef = 0.0  # > 0: an entropy bonus in the loss (its gradient is computed)

    @property
    def uses_reference(self) -> bool:
        return True

    def prepare(self, exp, ctx) -> dict[str, float]:
        raise NotImplementedError

    def loss(self, exp, batch: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def finish(self, exp, ctx, stats: dict[str, float]) -> None:
        """After the update; the default does nothing."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def entropy_term(batch: MicroBatch, coef: float) -> tuple[Tensor, Tensor]:
    """(-coef x summed entropy / batch.tokens to add to the loss, mean entropy statistic).

    Without a coefficient the entropy is only a statistic: the updater computed it without an
    autograd graph (no backward through a (b, T, V) softmax)."""
    statistic = masked_mean(batch.entropy.detach(), batch.mask)
    if coef:
        return -coef * masked_sum(batch.entropy, batch.mask) / batch.tokens, statistic
    return torch.zeros((), device=batch.entropy.device), statistic
