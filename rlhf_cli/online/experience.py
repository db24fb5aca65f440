"""One rollout batch as tensors: what was sampled, and what the algorithm computes from it.

Shapes: B rows on this process, P query tokens (left-padded), T response tokens (right-padded).
"""

from dataclasses import dataclass

import torch


@dataclass
class Experience:
    """A batch of (query, response) rows on this process, with their texts.

    `response_mask` is the attention mask of the response (every token the model reads);
    `loss_mask` the tokens the policy wrote and is trained on -- the same unless something else
    inserted tokens into the response (a tool's output, in a text environment). Advantages, KL,
    losses and statistics cover the loss mask only.
    """

    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T) pad after the stop token
    response_mask: torch.Tensor  # (B, T) bool: tokens up to and including the stop token
    stopped: torch.Tensor  # (B,) bool: the response produced the stop token
    prompts: list[str]
    responses: list[str]
    # what the sampling policy's forward passes gave while generating (causal policies); None:
    # the trainer computes them with a forward over the rollout
    logprobs: torch.Tensor | None = None  # (B, T) float32, log-probs of the response tokens at the temperature
    values: torch.Tensor | None = None  # (B, T) float32 (algorithms with a critic)
    loss_mask: torch.Tensor | None = None  # (B, T) bool; None: the response mask
    group_ids: torch.Tensor | None = None  # (B,) long: which prompt of the batch each row answers
    episodes: list | None = None  # a text environment's Episode per row (environments/rollout.py)
    # filled in by the trainer and the algorithm during a step
    old_logprobs: torch.Tensor | None = None  # (B, T)
    ref_logprobs: torch.Tensor | None = None  # (B, T); None without a reference
    scores: torch.Tensor | None = None  # (B,) as the reward gave them
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) value targets (algorithms with a critic)

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.response_mask

    def __len__(self) -> int:
        return len(self.query_ids)

    def longest_first(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (indices) reordered longest first (prompt + response tokens), for splitting into batches
        that are each trimmed to their longest row: rows of similar length then meet, and fewer columns
        are padding. A group's rows stay together, placed by its longest row (a group's prompt runs once
        per batch: lm/shared_prompts.py); ties keep their order."""
        length = self.query_mask.sum(1) + self.response_mask.sum(1)  # (B,)
        if self.group_ids is not None:
            _, group = torch.unique(self.group_ids, return_inverse=True)  # (B,) 0..groups-1, whatever the ids
            length = length.new_zeros(len(length)).scatter_reduce(0, group, length, "amax")[group]
        return rows[torch.sort(length[rows], descending=True, stable=True).indices]


Rollout = Experience  # the name of the PPO-only API
