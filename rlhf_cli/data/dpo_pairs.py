"""Preference pairs -> (prompt, chosen response, rejected response) token ids for DPO, and the collator.

DPO needs the prompt/response boundary: the loss counts response tokens only. The boundary comes from
the data, never from re-tokenising a joined text and guessing:
- explicit prompt (text): the prompt and each response are tokenized apart and concatenated; the
  prompt gets the tokenizer's own special tokens (a BOS for Llama, none for GPT-2), a response none,
  and an EOS is appended to each response so the model learns where an answer ends (as TRL does);
- explicit prompt (messages): the prompt is the chat template's rendering of the prompt messages
  with the generation prompt; a response is what the template renders after it for prompt +
  response messages (checked to be a prefix; the template writes the end-of-turn tokens itself);
- implicit prompt (only chosen/rejected): the prompt is their common beginning: the shared leading
  messages, or for text the shared characters cut back to a word boundary.

Truncation: a prompt longer than `max_prompt_length` keeps its last tokens (`keep_end`, the part
next to the response) or its first (`keep_start`); a response that does not fit in `max_length`
keeps its first tokens. A pair whose sides are the same text is a data error (exit 2, naming the
row); one whose sides only become identical when cut is dropped and counted.
"""

from __future__ import annotations

import logging

import torch
from datasets import Dataset

from rlhf_cli.config.schema import DPODataConfig
from rlhf_cli.data.chat_spans import chat_template
from rlhf_cli.data.collators import Seq2SeqCollator
from rlhf_cli.data.loading import column_values, require_columns
from rlhf_cli.data.preferences import prompt_column
from rlhf_cli.data.sft_format import IGNORE_INDEX, _messages, _row_dicts, _text, encode_texts
from rlhf_cli.errors import UserError

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")


