"""Summed response log-probs of the 2B sequences of a DPOCollator batch, from one forward pass.

Only response tokens count (prompt and padding are masked), and only the positions that predict a
response token are projected onto the vocabulary: the model is called with `logits_to_keep`
(transformers slices the hidden states before the LM head), so the full-vocabulary logits of the
prompt are never made. The log-softmax is computed in float32 as gathered logit - logsumexp, without
a (N, V) log-softmax tensor; for float32 models the logits themselves are used, not a copy.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from rlhf_cli.lm.logprobs import logprobs_from_logits


@dataclass
class SequenceLogps:
    """Per sequence, (2B,) each: chosen rows first, then rejected rows (the collator's order)."""

    logps: torch.Tensor  # sum of the response tokens' log-probs (carries the gradient)
    logits_sum: torch.Tensor  # sum over response tokens of the mean logit over the vocabulary (detached)
    num_tokens: torch.Tensor  # response tokens

    def halves(self, field: str) -> tuple[torch.Tensor, torch.Tensor]:
        value = getattr(self, field)
        half = value.shape[0] // 2
        return value[:half], value[half:]


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _forward(model, inputs: dict, keep: int | torch.Tensor) -> torch.Tensor:
    """Logits at the kept positions: `keep` is the number of last columns (int) or column indices (1D)."""
    unwrapped = getattr(model, "module", model)
    if _accepts_logits_to_keep(unwrapped):
        return model(**inputs, use_cache=False, logits_to_keep=keep).logits
    logits = model(**inputs, use_cache=False).logits  # a model without logits_to_keep: slice afterwards
    return logits[:, -keep:] if isinstance(keep, int) else logits[:, keep]


def sequence_logps(model, batch: dict) -> SequenceLogps:
    """One forward over the batch -> per-sequence response log-prob sums (see SequenceLogps)."""
    if "sequence_index" in batch:
        return _padding_free_logps(model, batch)
    input_ids, response = batch["input_ids"], batch["response_mask"]  # (2B, T), (2B, T)
    # Column t predicts token t + 1; the first response column over the batch bounds what is needed.
    first = int(response.any(dim=0).nonzero()[0])  # >= 1: every prompt has a token
    logits = _forward(model, {"input_ids": input_ids, "attention_mask": batch["attention_mask"]},
                      keep=input_ids.shape[1] - first + 1)[:, :-1]  # (2B, T - first, V): columns first-1 .. T-2
    labels, mask = input_ids[:, first:], response[:, first:]  # (2B, T - first)
    token_logps = logprobs_from_logits(logits, labels) * mask  # (2B, T - first)
    mean_logits = logits.detach().float().mean(dim=-1) * mask  # (2B, T - first)
    return SequenceLogps(token_logps.sum(-1), mean_logits.sum(-1), mask.sum(-1).float())


def _padding_free_logps(model, batch: dict) -> SequenceLogps:
    """The same for the one-row layout: logits only at the N_r positions before a response token."""
    input_ids, response, index = batch["input_ids"], batch["response_mask"][0], batch["sequence_index"]  # (1, N), (N,), (N,)
    targets = response.nonzero().flatten()  # (N_r,) columns of response tokens; never column 0
    logits = _forward(model, {"input_ids": input_ids, "position_ids": batch["position_ids"]}, keep=targets - 1)[0]  # (N_r, V)
    token_logps = logprobs_from_logits(logits, input_ids[0, targets])  # (N_r,)
    num_sequences = int(index[-1]) + 1
    owner = index[targets]  # (N_r,) which sequence each response token belongs to

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, owner, values)

    ones = torch.ones_like(token_logps)
    return SequenceLogps(per_sequence(token_logps), per_sequence(logits.detach().float().mean(-1)), per_sequence(ones))
