"""Forward passes over (query, response) batches, for causal and encoder-decoder policies.

Queries are left-padded (B, P); responses right-padded (B, T). For a causal LM the input is the
concatenation (B, P + T) and the logits that predict response token t sit at position P - 1 + t;
position ids count only real tokens, so left padding changes nothing (the same positions that
`generate` used). For an encoder-decoder the query is the encoder input and the response, shifted
right behind the decoder start token, is the decoder input.
"""

from contextlib import contextmanager

import torch


def causal_inputs(query_ids, query_mask, response_ids, response_mask) -> dict[str, torch.Tensor]:
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (B, P + T)
    attention_mask = torch.cat([query_mask.long(), response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def seq2seq_inputs(query_ids, query_mask, response_ids, response_mask, decoder_start_token_id: int) -> dict:
    start = torch.full_like(response_ids[:, :1], decoder_start_token_id)
    decoder_input_ids = torch.cat([start, response_ids[:, :-1]], dim=1)  # (B, T): shift right
    decoder_mask = torch.cat([torch.ones_like(start), response_mask[:, :-1].long()], dim=1)
    return {
        "input_ids": query_ids,
        "attention_mask": query_mask.long(),
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_mask,
    }


def model_inputs(config, query_ids, query_mask, response_ids, response_mask) -> dict[str, torch.Tensor]:
    """The inputs for `config`'s architecture (the policy's HF config)."""
    if getattr(config, "is_encoder_decoder", False):
        start = config.decoder_start_token_id
        if start is None:
            start = config.pad_token_id
        return seq2seq_inputs(query_ids, query_mask, response_ids, response_mask, start)
    return causal_inputs(query_ids, query_mask, response_ids, response_mask)


def response_slice(tensor: torch.Tensor, query_len: int, response_len: int, encoder_decoder: bool) -> torch.Tensor:
    """The positions of a forward's output (B, L, ...) that belong to the response tokens (B, T, ...)."""
    if encoder_decoder:
        return tensor
    return tensor[:, query_len - 1 : query_len - 1 + response_len]


def trim_padding(query_ids, query_mask, response_ids, response_mask):
    """Drop the columns that no row of this (micro-)batch needs.

    A rollout batch is padded to its longest query (on the left) and its longest response (on the
    right); a micro-batch drawn from it usually needs less. Dropping left-padding columns that are
    padding in every row changes nothing (position ids count only real tokens, and the mask already
    hid them); dropping response columns after the longest response drops only masked positions.
    Returns the four tensors trimmed: (b, P') and (b, T') with P' <= P, 1 <= T' <= T.
    """
    # the first column where some row has a real token, and the longest response: one host sync for both
    first, longest = torch.stack([query_mask.any(0).long().argmax(), response_mask.sum(1).max()]).tolist()
    longest = max(longest, 1)
    return query_ids[:, first:], query_mask[:, first:], response_ids[:, :longest], response_mask[:, :longest]


def innermost_model(model):
    """The transformers model under PEFT / DDP wrappers (where `generation_config` lives)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_takes(model, argument: str) -> bool:
    """Whether the forward of `model` (its transformers model: PEFT models pass keywords on) takes `argument`."""
    import inspect

    return argument in inspect.signature(innermost_model(model).forward).parameters


def supports_logits_to_keep(model) -> bool:
    """Whether `model.forward` can compute the LM head for the last positions only (transformers'
    `logits_to_keep`)."""
    return forward_takes(model, "logits_to_keep")


@contextmanager
def head_at(model, positions: torch.Tensor):
    """Within this block the model's output projection (LM head) sees only the hidden states at
    `positions`, a (b, t) bool mask over the model's input columns, and the model returns logits
    (1, N, V) for those N positions in row-major order. The LM head is often the largest matmul of a
    small model, so a batch whose rows need log-probs at different columns (DPO's right-padded pairs)
    projects only the positions it uses, not every padded column. The hook sits on the projection
    itself, so what a model does to its logits afterwards (logit scaling, soft-capping) still
    applies. With `logits_to_keep=k` the head receives the last k columns; the mask is cut to match.
    Yields False (nothing hooked) for a model without a separate output projection."""
    inner = getattr(model, "module", model)  # DDP
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        yield False
        return

    def gather(module, args):
        hidden = args[0]  # (b, k, H): the columns the model projects
        return (hidden[positions[:, positions.shape[1] - hidden.shape[1]:]].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather, prepend=True)  # before other hooks (lm/head.py's)
    try:
        yield True
    finally:
        handle.remove()
