"""RLOO (Ahmadian et al. 2024, "Back to Basics"): each response's baseline is the mean reward of the
other responses to its prompt; the KL to the reference enters the reward (beta x the response's
summed k1 log-ratio), as in the paper and TRL; one importance ratio per response, clipped; the loss
is the mean over responses (docs/grpo.md)."""

from __future__ import annotations

from torch import Tensor

from rlhf_cli.online.groups import ADVANTAGE_EPS, GroupAlgorithm, batch_std, grouped


class RLOO(GroupAlgorithm):
    sequence_level_ratio = True

    @property
    def kl_in_loss(self) -> bool:
        return self.options.beta > 0 and not self.options.kl_in_reward

    def advantages(self, scores: Tensor, exp, ctx) -> Tensor:
        rewards = scores
        if self.options.beta > 0 and self.options.kl_in_reward:
            kl = (exp.old_logprobs - exp.ref_logprobs).masked_fill(~exp.loss_mask, 0.0).sum(1)  # (B,) k1
            rewards = rewards - self.options.beta * kl
        G = self.num_generations
        groups = grouped(rewards, exp.group_ids, G)  # (B/G, G)
        baseline = (groups.sum(1, keepdim=True) - groups) / (G - 1)  # the mean of the other G - 1
        advantages = (groups - baseline).reshape(-1)
        if self.options.normalize_advantages:
            mean = ctx.accelerator.reduce(advantages.mean(), "mean")
            advantages = (advantages - mean) / (batch_std(advantages, ctx) + ADVANTAGE_EPS)
        return advantages
