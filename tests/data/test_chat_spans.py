"""The assistant's tokens under chat templates without {% generation %} markers, in the styles of the
templates real checkpoints ship (tests/chat_templates.py: Llama 3 with its date line, ChatML/Qwen 2.5
with a default system prompt, Mistral, Gemma, Phi-3), on the built-in byte-level tokenizer with each
style's special tokens added; and tool calling: a row's `tools` column rendered with its conversation, tool
calls trained, tool messages not."""

import json

import pytest
from chat_templates import CHATML, DROPS_REASONING, GEMMA, LLAMA3, MISTRAL, PHI3, QWEN_TOOLS, with_chat_tokens
from datasets import Dataset

from rlhf_cli.config.schema import SFTDataConfig
from rlhf_cli.data.chat_spans import assistant_mask, row_tools
from rlhf_cli.data.sft_format import IGNORE_INDEX, tokenize_example
from rlhf_cli.errors import UserError
from rlhf_cli.models.loading import load_tokenizer

# What each style trains after the reply: its end-of-turn marker and the separator after it.
TURN_END = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>\n", "mistral": "<|endoftext|>",
            "gemma": "<end_of_turn>\n", "phi3": "<|end|>\n"}
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "mistral": MISTRAL, "gemma": GEMMA, "phi3": PHI3}

CONVERSATION = [
    {"role": "user", "content": "Was the film good?"},
    {"role": "assistant", "content": "Yes, a moving story."},
    {"role": "user", "content": "And the acting?"},
    {"role": "assistant", "content": "Superb, every scene."},
]


def tokenizer_with(template: str):
    tok = with_chat_tokens(load_tokenizer("builtin:tiny-gpt2"))
    tok.chat_template = template
    return tok


def trained_text(tok, ids, mask) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, run = [], []
    for token, on in zip(ids, mask, strict=True):
        if on:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


@pytest.mark.parametrize("style", sorted(TEMPLATES))
def test_each_assistant_turn_and_its_end_marker_are_trained_and_nothing_else(style):
    tok = tokenizer_with(TEMPLATES[style])
    ids, mask = assistant_mask(tok, CONVERSATION, "row 0")
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    lead = " " if style == "mistral" else ""
    last_end = TURN_END[style] + ("<|endoftext|>" if style == "phi3" else "")  # Phi-3's closing eos
    assert trained_text(tok, ids, mask) == [f"{lead}Yes, a moving story.{TURN_END[style]}",
                                           f"{lead}Superb, every scene.{last_end}"]


def test_system_prompt_and_tool_messages_are_not_trained():
    tok = tokenizer_with(CHATML)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "Calling the calculator."},
                {"role": "tool", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
    ids, mask = assistant_mask(tok, messages, "row 0")
    assert trained_text(tok, ids, mask) == ["Calling the calculator.<|im_end|>\n", "It is 5.<|im_end|>\n"]
    assert "You are a helpful assistant." not in tok.decode(ids)  # the row's own system prompt replaces the default


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_way_out():
    tok = tokenizer_with(DROPS_REASONING)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think>Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now"}]
    with pytest.raises(UserError, match=r"row 7: assistant turn 1 .*completion_only_loss: false"):
        assistant_mask(tok, messages, "row 7")


def test_a_template_that_rejects_the_roles_is_a_user_error():
    with pytest.raises(UserError, match="row 3: the chat template rejects these messages .*Only user and assistant"):
        assistant_mask(tokenizer_with(MISTRAL), [{"role": "system", "content": "x"}, *CONVERSATION], "row 3")


def test_generation_markers_are_used_when_present():
    """The built-in template marks its assistant turns: transformers' mask is taken as it is."""
    tok = load_tokenizer("builtin:tiny-gpt2")
    ids, mask = assistant_mask(tok, CONVERSATION[:2], "row 0")
    out = tok.apply_chat_template(CONVERSATION[:2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"]) and mask == [bool(m) for m in out["assistant_masks"]]


# ---------------------------------------------------------------- tool calling (a row's `tools` column)

SCHEMA = {"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic.", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 2+3"}},
    "required": ["expression"]}}}
OTHER = {"type": "function", "function": {"name": "lookup", "description": "Find a passage.", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "description": "words"}}, "required": ["query"]}}}
TOOL_CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}
WITH_TOOLS = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
              {"role": "tool", "name": "calculator", "content": "5"}, {"role": "assistant", "content": "It is 5."}]
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'


def test_tool_calls_are_trained_and_tool_responses_are_not_without_generation_markers():
    tok = tokenizer_with(QWEN_TOOLS)
    ids, mask = assistant_mask(tok, WITH_TOOLS, "row 0", [SCHEMA])
    assert ids == tok.apply_chat_template(WITH_TOOLS, tools=[SCHEMA], tokenize=True, return_dict=False)
    assert trained_text(tok, ids, mask) == [f"{CALL_TEXT}<|im_end|>\n", "It is 5.<|im_end|>\n"]
    assert "# Tools" in tok.decode(ids) and '"name": "calculator"' in tok.decode(ids)  # rendered with the tools


def test_a_tools_column_is_rendered_with_its_row_in_sft():
    """Arrow stores the rows' schemas (and tool calls) as structs, filling the keys a row lacks with None:
    the row renders exactly as its own schemas and calls, no null anywhere; calls and answer are trained."""
    rows = Dataset.from_list([{"messages": WITH_TOOLS, "tools": [SCHEMA]},
                              {"messages": WITH_TOOLS[:1] + [{"role": "assistant", "content": "Let me look.", "tool_calls": [
                                  {"type": "function", "function": {"name": "lookup", "arguments": {"query": "x"}}}]}],
                               "tools": [OTHER, SCHEMA]}])
    assert rows[0]["tools"][0]["function"]["parameters"]["properties"]["query"] is None  # what Arrow did
    tok = load_tokenizer("builtin:tiny-gpt2")
    cfg = SFTDataConfig(dataset_name="x")
    for row, tools, messages in zip(rows, ([SCHEMA], [OTHER, SCHEMA]), (WITH_TOOLS, None), strict=True):
        out = tokenize_example(row, tok, "messages", cfg)
        text = tok.decode(out["input_ids"])
        assert "null" not in text
        if messages is not None:
            assert text == tok.apply_chat_template(messages, tools=tools, tokenize=False)
            trained = tok.decode([i for i, label in zip(out["input_ids"], out["labels"], strict=True) if label != IGNORE_INDEX])
            assert trained == f"{CALL_TEXT}<|endoftext|>It is 5.<|endoftext|>"
    as_json = tokenize_example({"messages": WITH_TOOLS, "tools": json.dumps([SCHEMA])}, tok, "messages", cfg)
    assert as_json["input_ids"] == tokenize_example({"messages": WITH_TOOLS, "tools": [SCHEMA]}, tok, "messages", cfg)[
        "input_ids"]


def test_row_tools_reads_schemas_as_lists_json_or_json_strings_and_names_a_bad_row():
    assert row_tools(None, "row 0") is None and row_tools([], "row 0") is None
    assert row_tools([SCHEMA], "row 0") == row_tools(json.dumps([SCHEMA]), "row 0") == [SCHEMA]
    assert row_tools([json.dumps(SCHEMA)], "row 0") == [SCHEMA]
    with pytest.raises(UserError, match="data row 4: column 'tools' must be a list of JSON schemas"):
        row_tools("not json", "data row 4")
    with pytest.raises(UserError, match="data row 4: column 'tools'"):
        row_tools([1, 2], "data row 4")
