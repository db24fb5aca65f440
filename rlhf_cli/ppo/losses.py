"""The clipped PPO losses (implementation detail 7).

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7:
    L^CLIP = E_t[ min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) ],  rho_t = pi(a_t) / pi_old(a_t)
minimised here as its negation max(-A rho, -A clip(rho)). The value loss is clipped the same way
around the rollout's values (as in OpenAI baselines and lm-human-preferences).

Both losses average over the valid tokens of the batch. Inputs at padding positions are selected
away before any arithmetic, so garbage there (even inf/NaN) gives neither loss nor gradient.
Pass `num_tokens` (the valid-token count of the whole accumulated batch) to divide the summed loss
by it instead of by the local count, so micro-batches of unequal length weigh every token alike.
"""

import torch
from torch import Tensor

from rlhf_cli.ppo.masking import masked_mean, masked_sum


def _reduce(per_token: Tensor, mask: Tensor, num_tokens: float | Tensor | None) -> Tensor:
    if num_tokens is None:
        return masked_mean(per_token, mask)
    return masked_sum(per_token, mask) / num_tokens


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss.

    logprobs: (B, T) log pi(a_t) under the current policy (with grad); old_logprobs: (B, T) from
    the rollout; advantages: (B, T) (whitened); mask: (B, T) bool.
    Returns the scalar loss and detached stats (scalars, masked means over valid tokens):
        approxkl  0.5 * mean((logprobs - old_logprobs)^2), an estimate of KL(pi_old || pi)
        clipfrac  fraction of tokens where the clipped term is the larger one (the one in use)
        ratio     mean of rho_t
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)
    advantages = torch.where(mask, advantages.to(logprobs.dtype), zero)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _reduce(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, mask),
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "ratio": masked_mean(ratio.detach(), mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_clipped - R)^2)),
    V_clipped = V_old + clip(V - V_old, -c, c).

    values: (B, T) current predictions (with grad); old_values: (B, T) rollout predictions;
    returns: (B, T) GAE returns; mask: (B, T) bool.
    Returns the scalar loss and detached stats: `clipfrac` (fraction of valid tokens where the
    clipped term is the larger one) and `vpred` (mean prediction).
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    delta = torch.where(mask, values - old_values, zero)  # V - V_old
    error = torch.where(mask, values - returns, zero)  # V - R
    clipped_error = error - delta + torch.clamp(delta, -cliprange_value, cliprange_value)  # V_clipped - R
    unclipped_sq = error**2
    clipped_sq = clipped_error**2
    loss = 0.5 * _reduce(torch.maximum(unclipped_sq, clipped_sq), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped_sq > unclipped_sq).to(values.dtype), mask),
            "vpred": masked_mean(values.detach(), mask),
        }
    return loss, stats
