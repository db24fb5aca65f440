"""The assistant's tokens under chat templates without {% generation %} markers, in the styles of the
templates real checkpoints ship (tests/chat_templates.py: Llama 3 with its date line, ChatML/Qwen 2.5
with a default system prompt, Mistral, Gemma, Phi-3), on the built-in byte-level tokenizer with each
style's special tokens added."""

import pytest
from chat_templates import CHATML, DROPS_REASONING, GEMMA, LLAMA3, MISTRAL, PHI3, with_chat_tokens

from rlhf_cli.data.chat_spans import assistant_mask
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
