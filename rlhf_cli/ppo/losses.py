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

from rlhf_cli.lm.masking import masked_mean, masked_sum


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
        loss      the per-token mean of the loss (whatever `num_tokens` divides the returned loss by)
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
    per_token = torch.maximum(unclipped, clipped)
    loss = _reduce(per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {
            "loss": masked_mean(per_token.detach(), mask),
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
    V_clipped = clamp(V, V_old - c, V_old + c).

    values: (B, T) current predictions (with grad); old_values: (B, T) rollout predictions;
    returns: (B, T) GAE returns; mask: (B, T) bool.
    Returns the scalar loss and detached stats: `loss` (the per-token mean, whatever `num_tokens`
    divides the returned loss by), `clipfrac` (fraction of valid tokens where the clipped term is
    the larger one) and `vpred` (mean prediction).

    V_clipped is a clamp of V itself, not V_old + clamp(V - V_old): inside the range the clamp
    returns V bit for bit, so an unclipped token can never count as clipped through rounding
    (V_old + (V - V_old) is not always V in floating point).
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    old_values = torch.where(mask, old_values.to(values.dtype), zero)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_sq = torch.where(mask, values - returns, zero) ** 2
    clipped_sq = torch.where(mask, clipped_values - returns, zero) ** 2
    per_token = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    loss = _reduce(per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {
            "loss": masked_mean(per_token.detach(), mask),
            "clipfrac": masked_mean((clipped_sq > unclipped_sq).to(values.dtype), mask),
            "vpred": masked_mean(values.detach(), mask),
        }
    return loss, stats
