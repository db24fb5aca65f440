"""Turn SFT rows (text, prompt-completion or messages) into `input_ids` and `labels`.

Conventions shared by every format:
- `labels` has the length of `input_ids`; -100 marks a token the loss ignores. Labels are NOT shifted:
  Hugging Face causal LMs shift internally (logits at t predict labels[t + 1]), so labels[0] is
  never trained and "trainable" below means "a label other than -100 after position 0".
- No bos is added (GPT-2 style, `add_special_tokens=False`): the built-in tokenizer and GPT-2
  checkpoints expect none. A chat template that writes a bos writes it itself.
- text and prompt-completion end with the tokenizer's eos (unless the text already ends with it) so
  the model learns to stop; the eos is trained. For messages the chat template decides where turns
  end; the assistant's turns are found by the template's {% generation %} markers or, for the many
  templates without them, by rendering the conversation's prefixes (chat_spans.py). A `tools` column
  (TRL's convention: a list of JSON schemas) is rendered with every conversation of its row; the
  assistant's tool calls are trained, `tool` messages are not.
- Sequences longer than `max_length` keep their first `max_length` tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset

from rlhf_cli.config.schema import SFTDataConfig
from rlhf_cli.data.chat_spans import assistant_mask, chat_template, clean_tool_calls, render, row_tools
from rlhf_cli.data.loading import column_values
from rlhf_cli.errors import UserError

IGNORE_INDEX = -100
FORMATS = ("text", "prompt-completion", "messages")
TOOLS_COLUMN = "tools"  # TRL's name for a row's tool schemas (conversational rows)


def detect_format(column_names: list[str], cfg: SFTDataConfig) -> str:
    """The row format: `cfg.dataset_format`, or for `auto` the first whose columns are present
    (messages, then prompt-completion, then text). Raises UserError when the columns are missing."""
    columns = set(column_names)
    wanted = {
        "messages": [cfg.messages_column],
        "prompt-completion": [cfg.prompt_column, cfg.completion_column],
        "text": [cfg.text_column],
    }
    if cfg.dataset_format != "auto":
        missing = [c for c in wanted[cfg.dataset_format] if c not in columns]
        if missing:
            raise UserError(
                f"data.dataset_format is {cfg.dataset_format!r} but the dataset has no column "
                f"{', '.join(map(repr, missing))} (it has {_names(column_names)}); rename the column "
                f"or set data.{_column_key(cfg, missing[0])} to the right name."
            )
        return cfg.dataset_format
    for fmt in ("messages", "prompt-completion", "text"):
        if all(c in columns for c in wanted[fmt]):
            return fmt
    raise UserError(
        f"data: cannot tell the SFT row format from the columns {_names(column_names)}; expected "
        f"{cfg.messages_column!r} (messages), {cfg.prompt_column!r} + {cfg.completion_column!r} "
        f"(prompt-completion) or {cfg.text_column!r} (text). Set data.text_column / prompt_column / "
        "completion_column / messages_column to your column names, or data.dataset_format."
    )


def tokenize_example(row: dict[str, Any], tokenizer, fmt: str, cfg: SFTDataConfig, index: int = 0) -> dict:
    """One row -> {"input_ids": list[int], "labels": list[int], "num_tokens": int}.

    `num_tokens` is the length before truncation (tokenize_dataset counts truncations with it).
    `index` only names the row in error messages.
    """
    return tokenize_examples([row], tokenizer, fmt, cfg, [index])[0]


def tokenize_examples(rows: list[dict[str, Any]], tokenizer, fmt: str, cfg: SFTDataConfig, indices: list[int]) -> list[dict]:
    """Many rows -> tokenize_example's dicts, in order. The plain-text pieces of all of them go to the
    tokenizer in one call; conversations are rendered row by row through the chat template."""
    parts = [_plain_parts(row, fmt, cfg, index) for row, index in zip(rows, indices, strict=True)]
    encoded = iter(encode_texts(tokenizer, [text for part in parts if part for side in part for text, _ in side]))
    eos = tokenizer.eos_token_id  # a property that looks the token up: read once, not per row
    out = []
    for row, index, part in zip(rows, indices, parts, strict=True):
        if part is None:
            ids, labels = _conversational(row, tokenizer, fmt, cfg, index)
        else:
            prompt, completion = ([(next(encoded), trained) for _, trained in side] for side in part)
            ids, labels = _joined(prompt, completion, eos)
        # Truncation keeps the first max_length tokens (labels stay aligned with ids).
        out.append({"input_ids": ids[: cfg.max_length], "labels": labels[: cfg.max_length], "num_tokens": len(ids)})
    return out


def _plain_parts(row: dict, fmt: str, cfg: SFTDataConfig, index: int) -> tuple[list, list] | None:
    """A row of plain text -> (prompt pieces, completion pieces), each piece (text, trained); None for a
    conversation (messages, or prompt-completion holding lists of messages).

    Prompt and completion are tokenized apart and concatenated, so the boundary is exact. With BPE,
    tokenize(prompt + completion) can merge across it (prompt "Hel", completion "lo" -> one token
    "Hello"); apart, the model trains on the prompt tokenized exactly as it will be at generation time,
    followed by the completion tokens it must produce. Tool results (data.tool_result_markers) are
    pieces of their own, as a text environment appends them, and never trained: the model does not
    write them. A text row is a completion with no prompt."""
    if fmt == "text":
        return [], [(_text(row, cfg.text_column, index), True)]
    if fmt != "prompt-completion" or isinstance(row[cfg.prompt_column], list) or isinstance(row[cfg.completion_column], list):
        return None
    prompt = _text(row, cfg.prompt_column, index)
    completion = _text(row, cfg.completion_column, index)
    return ([(prompt, not cfg.completion_only_loss)],
            [(piece, not is_result) for piece, is_result in _segments(completion, cfg.tool_result_markers)])


def _joined(prompt: list[tuple[list[int], bool]], completion: list[tuple[list[int], bool]], eos: int | None) -> tuple[list[int], list[int]]:
    """Encoded pieces (ids, trained) -> (input ids, labels): the prompt, then the completion ending with the
    tokenizer's eos (trained, so the model learns to stop), unless it already ends with it."""
    completion_ids = [t for ids, _ in completion for t in ids]
    with_eos = _with_eos(completion_ids, eos)
    ids = [t for ids, _ in prompt for t in ids] + with_eos
    trained = [flag for ids, flag in prompt + completion for _ in ids] + [True] * (len(with_eos) - len(completion_ids))
    return ids, _mask_labels(ids, trained)


