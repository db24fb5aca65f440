"""Prompt encoding (lm/generation.py `encode_prompts`): the strings of a prompt set go to the tokenizer in one
call, conversations through the chat template; each row must get its own ids back, cut or refused by length."""

import pytest

from rlhf_cli.errors import UserError
from rlhf_cli.lm.generation import encode_prompts
from rlhf_cli.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-gpt2")


def test_strings_and_conversations_each_get_their_own_ids_and_long_ones_keep_their_end(tok):
    conversation = [{"role": "user", "content": "Review the film."}]
    long = "My sister and I went to see a film about"
    prompts = ["I watched The", conversation, long, "It"]
    chat = list(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False))
    limit = len(chat)
    assert len(tok.encode(long, add_special_tokens=False)) > limit > len(tok.encode("I watched The"))

    ids, cut = encode_prompts(prompts, tok, limit, "truncate_left")
    assert ids == [tok.encode("I watched The", add_special_tokens=False), chat,
                   tok.encode(long, add_special_tokens=False)[-limit:], tok.encode("It", add_special_tokens=False)]
    assert cut == 1
    with pytest.raises(UserError, match=rf"data row 2: the prompt has \d+ tokens, more than data.max_prompt_length \({limit}\)"):
        encode_prompts(prompts, tok, limit, "reject")
    with pytest.raises(UserError, match="data row 1: the prompt must be a non-empty string"):
        encode_prompts(["fine", ""], tok, limit, "truncate_left")
