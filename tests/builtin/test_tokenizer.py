"""The built-in byte-level BPE tokenizer: round trips, special tokens, chat template, cache, determinism."""

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from rlhf_cli.builtin import corpus
from rlhf_cli.builtin import tokenizer as bt

CONVERSATION = [
    {"role": "user", "content": "Review Up."},
    {"role": "assistant", "content": "A great film."},
    {"role": "user", "content": "Shorter?"},
    {"role": "assistant", "content": "Great."},
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A fresh cache folder for this module, so the first load really trains."""
    root = tmp_path_factory.mktemp("rlhf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tok(cache_root):
    return bt.builtin_tokenizer()


@pytest.mark.parametrize(
    "text",
    ["The film was not great, but the cast was superb!", "  two  spaces\nand\ttabs ", "Amélie, 2001 — 9/10 🎬", ""],
)
def test_decode_inverts_encode_and_adds_no_special_tokens(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.all_special_ids)


def test_special_tokens_are_distinct_and_fixed(tok):
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (bt.PAD_TOKEN, bt.EOS_TOKEN, bt.BOS_TOKEN)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    ids = [tok.convert_tokens_to_ids(token) for token in bt.SPECIAL_TOKENS]
    assert ids == list(range(len(bt.SPECIAL_TOKENS)))
    assert len(tok) <= bt.VOCAB_SIZE and tok.model_max_length == bt.MODEL_MAX_LENGTH
    assert tok("a film <|endoftext|>")["input_ids"][-1] == tok.eos_token_id  # written in text, still one token


def test_corpus_words_are_single_tokens(tok):
    """The corpus is small enough that BPE learns whole words: short sequences, fast models."""
    for word in ["film", "masterpiece", "disappointment"]:
        assert len(tok(" " + word)["input_ids"]) == 1


def test_chat_template_renders_roles_and_eos(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|user|>\nReview Up.\n<|assistant|>\nA great film.<|endoftext|>"
        "<|user|>\nShorter?\n<|assistant|>\nGreat.<|endoftext|>"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nReview Up.\n<|assistant|>\n"
    system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    assert tok.apply_chat_template(system, tokenize=False).startswith("<|system|>\nBe brief.\n<|user|>")


def test_assistant_mask_covers_assistant_content_and_eos_only(tok):
    out = tok.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(learned) == "A great film.<|endoftext|>Great.<|endoftext|>"
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if not m]) == (
        "<|user|>\nReview Up.\n<|assistant|>\n<|user|>\nShorter?\n<|assistant|>\n"
    )


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="Unknown chat role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_padding_side_and_template_survive_save_and_plain_reload(cache_root, tmp_path):
    left = bt.builtin_tokenizer(padding_side="left")
    left.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.padding_side == "left"
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 1
    assert reloaded.apply_chat_template(CONVERSATION, tokenize=False) == left.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    text = "The plot was dull."
    assert reloaded(text)["input_ids"] == left(text)["input_ids"]
    batch = reloaded(["a", "a much longer review"], padding=True)
    assert batch["input_ids"][0][0] == reloaded.pad_token_id  # padded on the left


def test_cached_files_are_reused_and_identical_to_fresh_training(tok, cache_root, monkeypatch):
    files = list(cache_root.glob("builtin/tokenizer-*/tokenizer.json"))
    assert len(files) == 1 and files[0].parent == bt.cache_dir()
    assert not list(cache_root.glob("builtin/.tokenizer-*"))  # no temporary folder left behind

    bt._load_or_train.cache_clear()  # forget the in-process copy: the next load must come from disk
    monkeypatch.setattr(corpus, "training_text", lambda: pytest.fail("retrained despite the cache"))
    assert bt.builtin_tokenizer().get_vocab() == tok.get_vocab()

    monkeypatch.undo()
    fresh = bt.train_tokenizer(corpus.training_text())  # training is deterministic: same files every time
    assert fresh.to_str() == Tokenizer.from_file(str(files[0])).to_str()


def test_training_is_deterministic():
    texts = ["the film was great", "the plot was dull and slow", "great acting, dull plot"] * 50
    assert bt.train_tokenizer(texts).to_str() == bt.train_tokenizer(texts).to_str()


# The template before tool calling was added, copied literally: conversations without tools, tool calls or
# tool messages must render byte for byte as they did.
OLD_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown chat role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
CONVERSATIONS = [
    CONVERSATION,
    CONVERSATION[:1],
    [{"role": "system", "content": "Be brief."}, *CONVERSATION],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  spaces \n and lines\n"}, {"role": "assistant", "content": "Amélie 🎬\n"}],
]
SCHEMA = {"type": "function", "function": {"name": "calculator", "description": "Exact arithmetic.", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 2+3"}},
    "required": ["expression"]}}}
WITH_TOOLS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}]},
    {"role": "tool", "name": "calculator", "content": "5"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"function": {"name": "calculator", "arguments": '{"expression": "5*1"}'}},  # arguments as a JSON string
        {"name": "calculator", "arguments": {"expression": "5+0"}}]},  # no "function" wrapper
    {"role": "tool", "content": "5"},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_conversations_without_tools_render_byte_identically_to_the_old_template(tok, messages):
    for generation_prompt in (False, True):
        new = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        old = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                      chat_template=OLD_CHAT_TEMPLATE)
        assert new == old
    new = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    old = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=OLD_CHAT_TEMPLATE)
    assert new["input_ids"] == old["input_ids"] and new["assistant_masks"] == old["assistant_masks"]


def test_tools_tool_calls_and_tool_messages_render_qwen_style_without_new_tokens(tok):
    text = tok.apply_chat_template(WITH_TOOLS, tools=[SCHEMA], tokenize=False, add_generation_prompt=False)
    call = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'
    assert text == (
        "<|system|>\nBe brief.\nYou can call these tools:\n"
        '{"name": "calculator", "description": "Exact arithmetic.", "parameters": {"type": "object", '
        '"properties": {"expression": {"type": "string", "description": "e.g. 2+3"}}, "required": ["expression"]}}\n'
        'Call a tool with <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>\n'
        "<|user|>\n2+3?\n"
        f"<|assistant|>\n{call.format('2+3')}<|endoftext|>"
        "<|user|>\n<tool_response>\n5\n</tool_response>\n"
        f"<|assistant|>\nChecking.\n{call.format('5*1')}\n{call.format('5+0')}<|endoftext|>"
        "<|user|>\n<tool_response>\n5\n</tool_response>\n<|user|>\n<tool_response>\n5\n</tool_response>\n"
        "<|assistant|>\nIt is 5.<|endoftext|>"
    )
    without_system = tok.apply_chat_template(WITH_TOOLS[1:2], tools=[SCHEMA], tokenize=False, add_generation_prompt=True)
    assert without_system.startswith("<|system|>\nYou can call these tools:\n{") and without_system.endswith(
        "<|user|>\n2+3?\n<|assistant|>\n")
    # the calls are the assistant's own tokens (trained); the tool list and the tool responses are not
    out = tok.apply_chat_template(WITH_TOOLS, tools=[SCHEMA], return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == (
        f"{call.format('2+3')}<|endoftext|>Checking.\n{call.format('5*1')}\n{call.format('5+0')}<|endoftext|>"
        "It is 5.<|endoftext|>")
    # no token was added for any of it: the vocabulary and the special tokens' ids are as before
    assert len(tok) <= bt.VOCAB_SIZE and tok.convert_tokens_to_ids("<tool_call>") == tok.unk_token_id
    assert [tok.convert_tokens_to_ids(t) for t in bt.SPECIAL_TOKENS] == list(range(len(bt.SPECIAL_TOKENS)))
    assert tok.decode(ids) == text  # and the text comes back exactly


def test_tool_role_is_known_but_other_roles_are_still_refused(tok):
    with pytest.raises(Exception, match="Unknown chat role narrator: use system, user, assistant or tool"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)
    with pytest.raises(Exception, match="Unknown chat role"):
        tok.apply_chat_template([{"role": "ipython", "content": "x"}], tools=[SCHEMA], tokenize=False)