def _conversational(row: dict, tokenizer, fmt: str, cfg: SFTDataConfig, index: int) -> tuple[list[int], list[int]]:
    """A conversation -> (input ids, labels), rendered by the chat template."""
    if fmt == "prompt-completion":
        ids, trained = _conversational_prompt_completion(row, tokenizer, cfg, index)
        return ids, _mask_labels(ids, trained if cfg.completion_only_loss else [True] * len(ids))
    if fmt != "messages":
        raise ValueError(f"unknown SFT format {fmt!r}; expected one of {FORMATS}")
    messages = clean_tool_calls(_messages(row, cfg.messages_column, index))
    chat_template(tokenizer)
    where = f"data row {index}: column {cfg.messages_column!r}"
    tools = row_tools(row.get(TOOLS_COLUMN), f"data row {index}")
    if cfg.completion_only_loss:  # the assistant's turns, for any prefix-preserving template (chat_spans.py)
        ids, trained = assistant_mask(tokenizer, messages, where, tools)
        return ids, _mask_labels(ids, trained)
    ids = render(tokenizer, messages, where, tools=tools)
    return ids, list(ids)


def tokenize_dataset(dataset: Dataset, tokenizer, cfg: SFTDataConfig) -> tuple[Dataset, dict]:
    """Tokenize every row, truncate, drop rows left with no trainable label.

    Returns (dataset with only `input_ids` and `labels`, stats) where stats is
    {"examples", "kept", "dropped_no_trainable_tokens", "truncated"}.
    """
    if len(dataset) == 0:
        raise UserError("data: the SFT dataset has no rows; check data.dataset_name and the split.")
    fmt = detect_format(dataset.column_names, cfg)

    def encode(rows: dict, indices: list[int]) -> dict:
        examples = tokenize_examples(_row_dicts(rows), tokenizer, fmt, cfg, indices)
        out = {key: [example[key] for example in examples] for key in ("input_ids", "labels", "num_tokens")}
        # list.count runs in C: no per-token Python loop. labels[0] is never a target (see top).
        out["trainable"] = [labels[1:].count(IGNORE_INDEX) < len(labels) - 1 for labels in out["labels"]]
        return out

    tokenized = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                            num_proc=cfg.dataset_num_proc, desc=f"Tokenizing ({fmt})")
    num_tokens = np.asarray(column_values(tokenized, "num_tokens"))
    trainable = np.asarray(column_values(tokenized, "trainable"), dtype=bool)
    stats = {
        "examples": len(dataset),
        "kept": int(trainable.sum()),
        "dropped_no_trainable_tokens": int((~trainable).sum()),
        "truncated": int((num_tokens > cfg.max_length).sum()),
    }
    if stats["kept"] == 0:
        raise UserError(
            f"data: none of the {len(dataset)} rows has a trainable token after truncation to "
            f"data.max_length={cfg.max_length}; raise data.max_length, shorten the prompts, or set "
            "data.completion_only_loss: false."
        )
    if stats["dropped_no_trainable_tokens"]:
        tokenized = tokenized.select(np.flatnonzero(trainable))
    return tokenized.remove_columns(["num_tokens", "trainable"]), stats


