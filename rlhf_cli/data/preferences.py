"""Preference pairs -> token ids for a reward model, and the collator that batches both sides of a pair.

Row formats (found from the columns and the values, as TRL does):
- explicit prompt: `prompt` + `chosen` / `rejected`; a response is scored as the text prompt + response;
- implicit prompt: only `chosen` / `rejected`, each a whole text (prompt included);
- conversational: the same two, with lists of {role, content} messages instead of strings; the
  messages (prompt messages first) are rendered with the tokenizer's chat template;
- an optional `margin` column (a number per pair, see training/bradley_terry.py).

The text is tokenized exactly as the scorer of `rlhf ppo` (rlhf_cli/rewards/model.py) and
`pipeline("text-classification")` tokenize it: one string, the tokenizer's own special tokens
([CLS] ... [SEP] for BERT, none for GPT-2). So a reward model is trained on the token sequences it
will score. No EOS is appended to a response (see docs/reward-models.md): the scorer sees none.

Pairs longer than `max_length` (either side) keep their first `max_length` tokens (the tokenizer
truncates, so BERT keeps its final [SEP]) or are dropped (`data.long_pairs`); both are counted.
A pair whose two sides are the same text is a data error (exit 2, naming the row). A pair whose sides
become identical only when cut to `max_length` carries no preference and is dropped and counted.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from datasets import Dataset

from rlhf_cli.config.schema import RewardDataConfig
from rlhf_cli.data.chat_spans import chat_template
from rlhf_cli.data.loading import column_values, require_columns
from rlhf_cli.data.sft_format import _messages, _row_dicts, _text
from rlhf_cli.errors import UserError

log = logging.getLogger(__name__)


def prompt_column(column_names: list[str], cfg: RewardDataConfig) -> str | None:
    """The prompt column to use, or None for implicit-prompt rows.

    The default `prompt` may be absent (the dataset then has the prompt inside chosen/rejected);
    any other configured name must exist.
    """
    column = cfg.prompt_column
    if column is None or column in column_names:
        return column
    if column == "prompt":
        log.info("no %r column: chosen/rejected are scored as whole texts (set data.prompt_column: null "
                 "to say so explicitly)", column)
        return None
    raise UserError(
        f"data.prompt_column: column {column!r} not found in the preference dataset; it has: "
        f"{', '.join(column_names)}. Set data.prompt_column to the right column, or to null when "
        "chosen/rejected already contain the prompt."
    )


def pair_texts(row: dict, tokenizer, cfg: RewardDataConfig, prompt_col: str | None, index: int) -> tuple[str, str]:
    """One row -> (chosen text, rejected text), each the whole text the reward model scores."""
    chosen, rejected = row[cfg.chosen_column], row[cfg.rejected_column]
    prompt = row[prompt_col] if prompt_col else None
    if isinstance(chosen, list) or isinstance(rejected, list):
        prompt_messages = _messages(row, prompt_col, index) if prompt_col else []
        return (
            _render_chat(prompt_messages + _messages(row, cfg.chosen_column, index), tokenizer),
            _render_chat(prompt_messages + _messages(row, cfg.rejected_column, index), tokenizer),
        )
    if isinstance(prompt, list):
        raise UserError(
            f"data row {index}: column {prompt_col!r} holds messages but {cfg.chosen_column!r} holds text; "
            "give all three as messages or all three as text."
        )
    prefix = _text(row, prompt_col, index) if prompt_col else ""
    return prefix + _text(row, cfg.chosen_column, index), prefix + _text(row, cfg.rejected_column, index)


def _render_chat(messages: list[dict], tokenizer) -> str:
    chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _margin(row: dict, column: str, index: int) -> float:
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(
            f"data row {index}: column {column!r} (data.margin_column) holds {value!r}; it must be a finite number."
        )
    return float(value)


def tokenize_pairs(dataset: Dataset, tokenizer, cfg: RewardDataConfig) -> tuple[Dataset, dict]:
    """Tokenize every pair; truncate or drop long pairs; drop pairs with identical sides.

    Returns (dataset with `chosen_input_ids`, `rejected_input_ids` [, `margin`], stats) where stats is
    {"pairs", "kept", "truncated", "dropped_too_long", "dropped_identical"}.
    """
    if len(dataset) == 0:
        raise UserError("data: the preference dataset has no rows; check data.dataset_name and the split.")
    columns = {"data.chosen_column": cfg.chosen_column, "data.rejected_column": cfg.rejected_column}
    if cfg.margin_column is not None:
        columns["data.margin_column"] = cfg.margin_column
    require_columns(dataset, columns, cfg.dataset_name)
    prompt_col = prompt_column(dataset.column_names, cfg)
    # Chat templates write their own special tokens; plain text gets the tokenizer's (as the scorer does).
    chat = isinstance(dataset[0][cfg.chosen_column], list)
    encode_kwargs = {"add_special_tokens": not chat}

    def encode(rows: dict, indices: list[int]) -> dict:
        rows_as_dicts = _row_dicts(rows)
        texts = [pair_texts(row, tokenizer, cfg, prompt_col, i) for row, i in zip(rows_as_dicts, indices, strict=True)]
        for (chosen, rejected), i in zip(texts, indices, strict=True):
            if chosen == rejected:  # a data error; pairs that only become equal when cut are dropped below
                raise UserError(
                    f"data row {i}: {cfg.chosen_column!r} and {cfg.rejected_column!r} are the same text, so the pair "
                    "states no preference; fix or remove the row."
                )
        out = {}
        for side, side_texts in (("chosen", [t[0] for t in texts]), ("rejected", [t[1] for t in texts])):
            ids = tokenizer(side_texts, **encode_kwargs)["input_ids"]
            out[f"{side}_length"] = [len(x) for x in ids]
            long = [i for i, x in enumerate(ids) if len(x) > cfg.max_length]
            if long:  # re-encode only the long ones, letting the tokenizer keep its closing special token
                cut = tokenizer([side_texts[i] for i in long], truncation=True, max_length=cfg.max_length, **encode_kwargs)
                for i, x in zip(long, cut["input_ids"], strict=True):
                    ids[i] = x
            out[f"{side}_input_ids"] = ids
        out["identical"] = [c == r for c, r in zip(out["chosen_input_ids"], out["rejected_input_ids"], strict=True)]
        if cfg.margin_column is not None:
            out["margin"] = [_margin(row, cfg.margin_column, i) for row, i in zip(rows_as_dicts, indices, strict=True)]
        return out

    tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            num_proc=cfg.dataset_num_proc, desc="Tokenizing pairs")
    too_long = np.maximum(column_values(tokenized, "chosen_length"), column_values(tokenized, "rejected_length")) > cfg.max_length  # (N,)
    identical = np.asarray(column_values(tokenized, "identical"), dtype=bool)  # (N,)
    drop_long = too_long if cfg.long_pairs == "drop" else np.zeros_like(too_long)
    drop = drop_long | identical
    stats = {
        "pairs": len(dataset),
        "kept": int((~drop).sum()),
        "truncated": int((too_long & ~drop_long & ~identical).sum()),
        "dropped_too_long": int(drop_long.sum()),
        "dropped_identical": int((identical & ~drop_long).sum()),
    }
    if stats["kept"] == 0:
        raise UserError(
            f"data: none of the {len(dataset)} pairs is left after tokenization (longer than data.max_length="
            f"{cfg.max_length}: {int(too_long.sum())}, chosen identical to rejected: {int(identical.sum())}); "
            "raise data.max_length or set data.long_pairs: truncate."
        )
    if drop.any():
        tokenized = tokenized.select(np.flatnonzero(~drop))
    return tokenized.remove_columns(["chosen_length", "rejected_length", "identical"]), stats


class PairCollator:
    """rows {chosen_input_ids, rejected_input_ids[, margin]} -> one batch of 2B sequences.

    Rows 0..B-1 of the batch are the chosen responses, rows B..2B-1 the rejected ones, so one forward
    pass scores both sides of every pair (and both see the same padding length). Returns:
    - input_ids, attention_mask: (2B, T), T the longest side in the batch;
    - position_ids: (2B, T), only for left padding: a causal model numbers positions from the first
      column, so left-padded rows need positions that start at 0 at their first real token;
    - margin: (B,) float, when the rows carry one.

    Right padding is the default and what encoders need (BERT pools its first token, [CLS], and its
    positions start at column 0). For causal models either side gives the same scores: the score is
    read at the last real token (transformers' *ForSequenceClassification takes the rightmost token
    that is not the pad token).
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token first")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = pad_token_id, padding_side, pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [row["chosen_input_ids"] for row in rows] + [row["rejected_input_ids"] for row in rows]
        seq = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            seq = math.ceil(seq / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), seq), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((len(sequences), seq), dtype=torch.long)  # (2B, T)
        for i, ids in enumerate(sequences):  # one step per row, not per token
            where = slice(seq - len(ids), seq) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[i, where] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[i, where] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.padding_side == "left":
            batch["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (2B, T)
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([row["margin"] for row in rows], dtype=torch.float32)  # (B,)
        return batch
