"""Masks over right-padded responses, and statistics taken over valid tokens only.

Conventions used by every module in `rlhf_cli.ppo`:
    B = batch (episodes), T = response length (generated tokens, right-padded).
    `mask` is a bool (B, T) tensor, True for valid response tokens: from the first generated token
    up to and including the stop token. It is a prefix mask (all True, then all False).

Statistics are taken over valid entries only, so that padding never shifts a mean or a variance
(Huang et al. 2024, "The N+ implementation details of RLHF with PPO": whitening over padded
tokens is a classic silent bug). Invalid entries are selected away with `torch.where`, never
multiplied by 0, so NaN/inf that a model writes at padding cannot leak into a result or a gradient.
"""

import torch
from torch import Tensor

WHITEN_EPS = 1e-8


def first_true_index(bools: Tensor) -> Tensor:
    """Index of the first True in each row.

    bools: (B, T) bool  ->  (B,) long, T for a row with no True.
    """
    T = bools.shape[-1]
    idx = torch.arange(T, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, torch.full_like(idx, T)).amin(dim=-1)


def lengths_to_mask(lengths: Tensor, T: int) -> Tensor:
    """Prefix mask from lengths.

    lengths: (B,) int  ->  (B, T) bool, True at positions < length.
    """
    return torch.arange(T, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(-1)


def trailing_pad_lengths(responses: Tensor, pad_token_id: int) -> Tensor:
    """Lengths of right-padded rows: everything before the final run of pad tokens.

    responses: (B, T)  ->  (B,) long. Only for a pad token that is not the stop token (where pad ==
    eos, trailing eos tokens are the stop token and its padding, which `truncate_after_stop` cuts).
    """
    T = responses.shape[-1]
    real_from_end = first_true_index((responses != pad_token_id).flip(-1))  # T for an all-pad row
    return T - real_from_end


def truncate_after_stop(
    responses: Tensor, stop_token_id: int | None, pad_token_id: int, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each response after its first stop token (implementation detail 1: stop at EOS).

    responses: (B, T) raw generated token ids; lengths: (B,) optional, how many tokens of each row
    are the response (the rest is padding: never searched, never kept); default all T.
    Returns
        truncated: (B, T) the stop token kept, everything after it replaced by `pad_token_id`;
        lengths:   (B,) long, tokens up to and including the stop token (the row's length where it
                   never stopped);
        stopped:   (B,) bool, whether a stop token occurred.

    Only the first occurrence of `stop_token_id` in the raw tokens counts; pads are never looked
    at, because in many tokenizers pad == eos and a pad search would cut a response at the wrong
    place. `stop_token_id=None` means responses never stop (fixed-length generation).
    """
    B, T = responses.shape
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=responses.device)
    lengths = lengths.to(device=responses.device, dtype=torch.long)
    if stop_token_id is None:
        stopped = torch.zeros(B, dtype=torch.bool, device=responses.device)
    else:
        first = first_true_index((responses == stop_token_id) & lengths_to_mask(lengths, T))
        stopped = first < T
        lengths = torch.where(stopped, first + 1, lengths)  # `first` is T where there was no stop
    truncated = responses.masked_fill(~lengths_to_mask(lengths, T), pad_token_id)
    return truncated, lengths, stopped


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over entries where mask is True.

    x: (B, T) float, mask: (B, T) bool  ->  scalar (dim=None) or x reduced along `dim`.
    """
    selected = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries where mask is True.

    x: (B, T) float, mask: (B, T) bool  ->  scalar (dim=None) or x reduced along `dim`.
    With no valid entry the mean is 0 (not NaN).
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all entries where mask is True.

    x: (B, T) float, mask: (B, T) bool  ->  scalar.
    `unbiased` applies Bessel's correction (divide by n - 1). With fewer than 2 valid entries
    no spread can be measured and the variance is 0 (not NaN or inf).
    """
    n = mask.sum()
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = (n - 1) if unbiased else n
    var = sq / denom.clamp_min(1).to(x.dtype)
    return torch.where(n >= 2, var, torch.zeros_like(var))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = WHITEN_EPS) -> Tensor:
    """Normalise x to unit variance (and zero mean) using statistics of the valid entries only.

    x: (B, T) float, mask: (B, T) bool  ->  (B, T); invalid entries are 0.
    whitened = (x - mean) / sqrt(var + eps)  (+ mean again when shift_mean=False, which only
    rescales the spread: used for rewards, whose sign carries meaning).
    With fewer than 2 valid entries the variance is unknown and x is not scaled: the result is
    x - mean (that is 0 for a single entry) with shift_mean, x itself without.
    """
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    scale = torch.where(n >= 2, torch.rsqrt(var + eps), torch.ones_like(var))
    whitened = (x - mean) * scale
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))