# --- helpers -------------------------------------------------------------------------------------


def _row_dicts(rows: dict[str, list]) -> list[dict]:
    """A batch of `Dataset.map(batched=True)` (column -> values) -> one dict per row."""
    return [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]


def encode_texts(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Texts -> their ids, in one tokenizer call (a fast tokenizer encodes a list in Rust, ~3x faster than
    one call per text)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]] if texts else []


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return ids + [eos]


def _segments(text: str, markers: list[str] | None) -> list[tuple[str, bool]]:
    """A completion -> (text, is a tool result) pieces in order; a result runs from a start marker
    through the next end marker (to the end of the text if it is never closed)."""
    if not markers:
        return [(text, False)]
    start, end = markers
    pieces, at = [], 0
    while (opening := text.find(start, at)) >= 0:
        closing = text.find(end, opening + len(start))
        stop = len(text) if closing < 0 else closing + len(end)
        pieces += [(text[at:opening], False), (text[opening:stop], True)]
        at = stop
    pieces.append((text[at:], False))
    return [(piece, is_result) for piece, is_result in pieces if piece]


def _mask_labels(ids: list[int], trained) -> list[int]:
    """labels = ids where `trained` (bools or 0/1), -100 elsewhere; vectorised with numpy."""
    return np.where(np.asarray(trained, dtype=bool), np.asarray(ids), IGNORE_INDEX).tolist()


def _text(row: dict, column: str, index: int) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise UserError(
            f"data row {index}: column {column!r} holds {type(value).__name__} {_short(value)}, not text; "
            "fix the row or point the column option at a text column."
        )
    if not value:
        raise UserError(f"data row {index}: column {column!r} is empty; remove the row or fill it.")
    return value


def _messages(row: dict, column: str, index: int) -> list[dict]:
    value = row[column]
    if not isinstance(value, list) or not value:
        problem = "is empty" if isinstance(value, list) else f"holds {type(value).__name__} {_short(value)}"
        raise UserError(
            f"data row {index}: column {column!r} {problem}; it must be a non-empty list of "
            "{role, content} messages."
        )
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(
                f"data row {index}: column {column!r} holds {_short(message)}; every message must be a "
                "{role, content} mapping."
            )
    return value


def _conversational_prompt_completion(row, tokenizer, cfg, index) -> tuple[list[int], list[bool]]:
    """TRL's "conversational prompt-completion": prompt and completion are lists of messages.

    The completion is what the chat template renders after the prompt with add_generation_prompt, so
    no {% generation %} tags are needed: trained = every token past the rendered prompt.
    """
    prompt = clean_tool_calls(_messages(row, cfg.prompt_column, index))
    completion = clean_tool_calls(_messages(row, cfg.completion_column, index))
    chat_template(tokenizer)
    tools = row_tools(row.get(TOOLS_COLUMN), f"data row {index}")
    prompt_ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False,
                                                    tools=tools))
    ids = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False, tools=tools))
    if ids[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            f"data row {index}: the chat template does not render the prompt messages as a prefix of "
            "prompt + completion, so the completion tokens cannot be found; use a template that does, "
            "or put the whole conversation in data.messages_column."
        )
    return ids, [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))


def _column_key(cfg: SFTDataConfig, column: str) -> str:
    for key in ("messages_column", "prompt_column", "completion_column", "text_column"):
        if getattr(cfg, key) == column:
            return key
    return "dataset_format"


def _names(columns) -> str:
    return ", ".join(map(repr, columns)) or "no columns"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
