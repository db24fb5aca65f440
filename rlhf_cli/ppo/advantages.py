"""Generalised advantage estimation over valid tokens (implementation details 5 and 6).

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation":
    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)                      (eq. 10)
    A_t     = sum_l (gamma * lam)^l delta_{t+l}
            = delta_t + gamma * lam * A_{t+1}                        (eq. 16, computed backwards)
    returns R_t = A_t + V(s_t), the value-function target (TD(lam) return).
Each response is one episode that ends at its last valid token: values after it are 0 and
nothing is bootstrapped beyond it. The mask need not be a prefix: tokens the policy did not write
(a tool's output inserted by a text environment) are part of the environment's transition, not
steps of the policy, so GAE skips them -- the next value and advantage carry across the span
unchanged, and the span gets no advantage. For a prefix mask this is the plain recursion.
"""

import torch
from torch import Tensor

from rlhf_cli.lm.masking import masked_whiten


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns by GAE.

    rewards: (B, T) per-token rewards; values: (B, T) V(s_t) from the rollout; mask: (B, T) bool
    the policy's tokens (a prefix, or with holes where something else inserted tokens).
    Returns advantages (B, T) and returns (B, T) = advantages + values, both 0 at invalid
    positions (returns are taken before any advantage whitening). Rewards and values at invalid
    positions are ignored. The loop runs over T, vectorised over B. Call under torch.no_grad()
    (or on detached tensors): advantages are targets, not something to differentiate.
    """
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards, zero)
    values = torch.where(mask, values.to(rewards.dtype), zero)  # the episode has ended: V = 0
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # bootstrap after the end
    next_advantage = torch.zeros_like(next_value)
    advantages = [next_value] * T
    for t in reversed(range(T)):
        step = mask[:, t]  # (B,) a policy step at t; elsewhere the carries pass through unchanged
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[t] = torch.where(step, advantage, zero)
        next_advantage = torch.where(step, advantage, next_advantage)
        next_value = torch.where(step, values[:, t], next_value)
    advantages = torch.stack(advantages, dim=1)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def whiten_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Zero mean, unit variance over valid tokens only; 0 at invalid positions.
    advantages, mask: (B, T) -> (B, T). Whitening keeps the step size of the policy loss
    independent of the reward scale (Huang et al. 2024)."""
    return masked_whiten(advantages, mask, shift_mean=True)
