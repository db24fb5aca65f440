"""SFT rows -> encoder inputs and decoder targets, for encoder-decoder models (T5, BART).

An encoder-decoder learns a target given an input, so a row must say which is which:
- prompt-completion: the prompt is the input, the completion (+ eos) the target; conversational
  prompt-completion (lists of messages): the prompt rendered by the chat template with the
  generation prompt is the input, the completion's assistant message (+ eos) the target;
- messages: one example per assistant turn: the conversation before the turn, rendered with the
  generation prompt, is the input; the turn's content (+ eos) the target. A conversation with three
  assistant turns gives three examples, each trained on its own reply;
- text: no split, so exit 2 (a causal LM is the model for language modelling on plain text).
Inputs are encoded as `rlhf ppo` / `grpo` / `rloo` encode prompts (no special tokens added,
lm/generation.py `encode_prompts`), so a model is trained on inputs exactly as the RL stages feed them.
Every target token is trained, so `completion_only_loss` has nothing to choose. An input longer than
`max_length` keeps its last tokens (the part next to the answer, as `long_prompts: truncate_left`); a
target keeps its first.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from rlhf_cli.config.schema import SFTDataConfig
from rlhf_cli.data.chat_spans import chat_template, render
from rlhf_cli.data.loading import column_values
from rlhf_cli.data.sft_format import _messages, _row_dicts, _text, _with_eos, detect_format, encode_texts
from rlhf_cli.errors import UserError


def tokenize_seq2seq_dataset(dataset: Dataset, tokenizer, cfg: SFTDataConfig) -> tuple[Dataset, dict]:
    """Every row -> examples {"input_ids": encoder input, "labels": decoder target}.

    Returns (dataset, stats) with stats {"examples", "kept", "dropped_no_trainable_tokens",
    "truncated"} as tokenize_dataset gives them for causal LMs; "examples" and "kept" count examples
    (a multi-turn conversation makes several), and none is dropped: every target token is trained."""
    if len(dataset) == 0:
        raise UserError("data: the SFT dataset has no rows; check data.dataset_name and the split.")
    fmt = detect_format(dataset.column_names, cfg)
    if fmt == "text":
        raise UserError(
            f"data: the rows are plain text ({cfg.text_column!r}), but an encoder-decoder model learns a target "
            "given an input; give prompt-completion rows (data.prompt_column, data.completion_column) or "
            "messages, or train a causal LM on plain text."
        )

    def encode(rows: dict, indices: list[int]) -> dict:
        out = {"input_ids": [], "labels": [], "num_tokens": []}
        for examples in _examples(_row_dicts(rows), tokenizer, fmt, cfg, indices):
            for source, target in examples:
                out["input_ids"].append(source[-cfg.max_length:])
                out["labels"].append(target[: cfg.max_length])
                out["num_tokens"].append(max(len(source), len(target)))
        return out

    tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            num_proc=cfg.dataset_num_proc, desc=f"Tokenizing ({fmt}, encoder-decoder)")
    if len(tokenized) == 0:
        raise UserError(f"data: none of the {len(dataset)} conversations has an assistant turn to learn.")
    stats = {"examples": len(tokenized), "kept": len(tokenized), "dropped_no_trainable_tokens": 0,
             "truncated": int((np.asarray(column_values(tokenized, "num_tokens")) > cfg.max_length).sum())}
    return tokenized.remove_columns(["num_tokens"]), stats


def _examples(rows: list[dict], tokenizer, fmt: str, cfg: SFTDataConfig,
              indices: list[int]) -> list[list[tuple[list[int], list[int]]]]:
    """Rows -> each row's (input ids, target ids) examples, untruncated. The inputs and the targets of all
    plain rows go to the tokenizer in one call each; conversations are rendered row by row."""
    plain = [_plain_pair(row, fmt, cfg, index) for row, index in zip(rows, indices, strict=True)]
    sources = iter(encode_texts(tokenizer, [pair[0] for pair in plain if pair]))
    targets = iter(encode_texts(tokenizer, [pair[1] for pair in plain if pair]))
    eos = tokenizer.eos_token_id
    return [_conversation_examples(row, tokenizer, fmt, cfg, index) if pair is None
            else [(next(sources), _with_eos(next(targets), eos))]
            for row, index, pair in zip(rows, indices, plain, strict=True)]


def _plain_pair(row: dict, fmt: str, cfg: SFTDataConfig, index: int) -> tuple[str, str] | None:
    """A prompt-completion row of text -> (input text, target text); None for a conversation."""
    if fmt == "messages" or isinstance(row[cfg.prompt_column], list) or isinstance(row[cfg.completion_column], list):
        return None
    return _text(row, cfg.prompt_column, index), _text(row, cfg.completion_column, index)


def _conversation_examples(row: dict, tokenizer, fmt: str, cfg: SFTDataConfig, index: int) -> list[tuple[list[int], list[int]]]:
    """A conversation -> its (input ids, target ids) examples, untruncated."""
    if fmt == "messages":
        messages = _messages(row, cfg.messages_column, index)
        chat_template(tokenizer)
        where = f"data row {index}: column {cfg.messages_column!r}"
        return [(render(tokenizer, messages[:turn], where, add_generation_prompt=True),
                 _target(tokenizer, message["content"]))
                for turn, message in enumerate(messages) if message["role"] == "assistant" and turn > 0]
    prompt = _messages(row, cfg.prompt_column, index)
    completion = _messages(row, cfg.completion_column, index)
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise UserError(
            f"data row {index}: column {cfg.completion_column!r} must hold one assistant message for an "
            f"encoder-decoder model (it holds {len(completion)} message(s)); put longer conversations in "
            "data.messages_column."
        )
    chat_template(tokenizer)
    where = f"data row {index}: column {cfg.prompt_column!r}"
    return [(render(tokenizer, prompt, where, add_generation_prompt=True), _target(tokenizer, completion[0]["content"]))]


def _target(tokenizer, text: str) -> list[int]:
    """A reply's tokens and the eos that ends it (the model learns to stop)."""
    return _with_eos(encode_texts(tokenizer, [text])[0], tokenizer.eos_token_id)
