"""Batch tokenized SFT rows into padded tensors, and keep packed examples from attending to each other.

Padding is on the right: a causal LM's real tokens never attend to later positions, so right padding
changes no real token's logits, and its labels are -100 so it adds nothing to the loss.

Packed rows (from rlhf_cli.data.packing) carry `position_ids` that restart at 0 at each example.
Position ids alone do NOT stop attention across examples in general; see docs/packing.md. Two
mechanisms do, for transformers 5 models built on `masking_utils` (GPT-2 included):
- block_diagonal_mask=True: the batch carries a 4D additive mask (batch, 1, seq, seq), 0 where a
  query may attend a key (same example, key not after query) and the dtype minimum elsewhere.
  transformers passes a 4D mask through untouched; eager and sdpa attention add it to the scores.
- block_diagonal_mask=False: the batch carries NO attention_mask. transformers 5 then finds the
  examples from the restarts in position_ids (eager, sdpa, flex attention; flash attention only in
  a batch of one row), but only when the forward gets `use_cache=False` (with a cache it skips that
  detection). No (batch, seq, seq) mask to hold in memory.
`supports_packed_attention(model, ...)` checks on the live model that the chosen one works.
"""

from __future__ import annotations

import logging
import math

import torch

from rlhf_cli.data.sft_format import IGNORE_INDEX

log = logging.getLogger(__name__)


