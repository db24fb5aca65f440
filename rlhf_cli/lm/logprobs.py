"""Token log-probabilities and entropies from logits, at the sampling temperature.

Implementation detail 3 (Huang et al. 2024): the policy samples from softmax(logits / temperature),
so the log-probabilities used for the KL penalty and the PPO ratio must be taken from the same
temperature-scaled distribution, in rollout and in update alike; otherwise the "old" and "new"
policies of the ratio are different distributions even before any update.

Logits may be bf16/fp16; the softmax is computed in float32. Memory: the logits are converted to
float32 once and divided by the temperature in place on that copy (not a float copy plus a scaled
copy), and log-probabilities are gathered before normalising, so no full (B, T, V) log-softmax is
kept. Callers read them through lm/head.py, which feeds these functions a chunk of positions at a
time for large vocabularies.
"""

import torch
from torch import Tensor


def _scaled_float_logits(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature in float32, making one (B, T, V) copy at most."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype != torch.float32:
        scaled = logits.float()  # a fresh tensor: dividing it in place is safe for the caller and autograd
        return scaled.div_(temperature) if temperature != 1.0 else scaled
    return logits / temperature if temperature != 1.0 else logits


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at the given tokens.

    logits: (B, T, V) scores for each response position (position t predicts tokens[:, t]);
    tokens: (B, T) long  ->  (B, T) float32.
    Computed as gathered logit - logsumexp(logits), which avoids keeping a full (B, T, V)
    log-softmax tensor in the forward pass.
    """
    scaled = _scaled_float_logits(logits, temperature)
    gathered = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return gathered - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) at each position, in nats.

    logits: (B, T, V)  ->  (B, T) float32.
    H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v  with z = logits / temperature.
    """
    scaled = _scaled_float_logits(logits, temperature)
    probs = torch.softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled).sum(dim=-1)
