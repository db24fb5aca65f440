"""DDPO's objectives over one denoising step per row: the clipped importance-ratio loss and DDPO-SF.

Each row is one (image, timestep) pair: `log_prob` is the current policy's log-density of the stored
step x_t -> x_{t-1} (see ddim.ddim_step), `old_log_prob` the one recorded while sampling, and the
advantage is the image's, shared by all its timesteps (Black et al. 2023).
"""

from __future__ import annotations

import torch


def _check(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected (B,) tensors of one shape, got {[tuple(t.shape) for t in tensors]}")


def clipped_loss(advantages: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor,
                 clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped objective (DDPO-IS): (loss scalar, {approx_kl, clipfrac}).

    ratio = exp(logp - old); loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c))).
    Taking the max of the two (the pessimistic bound) removes the gradient of a row once its ratio has
    left [1 - c, 1 + c] in the direction its advantage pushes it, so the policy cannot move far from the
    one that sampled the data in one round of updates. All inputs are (B,); advantages carry no gradient.
    Stats (detached): approx_kl = 0.5 * mean((logp - old)^2), clipfrac = mean(|ratio - 1| > c).
    """
    _check(advantages, log_prob, old_log_prob)
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    advantages = advantages.detach().to(log_prob.dtype)
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
        }
    return loss, stats


def score_function_loss(advantages: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """DDPO-SF, the REINFORCE estimator: -mean(A * logp) over (B,) rows.

    Its gradient is the policy gradient only at the sampling policy itself, so it suits one gradient
    step per batch of samples; the clipped loss allows several.
    """
    _check(advantages, log_prob)
    return -(advantages.detach().to(log_prob.dtype) * log_prob).mean()
