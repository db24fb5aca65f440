"""Which tokens of a conversation rendered by a chat template the assistant wrote, for any template.

A template with `{% generation %}` markers says so itself (transformers' `return_assistant_tokens_mask`).
Almost no released template has them (Llama 3, Qwen 2.5 / ChatML, Mistral, Gemma, Phi-3 do not), but
nearly all render the beginning of a conversation as a prefix of the whole. For those, the tokens of
assistant turn k are found by rendering twice:

    before  = render(messages[:k], add_generation_prompt=True)   ends where the reply begins
    through = render(messages[:k + 1])                           ends after the turn's end marker

`before` must be a token prefix of render(messages); the turn's span runs from there to where `through`
stops agreeing with render(messages) (all of `through` but for what a template writes only at the very
end of a conversation, like Phi-3's eos). It is trained: the reply, the end-of-turn marker the model
must learn to emit (`<|eot_id|>`, `<|im_end|>`, `</s>`, `<end_of_turn>`, ...) and whatever separator
the template writes right after it. Each span must decode
to text that holds the message's content. A template that is not prefix-preserving (one that drops an
earlier turn's reasoning, or renders the last turn differently) cannot be read this way: UserError,
saying so. Default system prompts and date lines are no obstacle: every rendering has them alike.

Tool calling (TRL's convention): a row's `tools` column, a list of JSON schemas, is given to every
rendering (`apply_chat_template(tools=...)`), so the template lists the tools as the model will see them in
RL (`environment.protocol: chat`). An assistant message's `tool_calls` are part of its turn, so they are
trained; `tool` messages are context like user turns, never trained. Arrow stores a list of schemas (and
of tool calls) as structs and fills the keys one lacks with None; `row_tools` and `clean_tool_calls` drop
those again (tools as a JSON string, or a list of them, are read too).
"""

from __future__ import annotations

import json
import re
from typing import Any

from jinja2 import TemplateError

from rlhf_cli.errors import UserError

# `{% generation %}`, `{%- generation -%}`, ... in a chat template: what return_assistant_tokens_mask needs.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template(tokenizer) -> str:
    """The tokenizer's (default) chat template; UserError when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default")
    if not template:
        raise UserError(
            "data: the rows hold messages but the tokenizer has no chat template; use a tokenizer with one "
            "(e.g. the built-in tokenizer) or give the rows as text / prompt-completion."
        )
    return template


def has_generation_markers(tokenizer) -> bool:
    return bool(_GENERATION_TAG.search(chat_template(tokenizer)))


def row_tools(value: Any, where: str) -> list[dict] | None:
    """A row's `tools` column -> the list of JSON schemas to render with (None for none): a list of
    mappings (the None-valued keys Arrow adds dropped), a JSON string of one, or a list of JSON strings."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            value = json.loads(value)
        tools = [json.loads(tool) if isinstance(tool, str) else tool for tool in value]
    except (TypeError, ValueError):
        tools = None
    if tools is None or not all(isinstance(tool, dict) for tool in tools):
        raise UserError(f"{where}: column 'tools' must be a list of JSON schemas of functions "
                        f"({{\"type\": \"function\", \"function\": {{...}}}}), got {str(value)[:80]!r}.")
    return [_without_none(tool) for tool in tools] or None


def clean_tool_calls(messages: list[dict]) -> list[dict]:
    """`messages` with the None-valued keys Arrow adds inside `tool_calls` dropped (transformers drops
    those at the top level of a message itself)."""
    return [{**m, "tool_calls": _without_none(m["tool_calls"])} if m.get("tool_calls") else m for m in messages]


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def render(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool = False,
           tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` (with `tools`, JSON schemas) through the chat template; a template that
    rejects them is a UserError (`where` names the row)."""
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                            add_generation_prompt=add_generation_prompt, tools=tools)
    except TemplateError as err:  # the template rejects the conversation (unknown role, bad order, ...)
        raise UserError(f"{where}: the chat template rejects these messages ({err}); fix or remove the row.") from None
    return list(ids)


def assistant_mask(tokenizer, messages: list[dict], where: str,
                   tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
    """(ids of the whole conversation rendered with `tools`, True at the tokens of every assistant turn)."""
    if has_generation_markers(tokenizer):
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True, tools=tools)
        except TemplateError as err:
            raise UserError(f"{where}: the chat template rejects these messages ({err}); fix or remove the row.") from None
        return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    ids = render(tokenizer, messages, where, tools=tools)
    mask = [False] * len(ids)
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = render(tokenizer, messages[:k], where, add_generation_prompt=True, tools=tools)
        if ids[: len(before)] != before:
            raise UserError(
                f"{where}: the chat template does not render the start of this conversation as a prefix "
                f"of the whole (it differs before assistant turn {k}), so the assistant's tokens cannot "
                "be found without {% generation %} markers; add the markers to the template, or set "
                "data.completion_only_loss: false to train on every token."
            )
        # The turn ends where rendering it as the last turn stops agreeing with the whole: a template
        # that closes the conversation with an extra token (Phi-3's eos) writes it only at the very end.
        through = render(tokenizer, messages[: k + 1], where, tools=tools)
        end = next((i for i, (a, b) in enumerate(zip(through, ids, strict=False)) if a != b), min(len(through), len(ids)))
        span = ids[len(before) : end]
        content = message.get("content")
        if isinstance(content, str) and content.strip() and content.strip() not in tokenizer.decode(span):
            raise UserError(
                f"{where}: assistant turn {k} was located by rendering the conversation's prefixes, but its "
                f"tokens decode to {tokenizer.decode(span)[:80]!r}, not to the message's content; add "
                "{% generation %} markers to the template, or set data.completion_only_loss: false."
            )
        mask[len(before) : end] = [True] * len(span)
    return ids, mask