def common_text_prefix(a: str, b: str) -> str:
    """The longest shared beginning of two texts, cut back to just before a whitespace character so
    each response starts with its own first word ("Film was" + " great" / " dull")."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    k = n - 1  # the last shared character; the cut goes before a shared whitespace character
    while k > 0 and not a[k].isspace():
        k -= 1
    return a[: max(k, 0)]


def common_messages(a: list[dict], b: list[dict]) -> list[dict]:
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return a[:n]


def _chat_ids(messages: list[dict], tokenizer, generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    ))


def split_pairs(rows: list[dict], tokenizer, cfg: DPODataConfig, prompt_col: str | None,
                indices: list[int]) -> list[tuple[list[int], list[int], list[int]]]:
    """Rows -> (prompt ids, chosen response ids, rejected response ids) each, untruncated. The texts of
    all plain rows go to the tokenizer in two calls (prompts with its special tokens, responses
    without), which a fast tokenizer runs in Rust; conversations are rendered row by row."""
    texts = [_pair_texts(row, cfg, prompt_col, i) for row, i in zip(rows, indices, strict=True)]
    plain = [t for t in texts if t is not None]
    prompts = iter(encode_texts(tokenizer, [p for p, _, _ in plain if p], add_special_tokens=True))
    responses = iter(encode_texts(tokenizer, [r for _, *sides in plain for r in sides]))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for row, i, pair in zip(rows, indices, texts, strict=True):
        if pair is None:
            out.append(_chat_pair(row, tokenizer, cfg, prompt_col, i))
            continue
        prompt_ids = next(prompts) if pair[0] else []
        chosen, rejected = next(responses) + eos, next(responses) + eos
        out.append((_non_empty_prompt(prompt_ids, tokenizer), chosen, rejected))
    return out


def _pair_texts(row: dict, cfg: DPODataConfig, prompt_col: str | None, index: int) -> tuple[str, str, str] | None:
    """A row of text -> (prompt, chosen response, rejected response); None for a conversation."""
    if isinstance(row[cfg.chosen_column], list) or isinstance(row[cfg.rejected_column], list):
        return None
    if prompt_col and isinstance(row[prompt_col], list):
        raise UserError(
            f"data row {index}: column {prompt_col!r} holds messages but {cfg.chosen_column!r} holds text; "
            "give all three as messages or all three as text."
        )
    chosen, rejected = _text(row, cfg.chosen_column, index), _text(row, cfg.rejected_column, index)
    if prompt_col:
        return _text(row, prompt_col, index), chosen, rejected
    prompt = common_text_prefix(chosen, rejected)
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _chat_pair(row: dict, tokenizer, cfg: DPODataConfig, prompt_col: str | None, index: int) -> tuple[list[int], list[int], list[int]]:
    """A conversational row -> (prompt ids, chosen response ids, rejected response ids)."""
    chosen, rejected = _messages(row, cfg.chosen_column, index), _messages(row, cfg.rejected_column, index)
    chat_template(tokenizer)
    if prompt_col:
        prompt = _messages(row, prompt_col, index)
    else:
        prompt = common_messages(chosen, rejected)
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    prompt_ids = _chat_ids(prompt, tokenizer, generation_prompt=True) if prompt else []
    responses = []
    for side, messages in zip(SIDES, (chosen, rejected), strict=True):
        ids = _chat_ids(prompt + messages, tokenizer, generation_prompt=False)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise UserError(
                f"data row {index}: the chat template does not render the prompt messages as a prefix of "
                f"prompt + {side}, so the response tokens cannot be found; use a template that does."
            )
        responses.append(ids[len(prompt_ids):])
    return _non_empty_prompt(prompt_ids, tokenizer), responses[0], responses[1]


def _non_empty_prompt(prompt_ids: list[int], tokenizer) -> list[int]:
    """A response's first token is predicted from the token before it: an empty prompt becomes the
    start-of-text token (BOS, else EOS, as GPT-2 starts texts)."""
    if prompt_ids:
        return prompt_ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError("data: a pair has an empty prompt and the tokenizer has no BOS/EOS token to start from.")
    return [start]


def truncate(prompt: list[int], responses: list[list[int]], cfg: DPODataConfig) -> tuple[list[int], list[list[int]], bool]:
    """Cut the prompt to max_prompt_length, then each response to the room left in max_length."""
    cut = len(prompt) > cfg.max_prompt_length
    if cut:
        prompt = prompt[-cfg.max_prompt_length:] if cfg.truncation_mode == "keep_end" else prompt[: cfg.max_prompt_length]
    room = cfg.max_length - len(prompt)  # >= 1: checks.py keeps max_prompt_length < max_length
    cut = cut or any(len(r) > room for r in responses)
    return prompt, [r[:room] for r in responses], cut


def tokenize_dpo_pairs(dataset: Dataset, tokenizer, cfg: DPODataConfig) -> tuple[Dataset, dict]:
    """Every pair -> {prompt_input_ids, chosen_input_ids, rejected_input_ids} (responses only in the
    last two). Returns (dataset, stats) with stats {"pairs", "kept", "truncated", "dropped_identical"}."""
    if len(dataset) == 0:
        raise UserError("data: the preference dataset has no rows; check data.dataset_name and the split.")
    require_columns(dataset, {"data.chosen_column": cfg.chosen_column, "data.rejected_column": cfg.rejected_column},
                    cfg.dataset_name)
    prompt_col = prompt_column(dataset.column_names, cfg)

    def encode(rows: dict, indices: list[int]) -> dict:
        out = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [], "truncated": [], "identical": []}
        for (prompt, chosen, rejected), i in zip(split_pairs(_row_dicts(rows), tokenizer, cfg, prompt_col, indices),
                                                 indices, strict=True):
            if chosen == rejected:
                raise UserError(
                    f"data row {i}: {cfg.chosen_column!r} and {cfg.rejected_column!r} are the same response, so "
                    "the pair states no preference; fix or remove the row."
                )
            prompt, (chosen, rejected), cut = truncate(prompt, [chosen, rejected], cfg)
            for key, value in zip(out, (prompt, chosen, rejected, cut, chosen == rejected), strict=True):
                out[key].append(value)
        return out

    tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            num_proc=cfg.dataset_num_proc, desc="Tokenizing pairs")
    identical = torch.tensor(column_values(tokenized, "identical"), dtype=torch.bool)  # (N,)
    truncated = torch.tensor(column_values(tokenized, "truncated"), dtype=torch.bool)  # (N,)
    stats = {"pairs": len(dataset), "kept": int((~identical).sum()), "truncated": int((truncated & ~identical).sum()),
             "dropped_identical": int(identical.sum())}
    if stats["kept"] == 0:
        raise UserError(
            f"data: all {len(dataset)} pairs have identical sides once cut to data.max_length={cfg.max_length}; "
            "raise data.max_length."
        )
    if identical.any():
        tokenized = tokenized.select(torch.nonzero(~identical).flatten().tolist())
    return tokenized.remove_columns(["truncated", "identical"]), stats


def with_reference_logps(batch: dict, rows: list[dict]) -> dict:
    """`batch` plus ref_chosen_logps / ref_rejected_logps (B,) when the rows carry precomputed ones."""
    for side in SIDES:
        if f"ref_{side}_logps" in rows[0]:
            batch[f"ref_{side}_logps"] = torch.tensor([row[f"ref_{side}_logps"] for row in rows], dtype=torch.float32)
    return batch


class DPOCollator:
    """rows {prompt_input_ids, chosen_input_ids, rejected_input_ids[, ref_*_logps]} -> one batch of 2B
    sequences: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected, so one forward pass
    computes both sides of every pair.

    Padded (default): input_ids, attention_mask, response_mask, all (2B, T), right padding (a causal
    model's real tokens never see later positions, so padding changes no log-prob).
    Padding-free: the 2B sequences side by side in ONE row: input_ids, position_ids, response_mask
    (1, N) with N the total length, position_ids restarting at 0 per sequence (transformers then keeps
    the sequences apart when called without an attention mask, as for packed SFT), and
    sequence_index (N,) saying which of the 2B sequences each token belongs to.
    response_mask is True at response tokens: the tokens whose log-prob counts.
    ref_chosen_logps / ref_rejected_logps (B,) when the rows carry precomputed reference log-probs.
    """

    def __init__(self, pad_token_id: int, padding_free: bool = False):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token first")
        self.pad_token_id, self.padding_free = pad_token_id, padding_free

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(row["prompt_input_ids"], row[f"{side}_input_ids"]) for side in SIDES for row in rows]
        batch = self._flat(sequences) if self.padding_free else self._padded(sequences)
        return with_reference_logps(batch, rows)

    def _padded(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        seq = max(len(p) + len(r) for p, r in sequences)
        input_ids = torch.full((len(sequences), seq), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((len(sequences), seq), dtype=torch.long)  # (2B, T)
        response_mask = torch.zeros((len(sequences), seq), dtype=torch.bool)  # (2B, T)
        for i, (prompt, response) in enumerate(sequences):  # one step per row, not per token
            n = len(prompt) + len(response)
            input_ids[i, :n] = torch.as_tensor(prompt + response, dtype=torch.long)
            attention_mask[i, :n] = 1
            response_mask[i, len(prompt):n] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}

    def _flat(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        ids, positions, response, index = [], [], [], []
        for i, (prompt, reply) in enumerate(sequences):
            n = len(prompt) + len(reply)
            ids += prompt + reply
            positions += range(n)
            response += [False] * len(prompt) + [True] * len(reply)
            index += [i] * n
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
            "position_ids": torch.tensor([positions], dtype=torch.long),  # (1, N)
            "response_mask": torch.tensor([response], dtype=torch.bool),  # (1, N)
            "sequence_index": torch.tensor(index, dtype=torch.long),  # (N,)
        }


class Seq2SeqDPOCollator:
    """The DPOCollator batch for an encoder-decoder: rows 0..B-1 chosen, B..2B-1 rejected, the prompt
    as the encoder's input (input_ids, attention_mask (2B, S), right-padded) and each response as
    the decoder's target: labels (2B, T) with -100 on padding, decoder_input_ids (2B, T) the labels
    shifted right, response_mask (2B, T) True at the response tokens (every real target token)."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: int):
        self.targets = Seq2SeqCollator(pad_token_id, decoder_start_token_id)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        examples = [{"input_ids": row["prompt_input_ids"], "labels": row[f"{side}_input_ids"]}
                    for side in SIDES for row in rows]
        batch = self.targets(examples)
        batch["response_mask"] = batch["labels"] != IGNORE_INDEX
        return with_reference_logps(batch, rows)
