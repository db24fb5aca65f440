"""Summed response log-probs of the 2B sequences of a DPOCollator batch, from one forward pass.

Only response tokens count (prompt and padding are masked), and only the positions that predict a
response token are projected onto the vocabulary: the model is called with `logits_to_keep`
(transformers slices the hidden states before the LM head, so the prompt columns common to the batch
never reach it) and a hook on the LM head gathers the predicting positions of every row (so neither
a longer prompt's columns nor padding are projected; on the review pairs that is ~40% of the kept
columns). Those positions are then projected in chunks (lm/head.py), so no (N, V) logits are held.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_cli.lm.forward import head_at, supports_logits_to_keep
from rlhf_cli.lm.head import read_tokens


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


def _predicting(response: torch.Tensor) -> torch.Tensor:
    """(rows, N) bool: True at the columns whose logits predict a response token (column t predicts
    token t + 1; the last column predicts nothing)."""
    return torch.nn.functional.pad(response[:, 1:], (0, 1), value=False)


def sequence_logps(model, batch: dict) -> SequenceLogps:
    """One forward over the batch -> per-sequence response log-prob sums (see SequenceLogps).

    Padded (2B, T) rows or the padding-free (1, N) row alike: the LM head projects only the N_r
    positions that predict a response token (lm/forward.py head_at), and each token's log-prob is
    added to its sequence's sum."""
    if "decoder_input_ids" in batch:
        return _seq2seq_logps(model, batch)
    input_ids, response = batch["input_ids"], batch["response_mask"]  # (rows, N) each
    predicting = _predicting(response)  # (rows, N)
    if "sequence_index" in batch:  # one row: sequences side by side, positions restart per sequence
        inputs = {"input_ids": input_ids, "position_ids": batch["position_ids"]}
        owner = batch["sequence_index"][response[0]]  # (N_r,) the sequence of each response token
        num_sequences = int(batch["sequence_index"][-1]) + 1
    else:
        inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}
        owner = response.nonzero()[:, 0]  # (N_r,) row-major, like the boolean gathers below
        num_sequences = input_ids.shape[0]
    # Columns before the first predicting one are never projected: with logits_to_keep the model
    # slices them off before its LM head (and the hook cuts the mask to the columns it gets)
    keep = input_ids.shape[1] - int(predicting.any(dim=0).nonzero()[0])
    projected = {}  # whether the head saw only the predicting positions (lm/forward.py head_at)

    def forward() -> tuple[torch.Tensor, None]:
        with head_at(model, predicting) as gathered:
            projected["gathered"] = gathered
            return _forward(model, inputs, keep), None  # (1, N_r, V) gathered, else (rows, keep, V)

    def predicting_only(x: torch.Tensor) -> torch.Tensor:  # -> (1, N_r, ...)
        return x if projected["gathered"] else x[predicting[:, -x.shape[1]:]][None]

    stats, _ = read_tokens(model, forward, predicting_only, input_ids[response][None], 1.0, mean_logit=True)
    token_logps, mean_logits = stats.logprobs[0], stats.mean_logit[0]  # (N_r,) each

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, owner, values)

    return SequenceLogps(per_sequence(token_logps), per_sequence(mean_logits),
                         per_sequence(torch.ones_like(mean_logits)))


def _seq2seq_logps(model, batch: dict) -> SequenceLogps:
    """An encoder-decoder batch (Seq2SeqDPOCollator): the decoder's logits at t predict labels[t], so
    every real target position is projected; padding rows are masked out of the sums."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    stats, _ = read_tokens(model, lambda: (model(**inputs, use_cache=False).logits, None), lambda x: x,
                           batch["labels"].clamp(min=0), 1.0, mean_logit=True)
    response = batch["response_mask"]  # (2B, T)
    token_logps = stats.logprobs * response  # (2B, T)
    mean_logits = stats.mean_logit * response  # (2B, T)
    return SequenceLogps(token_logps.sum(-1), mean_logits.sum(-1), response.sum(-1).to(token_logps.dtype))


def _forward(model, inputs: dict, keep: int) -> torch.Tensor:
    """Logits of the last `keep` columns (all columns for a model without `logits_to_keep`: the
    rows' own LM head then still sees only the kept positions, see head_at)."""
    if supports_logits_to_keep(model):
        return model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return model(**inputs, use_cache=False).logits
