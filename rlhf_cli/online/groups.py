"""What the critic-free group algorithms (GRPO, RLOO) share: several responses per prompt, an
outcome advantage per response broadcast over its tokens, a clipped importance ratio with an
optional upper clip (`epsilon_high`), an optional KL term, and TRL's metric names (docs/grpo.md).

Rows of one prompt are consecutive (OnlineTrainer.generate repeats each query num_generations
times) and a rollout batch holds whole groups on each process, so a group is a view (-1, G).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_cli.lm.masking import masked_mean, masked_sum
from rlhf_cli.online.algorithm import Algorithm, MicroBatch, entropy_term
from rlhf_cli.ppo.kl import kl_per_token

ADVANTAGE_EPS = 1e-4  # added to a reward std before dividing (TRL's); an all-equal group gets 0 anyway


def grouped(x: Tensor, group_ids: Tensor | None, size: int) -> Tensor:
    """(B,) -> (B / size, size), checking that each row of the view is one prompt's group."""
    if x.shape[0] % size:
        raise ValueError(f"{x.shape[0]} responses are not whole groups of {size}")
    if group_ids is not None:
        ids = group_ids.view(-1, size)
        if not bool((ids == ids[:, :1]).all()):
            raise ValueError("the responses of a prompt are not consecutive rows")
    return x.view(-1, size)


def batch_std(x: Tensor, ctx) -> Tensor:
    """Unbiased std of x (B,) over every process's rows."""
    sums = ctx.accelerator.reduce(torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()]), "sum")
    n, total, squares = sums
    variance = (squares - total * total / n) / (n - 1).clamp_min(1)
    return variance.clamp_min(0).sqrt()


class GroupAlgorithm(Algorithm):
    uses_critic = False
    progress_keys = ("reward", "kl", "episodes_per_s")
    sequence_level_ratio = False  # RLOO: one ratio per response (its summed log-probs); GRPO: per token

    def __init__(self, options, training, response_length: int):
        self.options, self.response_length = options, response_length
        steps = options.steps_per_generation or training.gradient_accumulation_steps
        self.num_epochs, self.num_mini_batches = options.num_iterations, steps // training.gradient_accumulation_steps
        self.num_generations = options.num_generations
        self.eps_low, self.eps_high = options.epsilon, options.epsilon_high or options.epsilon

    @property
    def uses_reference(self) -> bool:
        return self.options.beta > 0

    @property
    def kl_in_loss(self) -> bool:
        return self.options.beta > 0

    def advantages(self, scores: Tensor, exp, ctx) -> Tensor:
        """(B,) one advantage per response."""
        raise NotImplementedError

    def prepare(self, exp, ctx) -> dict[str, float]:
        o, G = self.options, self.num_generations
        if o.mask_truncated_completions:
            exp.loss_mask = exp.loss_mask & exp.stopped[:, None]
        groups = grouped(exp.scores, exp.group_ids, G)  # (B/G, G)
        group_std = groups.std(1)  # (B/G,)
        advantages = self.advantages(exp.scores, exp, ctx)  # (B,)
        exp.advantages = advantages[:, None].expand_as(exp.response_ids).float()  # (B, T)
        lengths = exp.response_mask.sum(1).float()
        all_lengths = ctx.accelerator.gather(lengths)
        means = {
            "reward": exp.scores,
            "reward_std": group_std,
            "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)),
            "advantages/mean_abs": advantages.abs(),
            "completions/mean_length": lengths,
            "completions/clipped_ratio": ~exp.stopped,
        }
        totals = {}
        if exp.ref_logprobs is not None:  # the KL of the sampled responses, per token (k1: its unbiased estimate)
            totals = {"kl": (exp.old_logprobs - exp.ref_logprobs).masked_fill(~exp.loss_mask, 0.0),
                      "tokens": exp.loss_mask}
        stats = ctx.reduced(means, totals)
        if totals:
            stats["kl"] /= max(stats.pop("tokens"), 1.0)
        extremes = torch.stack([all_lengths.min(), all_lengths.max()]).tolist()
        return {**stats, "completions/min_length": extremes[0], "completions/max_length": extremes[1]}

    def loss(self, exp, batch: MicroBatch):
        mask = batch.mask
        old = batch.take(exp.old_logprobs)
        advantages = batch.take(exp.advantages).to(batch.logprobs.dtype)
        zero = torch.zeros((), dtype=batch.logprobs.dtype, device=mask.device)
        log_ratio = torch.where(mask, batch.logprobs - old, zero)  # (b, T')
        if self.sequence_level_ratio:  # one ratio per response, on every one of its tokens
            log_ratio = torch.where(mask, log_ratio.sum(1, keepdim=True), zero)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1.0 - self.eps_low, 1.0 + self.eps_high)
        per_token = -torch.minimum(ratio * advantages, clipped * advantages)
        stats = {"loss/policy": masked_mean(per_token.detach(), mask)}
        if self.uses_reference and self.kl_in_loss:
            kl = kl_per_token(batch.logprobs, batch.take(exp.ref_logprobs), self.kl_estimator)
            per_token = per_token + self.options.beta * torch.where(mask, kl, zero)
            stats["kl_loss_term"] = masked_mean(kl.detach(), mask)
        loss = self.aggregate(per_token, batch)
        _, entropy = entropy_term(batch, 0.0)
        with torch.no_grad():
            low = (ratio < 1.0 - self.eps_low) & (advantages < 0)
            high = (ratio > 1.0 + self.eps_high) & (advantages > 0)
            stats.update({
                "entropy": entropy,
                "clip_ratio/low_mean": masked_mean(low.float(), mask),
                "clip_ratio/high_mean": masked_mean(high.float(), mask),
                "clip_ratio/region_mean": masked_mean((low | high).float(), mask),
            })
        return loss, stats

    kl_estimator = "k3"

    def aggregate(self, per_token: Tensor, batch: MicroBatch) -> Tensor:
        """The micro-batch's share of the mini-batch loss; the default: the mean over responses of each
        response's mean over its tokens (a micro-batch's rows are a share `b / rows` of the mini-batch)."""
        per_row = masked_sum(per_token, batch.mask, dim=1) / batch.mask.sum(1).clamp_min(1)
        return per_row.sum() / batch.rows
