"""From one scalar score per response to per-token rewards (implementation details 1, 2 and 5).

The reward model judges a whole response, so its score is given at the last valid token (the
stop token, or the last generated token when the response never stopped); every valid token also
pays the KL penalty -kl_coef * KL_t (Ziegler et al. 2019, eq. 2; Huang et al. 2024).
"""

import torch
from torch import Tensor

from rlhf_cli.lm.masking import first_true_index, masked_whiten


def apply_missing_eos_penalty(scores: Tensor, stopped: Tensor, penalty: float | None) -> Tensor:
    """Subtract `penalty` from the score of every response that never produced the stop token.

    scores: (B,) float, stopped: (B,) bool  ->  (B,). `penalty` is a positive amount (as TRL's
    `missing_eos_penalty`); None leaves the scores unchanged. Without it, a policy can learn to
    ramble to the length limit, where the reward model was never trained to judge.
    """
    if penalty is None:
        return scores
    if penalty < 0:
        raise ValueError(f"missing_eos_penalty is subtracted and must be >= 0, got {penalty}")
    return torch.where(stopped, scores, scores - penalty)


def clip_scores(scores: Tensor, reward_clip: float | None) -> Tensor:
    """Clamp scores to [-reward_clip, reward_clip] (None: unchanged), so one outlier score cannot
    dominate an update.  scores: (B,) -> (B,)."""
    if reward_clip is None:
        return scores
    if reward_clip <= 0:
        raise ValueError(f"reward_clip must be > 0, got {reward_clip}")
    return scores.clamp(-reward_clip, reward_clip)


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last True in each row.  mask: (B, T) bool -> (B,) long, -1 for an all-False row."""
    T = mask.shape[-1]
    return T - 1 - first_true_index(mask.flip(-1))


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards: KL penalty on every valid token, plus the score on the last valid token.

    scores: (B,) float; kl: (B, T) per-token KL estimate; mask: (B, T) bool.
    Returns
        rewards:          (B, T)  non_score_reward + score at index (length - 1) of each row;
        non_score_reward: (B, T)  -kl_coef * kl on valid tokens, 0 elsewhere.
    A row with no valid token (generation always yields one, so only by mistake) gets rewards 0
    everywhere: its score has no token to land on and is dropped.
    """
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    non_score_reward = torch.where(mask, -kl_coef * kl, zero)
    last = last_valid_index(mask)
    positions = torch.arange(mask.shape[-1], device=mask.device).unsqueeze(0)
    at_last = (positions == last.unsqueeze(-1)) & mask  # (B, T) one-hot, all False for an empty row
    rewards = non_score_reward + torch.where(at_last, scores.to(kl.dtype).unsqueeze(-1), zero)
    return rewards, non_score_reward


def whiten_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Scale rewards to unit variance over valid tokens without shifting their mean (the sign of a
    reward carries meaning).  rewards, mask: (B, T) -> (B, T), 0 at invalid positions."""
    return masked_whiten(rewards, mask, shift_mean=False)