class SFTCollator:
    """rows (dicts of int lists: input_ids, labels[, position_ids]) -> dict of tensors, all (batch, seq):

    - input_ids: right-padded with `pad_token_id`;
    - labels: -100 on padding;
    - attention_mask: (batch, seq) 1/0 for unpacked rows; for packed rows (batch, 1, seq, seq) float
      block-diagonal causal mask when `block_diagonal_mask`, else absent (see module docstring);
    - position_ids: only for packed rows; the padding continues as one extra "example" 0, 1, ...

    `seq` is the longest row, rounded up to a multiple of `pad_to_multiple_of` when given.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, block_diagonal_mask: bool = True):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token first")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.block_diagonal_mask = block_diagonal_mask

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(row["input_ids"]) for row in rows]
        seq = max(lengths)
        if self.pad_to_multiple_of:
            seq = math.ceil(seq / self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in rows[0]

        input_ids = torch.full((len(rows), seq), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), seq), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), seq), dtype=torch.long)
        # Padding positions count 0, 1, ... so they form their own trailing "example".
        position_ids = torch.arange(seq).repeat(len(rows), 1) if packed else None
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):  # one step per row, not per token
            input_ids[i, :n] = torch.as_tensor(row["input_ids"])
            labels[i, :n] = torch.as_tensor(row["labels"])
            attention_mask[i, :n] = 1
            if packed:
                position_ids[i, :n] = torch.as_tensor(row["position_ids"])
                position_ids[i, n:] = torch.arange(seq - n)

        batch = {"input_ids": input_ids, "labels": labels}
        if not packed:
            batch["attention_mask"] = attention_mask
            return batch
        batch["position_ids"] = position_ids
        if self.block_diagonal_mask:
            batch["attention_mask"] = block_diagonal_causal_mask(position_ids)
        return batch


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """(batch, seq) decoder targets -> the decoder's inputs: the start token, then the targets but
    the last (teacher forcing), -100 replaced by pad. Logits at position t then predict labels[t]."""
    inputs = torch.full_like(labels, pad_token_id)
    inputs[:, 0] = decoder_start_token_id
    inputs[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_token_id)
    return inputs


class Seq2SeqCollator:
    """Encoder-decoder rows (input_ids: encoder input, labels: decoder target; data/seq2seq_format.py)
    -> input_ids, attention_mask (batch, S) right-padded, labels (batch, T) with -100 on padding, and
    decoder_input_ids (batch, T) = the labels shifted right after the model's decoder start token.
    The decoder is causal, so its right padding changes no real position's logits."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: int):
        if pad_token_id is None or decoder_start_token_id is None:
            raise ValueError("an encoder-decoder batch needs the tokenizer's pad token and the model's decoder_start_token_id")
        self.pad_token_id, self.decoder_start_token_id = pad_token_id, decoder_start_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        source, target = max(len(r["input_ids"]) for r in rows), max(len(r["labels"]) for r in rows)
        input_ids = torch.full((len(rows), source), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), source), dtype=torch.long)
        labels = torch.full((len(rows), target), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
            attention_mask[i, : len(row["input_ids"])] = 1
            labels[i, : len(row["labels"])] = torch.as_tensor(row["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "decoder_input_ids": shift_right(labels, self.decoder_start_token_id, self.pad_token_id)}


def example_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) position ids -> (batch, seq) example index within each row.

    An example starts wherever the position does not continue the previous one (p[t] != p[t-1] + 1),
    the same rule transformers uses, so a row of [0 1 2 0 1 0 1 2] gives [0 0 0 1 1 2 2 2].
    """
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).long()
    return starts.cumsum(dim=-1) - 1


def block_diagonal_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, seq) position ids -> (batch, 1, seq, seq) additive attention mask.

    Entry [b, 0, q, k] is 0 when query q may attend key k (same example and k <= q) and the smallest
    `dtype` value otherwise. Every query attends at least to itself, so no softmax row is all masked
    (no NaN). Float rather than bool because GPT-2's eager attention adds the mask to the scores (a
    bool mask would add 0/1); sdpa accepts float masks too. Memory: batch * seq^2 * 4 bytes in fp32.
    """
    seq = position_ids.shape[-1]
    example = example_ids(position_ids)  # (batch, seq)
    same_example = example[:, :, None] == example[:, None, :]  # (batch, seq_q, seq_k)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()  # (seq_q, seq_k)
    allowed = (same_example & causal)[:, None]  # (batch, 1, seq_q, seq_k)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def supports_packed_attention(model, block_diagonal_mask: bool = True) -> bool:
    """Whether `model`, fed SFTCollator batches of packed rows, keeps each example to itself.

    Checked by running it: the same second example is packed after two different first examples;
    isolated, its logits cannot depend on which came first. Each of the two forwards is a batch of
    two rows (the second a fixed, shorter packed row, so there is padding): flash attention, for
    one, finds examples from position_ids only in a batch of one row. Eval mode, `use_cache=False`
    as the SFT stage calls the model; identical shapes in both forwards, so an isolated model gives
    (near) bit-identical logits. Any error counts as "no".
    """
    vocab_size = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first_a, first_b, second, filler = (
        torch.randint(vocab_size, (n,), generator=generator).tolist() for n in (6, 6, 4, 7)
    )
    first_b[-1] = (first_a[-1] + 1) % vocab_size  # make sure the two first examples differ
    collate = SFTCollator(pad_token_id=0, block_diagonal_mask=block_diagonal_mask)
    filler_row = {"input_ids": filler, "labels": filler, "position_ids": [*range(4), *range(3)]}

    def second_logits(first: list[int]) -> torch.Tensor:
        tokens = first + second
        row = {"input_ids": tokens, "labels": tokens, "position_ids": [*range(len(first)), *range(len(second))]}
        batch = {k: v.to(device) for k, v in collate([row, filler_row]).items() if k != "labels"}
        return model(**batch, use_cache=False).logits[0, len(first) : len(tokens)].float()  # (len(second), vocab)

    was_training = model.training
    model.eval()
    try:
        after_a, after_b = second_logits(first_a), second_logits(first_b)
    except Exception as err:  # a model that rejects position_ids / 4D masks cannot isolate examples
        log.debug("packed-attention probe failed: %s", err)
        return False
    finally:
        model.train(was_training)
    return torch.allclose(after_a, after_b, rtol=1e-4, atol=1e-5)
