"""GRPO (Shao et al. 2024, DeepSeekMath): the advantage of a response is its reward minus its group's
mean, divided by the group's (or the batch's) reward std; a clipped per-token ratio; KL to the
reference as a loss term (k3) weighted by beta; four ways to average the per-token losses
(docs/grpo.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_cli.lm.masking import masked_sum
from rlhf_cli.online.algorithm import MicroBatch
from rlhf_cli.online.groups import ADVANTAGE_EPS, GroupAlgorithm, batch_std, grouped


class GRPO(GroupAlgorithm):
    @property
    def kl_estimator(self) -> str:
        return self.options.kl_estimator

    def advantages(self, scores: Tensor, exp, ctx) -> Tensor:
        groups = grouped(scores, exp.group_ids, self.num_generations)  # (B/G, G)
        std = groups.std(1, keepdim=True)  # unbiased, as TRL
        centred = groups - groups.mean(1, keepdim=True)
        scale = self.options.scale_rewards
        if scale == "group":
            centred = centred / (std + ADVANTAGE_EPS)
        elif scale == "batch":
            centred = centred / (batch_std(scores, ctx) + ADVANTAGE_EPS)
        # a group whose rewards are all equal teaches nothing: exactly zero (not rounding / eps)
        equal = torch.isclose(std, torch.zeros_like(std)).expand_as(centred)
        return torch.where(equal, torch.zeros_like(centred), centred).reshape(-1)

    def aggregate(self, per_token: Tensor, batch: MicroBatch) -> Tensor:
        loss_type = self.options.loss_type
        if loss_type == "grpo":
            return super().aggregate(per_token, batch)
        summed = masked_sum(per_token, batch.mask)
        if loss_type == "dr_grpo":
            return summed / (batch.rows * self.response_length)
        if loss_type == "bnpo":
            return summed / batch.local_tokens.clamp_min(1)
        return summed / batch.tokens  # dapo: every token of the mini-batch, on every process, weighs the same
