"""PPO as an online Algorithm: per-token rewards with the KL penalty, GAE with a critic, the clipped
policy and value losses (docs/ppo.md, implementation details 2-8). With `advantage_estimator:
reinforce++` the same without a critic: REINFORCE++ (Hu 2025), the discounted sum of the per-token
rewards whitened over the whole batch (every process's tokens)."""

from __future__ import annotations

import torch

from rlhf_cli.config.options import PPOOptions
from rlhf_cli.lm.masking import WHITEN_EPS, masked_var, masked_whiten
from rlhf_cli.online.algorithm import Algorithm, MicroBatch, entropy_term
from rlhf_cli.ppo.advantages import gae, whiten_advantages
from rlhf_cli.ppo.kl import kl_per_token, make_kl_controller
from rlhf_cli.ppo.losses import policy_loss, value_loss
from rlhf_cli.ppo.rewards import apply_missing_eos_penalty, clip_scores, per_token_rewards


class PPO(Algorithm):
    progress_keys = ("objective/scores", "objective/kl", "episodes_per_s")

    def __init__(self, options: PPOOptions):
        self.options = options
        self.entropy_coef = options.entropy_coef
        self.uses_critic = options.advantage_estimator == "gae"
        self.num_epochs, self.num_mini_batches = options.num_ppo_epochs, options.num_mini_batches
        self.kl_ctl = make_kl_controller(options.kl_coef, options.adaptive_kl, options.target_kl, options.kl_horizon)

    def prepare(self, exp, ctx) -> dict[str, float]:
        """Scores -> per-token rewards (the KL penalty on every token, the score on the last) -> GAE
        advantages whitened over valid tokens, and returns for the value loss."""
        o, mask = self.options, exp.loss_mask
        kl_coef = self.kl_ctl.value  # the coefficient this iteration's rewards use (logged as used)
        scores = clip_scores(apply_missing_eos_penalty(exp.scores, exp.stopped, o.missing_eos_penalty), o.reward_clip)
        kl = kl_per_token(exp.old_logprobs, exp.ref_logprobs, o.kl_estimator).masked_fill(~mask, 0.0)
        rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef)
        if o.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        if self.uses_critic:
            advantages, exp.returns = gae(rewards, exp.values, mask, o.gamma, o.lam)
            exp.advantages = whiten_advantages(advantages, mask)
        else:  # REINFORCE++: sum_l gamma^l r_{t+l}, i.e. GAE with V = 0 and lambda = 1, whitened globally
            returns, _ = gae(rewards, torch.zeros_like(rewards), mask, o.gamma, 1.0)
            exp.advantages = batch_whiten(returns, mask, ctx)
        stats = ctx.reduced(means={
            "objective/kl": kl.sum(1),
            "objective/entropy": (-exp.old_logprobs).masked_fill(~mask, 0.0).sum(1),
            "objective/non_score_reward": non_score.sum(1),
            "objective/rlhf_reward": non_score.sum(1) + scores,
            "objective/scores": exp.scores,
            "val/response_length": mask.sum(1),
        }, totals={"val/num_eos_tokens": exp.stopped})
        return {**stats, "objective/kl_coef": kl_coef}

    def loss(self, exp, batch: MicroBatch):
        o, mask = self.options, batch.mask
        old_logprobs = batch.take(exp.old_logprobs)
        pg_loss, pg = policy_loss(batch.logprobs, old_logprobs, batch.take(exp.advantages), mask, o.cliprange,
                                  batch.tokens)
        bonus, entropy = entropy_term(batch, self.entropy_coef)
        stats = {
            "policy/approxkl_avg": pg["approxkl"],
            "policy/clipfrac_avg": pg["clipfrac"],
            "loss/policy_avg": pg["loss"],
        }
        if self.uses_critic:
            vf_loss, vf = value_loss(batch.values.float(), batch.take(exp.values), batch.take(exp.returns), mask,
                                     o.cliprange_value, batch.tokens)
            loss = pg_loss + o.vf_coef * vf_loss + bonus
            stats.update({"loss/value_avg": vf["loss"], "val/clipfrac_avg": vf["clipfrac"]})
        else:
            loss = pg_loss + bonus
        stats.update({
            "policy/entropy_avg": entropy,
            "val/ratio": pg["ratio"],
            "val/ratio_var": masked_var(torch.exp(batch.logprobs - old_logprobs).detach(), mask),
        })
        return loss, stats

    def finish(self, exp, ctx, stats: dict[str, float]) -> None:
        """The adaptive KL controller moves towards target_kl with the iteration's KL."""
        self.kl_ctl.update(stats["objective/kl"], ctx.episodes(exp))

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])


def batch_whiten(x: torch.Tensor, mask: torch.Tensor, ctx) -> torch.Tensor:
    """(B, T) -> zero mean, unit variance over the valid tokens of every process; 0 elsewhere."""
    valid = x.masked_fill(~mask, 0.0)
    sums = ctx.accelerator.reduce(torch.stack([mask.sum().float(), valid.sum(), (valid * valid).sum()]), "sum")
    n, total, squares = sums
    mean = total / n.clamp_min(1)
    variance = (squares - n * mean * mean) / (n - 1).clamp_min(1)
    return ((x - mean) * torch.rsqrt(variance.clamp_min(0) + WHITEN_EPS)).masked_fill(~mask, 0.0)
